"""Prepared training slices in one safetensors file.

``autoddpm prepare-slices`` reads a cohort once (volumes, masks, SimpleITK) and
writes its healthy slices already on the model grid; ``autoddpm train --data
FILE.safetensors`` then trains from that file alone. The file is small (a
cohort of 80 FLAIR volumes is ~15 MB at 64x64) and needs nothing but PyTorch
and safetensors to read, so training can run on a GPU node that has neither
the data nor SimpleITK. The preprocessing it was made with is stored beside the
slices and checked against the run that reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import AutoDDPMError
from ..models.bundle import save_tensors

SLICE_FILE_SUFFIX = ".safetensors"
# Half precision halves the file; in [0, 1] it is exact to 2.5e-4, far below the noise levels trained on.
STORED_DTYPE = torch.float16


def is_slice_file(source: str | os.PathLike) -> bool:
    return str(source).lower().endswith(SLICE_FILE_SUFFIX)


def write_slice_file(
    path: str | os.PathLike,
    slices: torch.Tensor,
    percentiles: tuple[float, float],
    min_foreground_fraction: float,
    sources: list[str],
) -> None:
    """Write healthy slices [N, 1, S, S] in [0, 1] with the preprocessing that made them."""
    if not is_slice_file(path):
        raise AutoDDPMError(f"a slice file must end in {SLICE_FILE_SUFFIX}: {path}")
    metadata = {
        "image_size": str(slices.shape[-1]),
        "intensity_percentiles": json.dumps(list(percentiles)),
        "min_foreground_fraction": str(min_foreground_fraction),
        "sources": json.dumps(sources),
    }
    save_tensors(path, {"slices": slices.clamp(0, 1).to(STORED_DTYPE)}, metadata)


def read_slice_file(
    path: str | os.PathLike,
    image_size: int,
    percentiles: tuple[float, float],
    min_foreground_fraction: float,
) -> torch.Tensor:
    """The slices of a prepared file as float32 [N, 1, S, S], after checking they suit this run."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AutoDDPMError(f"slice file {path} does not exist: make it with `autoddpm prepare-slices`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            slices = handle.get_tensor("slices").float()
        made_with = (
            int(metadata["image_size"]),
            tuple(json.loads(metadata["intensity_percentiles"])),
            float(metadata["min_foreground_fraction"]),
        )
    except (OSError, KeyError, ValueError) as error:
        raise AutoDDPMError(f"{path} is not a slice file written by `autoddpm prepare-slices` ({error})") from None
    wanted = (image_size, tuple(percentiles), min_foreground_fraction)
    if made_with != wanted:
        raise AutoDDPMError(
            f"{path} was prepared with grid {made_with[0]}, percentiles {made_with[1]} and foreground fraction "
            f"{made_with[2]}, but this model uses {wanted[0]}, {wanted[1]} and {wanted[2]}: prepare it again "
            "with the same --image-size (or --like MODEL)"
        )
    return slices
