"""The files ``autoddpm run`` writes for one input, named after it, in the output folder."""

from __future__ import annotations

from pathlib import Path

OUTPUT_SUFFIXES = {"pseudohealthy": "_pseudohealthy.nii.gz", "anomaly": "_anomaly.nii.gz", "mask": "_mask.nii.gz",
                   "brain": "_brain.nii.gz",  # the region searched, when the model's post-processing has one
                   "spread": "_spread.nii.gz"}  # the spread only with --repeats
# The provenance sidecar: how the outputs beside it were made (run_record).
SIDECAR_SUFFIX = "_autoddpm.json"
# One row per input of a run with several (summary).
SUMMARY_FILE = "summary.csv"


def output_path(folder: Path, stem: str, kind: str) -> Path:
    """Where the output ``kind`` (a key of OUTPUT_SUFFIXES) of the input named ``stem`` goes."""
    return folder / f"{stem}{OUTPUT_SUFFIXES[kind]}"


def sidecar_path(folder: Path, stem: str) -> Path:
    return folder / f"{stem}{SIDECAR_SUFFIX}"


def existing_outputs(folder: Path, stem: str) -> list[str]:
    """The names of the files an earlier run wrote for the input named ``stem`` that are in ``folder``."""
    names = [f"{stem}{suffix}" for suffix in (*OUTPUT_SUFFIXES.values(), SIDECAR_SUFFIX)]
    return [name for name in names if (folder / name).exists()]


def remove_other_outputs(folder: Path, stem: str, kept: list[Path]) -> None:
    """Removes what an earlier run wrote for ``stem`` that the files ``kept`` (this run's) did not replace, e.g.
    its spread when it had --repeats and this run has not: it would sit beside them as if made with them."""
    for name in set(existing_outputs(folder, stem)) - {path.name for path in kept}:
        (folder / name).unlink(missing_ok=True)
