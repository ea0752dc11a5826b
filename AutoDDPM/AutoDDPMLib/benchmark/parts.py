"""A benchmark's finished method runs, kept on disk so that a stopped run can go on (``autoddpm benchmark --resume``).

A full run reconstructs every slice from up to 500 noise levels with every
baseline: hours on a laptop CPU, longer than a laptop stays awake. A method's
outputs on a few batches of cases (a "part", see ``Runner._in_chunks``) are written
to ``OUTPUT_DIR/partial/`` as soon as they are finished; ``--resume`` reads back the parts made by exactly the
same run and computes only the rest. A part is reused only when everything that
made its numbers is the same: the model's weights and card, the engine's source,
the cases, the method, the seed, the batch size (batches draw their own noise),
the backend and the kind of device. The folder is removed once the report is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..models.bundle import save_tensors

PARTS_FOLDER = "partial"
_ENGINE = Path(__file__).resolve().parents[1]  # the AutoDDPMLib package


def engine_digest() -> str:
    """SHA-256 of the engine's source files: a part made by other code is not reused."""
    digest = hashlib.sha256()
    for path in sorted(_ENGINE.rglob("*.py")):
        digest.update(path.relative_to(_ENGINE).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def array_digest(*arrays: Any) -> str:
    """SHA-256 of arrays' shapes, types and bytes (the cases a part was run on)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class PartStore:
    """Parts of one benchmark run in ``output_dir/partial``, keyed by what made them.

    ``run`` is everything common to the run (model, engine, seed, ...); each part
    adds its own fields (cases, method). With ``resume`` False the parts of an
    earlier run are removed first, so a run never mixes with an older one.
    """

    def __init__(self, output_dir: str | os.PathLike, run: dict[str, Any], resume: bool) -> None:
        self.folder = Path(output_dir) / PARTS_FOLDER
        self._run = run
        self.discarded = 0
        if not resume and self.folder.is_dir():
            self.discarded = len(list(self.folder.glob("*.safetensors")))
            shutil.rmtree(self.folder)
        self.resumed: list[str] = []

    def _key(self, fields: dict[str, Any]) -> str:
        text = json.dumps({"run": self._run, "part": fields}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get_or_compute(self, label: str, fields: dict[str, Any],
                       compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The part's arrays: read back when an earlier run stored them, else ``compute()``d and stored."""
        import torch
        from safetensors.numpy import load_file

        path = self.folder / f"{self._key(fields)}.safetensors"
        if path.is_file():
            self.resumed.append(label)
            return load_file(str(path))
        arrays = compute()
        save_tensors(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, {"label": label})
        return arrays

    def remove(self) -> None:
        """Drop the parts (the report that used them has been written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
