"""The one exception type the engine raises for problems a user can fix."""


class AutoDDPMError(Exception):
    """A problem with the user's input, model or options.

    The message names the problem and what to do about it; the command line
    prints it as one line and exits with code 2, the Slicer module shows it in
    a dialog. Anything else escaping the engine is a bug.
    """
