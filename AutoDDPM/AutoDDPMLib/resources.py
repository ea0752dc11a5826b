"""Where the extension's shipped files (models, LPIPS weights, sample data) live."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from .errors import AutoDDPMError

_PACKAGE_DIR = Path(__file__).resolve().parent


def _package_data_dirs() -> list[Path]:
    """``Resources/`` inside the installed package, where a wheel (``pip install .``) puts it.

    pyproject.toml maps the repository's ``Resources/`` to the package ``AutoDDPMLib.Resources``, so a
    wheel carries the models, the LPIPS weights and the sample data inside the package. The engine opens
    them by file path (safetensors, SimpleITK), so only a package installed as files can serve them: a
    zipped one gives a Traversable that is no Path, and no candidate.
    """
    packaged = importlib.resources.files(__package__) / "Resources"
    return [packaged] if isinstance(packaged, Path) else []


def resources_dir() -> Path:
    """The folder holding ``Models/``, ``LPIPS/`` and ``SampleData/``.

    Looked up in order: ``$AUTODDPM_RESOURCES``; ``Resources/`` inside the package (a wheel,
    ``pip install .``); ``Resources/`` beside the package (an installed Slicer extension puts it there);
    ``Resources/`` at the repository root (a source checkout or ``pip install -e .``).
    """
    chosen = os.environ.get("AUTODDPM_RESOURCES")
    # Set, it is the user's choice: falling back to the bundled models would run other models than they meant.
    if chosen and not (Path(chosen) / "Models").is_dir():
        raise AutoDDPMError(f"AUTODDPM_RESOURCES is set to {chosen}, which holds no Models folder; "
                            "set it to the folder that holds Models/, or unset it for the bundled models")
    candidates = [Path(chosen)] if chosen else []
    candidates += _package_data_dirs() + [_PACKAGE_DIR.parent / "Resources", _PACKAGE_DIR.parents[1] / "Resources"]
    for candidate in candidates:
        if (candidate / "Models").is_dir():
            return candidate
    raise AutoDDPMError(
        "cannot find the AutoDDPM Resources folder (bundled models); "
        "reinstall the extension or set AUTODDPM_RESOURCES to the folder that holds Models/"
    )
