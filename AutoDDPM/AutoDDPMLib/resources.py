"""Where the extension's shipped files (models, LPIPS weights, sample data) live."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AutoDDPMError

_PACKAGE_DIR = Path(__file__).resolve().parent


def resources_dir() -> Path:
    """The folder holding ``Models/``, ``LPIPS/`` and ``SampleData/``.

    Looked up in order: ``$AUTODDPM_RESOURCES``; ``Resources/`` beside the
    package (an installed Slicer extension puts it there); ``Resources/`` at the
    repository root (a source checkout or ``pip install -e .``).
    """
    candidates = []
    if os.environ.get("AUTODDPM_RESOURCES"):
        candidates.append(Path(os.environ["AUTODDPM_RESOURCES"]))
    candidates += [_PACKAGE_DIR.parent / "Resources", _PACKAGE_DIR.parents[1] / "Resources"]
    for candidate in candidates:
        if (candidate / "Models").is_dir():
            return candidate
    raise AutoDDPMError(
        "cannot find the AutoDDPM Resources folder (bundled models); "
        "reinstall the extension or set AUTODDPM_RESOURCES to the folder that holds Models/"
    )
