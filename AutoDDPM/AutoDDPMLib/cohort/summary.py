"""The cohort's ``summary.csv``: one row per input of a run with several, in the order they were given."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .output_files import SUMMARY_FILE


@dataclass
class SummaryRow:
    """What happened to one input: ``status`` is ok, skipped (``--resume``: done before with the same
    settings) or failed, with the reason; the numbers are those of the run that made its outputs."""

    name: str
    status: str
    reason: str = ""
    anomalous_volume_ml: float | None = None
    slices: int | None = None
    seconds: float | None = None
    warnings: list[str] = field(default_factory=list)
    input: str = ""

    @classmethod
    def from_record(cls, path: Path, record: dict[str, Any], reason: str) -> SummaryRow:
        """The row of an input skipped with ``reason``, from the sidecar of the run that made its outputs."""
        result, timings = record.get("result", {}), record.get("timings", {})
        return cls(path.name, "skipped", reason, result.get("anomalous_volume_ml"), result.get("slices"),
                   timings.get("processing_seconds"), list(record.get("warnings", [])), str(path))


def write_summary(rows: list[SummaryRow], folder: Path) -> Path:
    """Writes ``folder/summary.csv`` atomically (a reader never sees half a table); returns its path.
    Volumes in mL to 0.001, seconds to 0.1; several warnings are joined by " | "."""
    from ..volumes.volume_io import write_outputs_atomically  # SimpleITK: not where the CLI only trains

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([column.name for column in fields(SummaryRow)])
    for row in rows:
        values = asdict(row)
        values["warnings"] = " | ".join(row.warnings)
        for key, digits in (("anomalous_volume_ml", 3), ("seconds", 1)):
            values[key] = "" if values[key] is None else round(values[key], digits)
        values["slices"] = "" if row.slices is None else row.slices
        writer.writerow(values.values())
    path = folder / SUMMARY_FILE
    write_outputs_atomically({path: text.getvalue().encode("utf-8")})
    return path
