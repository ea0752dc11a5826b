"""What to do with the outputs an earlier run left in the output folder: refuse, skip or replace them.

Without options a run refuses to touch them. ``--resume`` skips each input whose outputs are complete and
whose sidecar records the current settings, and still refuses outputs made otherwise; ``--overwrite``
replaces them (with ``--resume``: only those that are not skipped). All of it is decided from the files
before the model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import AutoDDPMError
from .output_files import existing_outputs, sidecar_path
from .run_record import RunSettings, read_record


def _names(inputs: list[Path], most: int = 3) -> str:
    shown = ", ".join(path.name for path in inputs[:most])
    return shown + (f" and {len(inputs) - most} more" if len(inputs) > most else "")


def _why_not_done(folder: Path, stem: str, record: dict[str, Any] | None, settings: RunSettings) -> str | None:
    """Why the outputs of ``stem`` in ``folder`` are not those this run would write (None: they are)."""
    if record is None:
        return f"have no record of how they were made ({sidecar_path(folder, stem).name} is missing or unreadable)"
    missing = [name for name in record.get("outputs", {}).values() if not (folder / name).is_file()]
    if missing:
        return f"are incomplete ({missing[0]} is missing)"
    differences = settings.differences(record.get("settings"))
    if differences:
        return "were made with other settings: " + ", ".join(differences)
    return None


def earlier_outputs(folder: Path, inputs: list[Path], stems: list[str]) -> dict[Path, str]:
    """The inputs (with their output names' stem) that have files of an earlier run in ``folder``."""
    return {path: stem for path, stem in zip(inputs, stems) if existing_outputs(folder, stem)}


def settle_earlier_outputs(folder: Path, earlier: dict[Path, str], settings: RunSettings | None,
                           overwrite: bool) -> dict[Path, dict[str, Any]]:
    """The inputs to skip, each with the sidecar of its earlier run; ``settings`` are the run's under
    ``--resume``, None without it.

    Raises AutoDDPMError, one line saying what to do, when earlier outputs would be replaced without ``overwrite``.
    """
    if settings is None:
        if earlier and not overwrite:
            raise AutoDDPMError(
                f"output folder {folder} already holds outputs of {_names(list(earlier))}; give --resume to skip "
                "the inputs done with the same settings, --overwrite to replace them, or another --output-dir")
        return {}
    done, refused = {}, {}
    for path, stem in earlier.items():
        record = read_record(sidecar_path(folder, stem))
        why = _why_not_done(folder, stem, record, settings)
        if why is None:
            done[path] = record
        else:
            refused[path] = why
    if refused and not overwrite:
        first = next(iter(refused))
        others = f" (and the outputs of {_names(list(refused)[1:])})" if len(refused) > 1 else ""
        raise AutoDDPMError(f"the outputs of {first.name} in {folder} {refused[first]}{others}; give --overwrite to "
                            "replace them, or another --output-dir")
    return done
