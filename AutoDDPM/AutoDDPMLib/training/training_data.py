"""Healthy training slices from PNG folders or volumes (lesion slices excluded by their masks).

The slices go through exactly the preprocessing that inference uses (the model
card's intensity percentiles, the same signal test, the same square model
grid), so a model never sees data prepared differently from what it will get.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import AutoDDPMError
from ..volumes.slices import AxialStack, has_signal, intensity_window, normalize, to_model_grid
from ..volumes.volume_io import input_stem, read_volume

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg")
MASK_WORDS = ("mask", "seg", "label")


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def _is_mask(path: Path) -> bool:
    return input_stem(path).lower().rsplit("_", 1)[-1] in MASK_WORDS


def _mask_for(image: Path) -> Path | None:
    """The lesion mask beside ``image``: ``P_flair.nii.gz`` pairs with ``P_mask.nii.gz`` (or _seg, _label)."""
    stem = input_stem(image)
    suffix = image.name[len(stem):]
    bases = {stem, stem.rsplit("_", 1)[0]}
    for base in bases:
        for word in MASK_WORDS:
            candidate = image.with_name(f"{base}_{word}{suffix}")
            if candidate.is_file():
                return candidate
    return None


def find_training_images(source: str | os.PathLike) -> list[tuple[Path, Path | None]]:
    """(image, lesion mask or None) pairs from a folder, one image, or a text file listing one image per line.

    A listed line may name its mask after a comma: ``image.nii.gz, image_mask.nii.gz``.
    """
    source = Path(source)
    if source.is_dir():
        images = sorted(p for p in source.iterdir() if _is_image(p) and not _is_mask(p))
        pairs = [(image, _mask_for(image)) for image in images]
    elif source.is_file() and _is_image(source):
        pairs = [(source, _mask_for(source))]
    elif source.is_file():
        try:
            listing = source.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise AutoDDPMError(f"training data {source} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a text "
                                "file listing images; give one of those or a folder of images") from None
        pairs = []
        for line in listing.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                parts = [part.strip() for part in line.split(",")]
                image = (source.parent / parts[0]).resolve()
                pairs.append((image, (source.parent / parts[1]).resolve() if len(parts) > 1 else _mask_for(image)))
    else:
        raise AutoDDPMError(f"training data {source} does not exist: give a folder of images or a text file listing them")
    if not pairs:
        raise AutoDDPMError(f"no images found in {source} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return pairs


def healthy_slices(
    image_path: Path,
    mask_path: Path | None,
    image_size: int,
    percentiles: tuple[float, float],
    min_foreground_fraction: float,
) -> torch.Tensor:
    """The lesion-free slices of one image that have signal, on the model grid: [S, 1, N, N]."""
    stack = AxialStack.from_image(read_volume(image_path))
    slices01 = normalize(stack.array, intensity_window(stack.array, percentiles))
    keep = np.array([has_signal(s, min_foreground_fraction) for s in slices01], dtype=bool)
    if mask_path is not None:
        lesion = AxialStack.from_image(read_volume(mask_path)).array
        if lesion.shape != stack.array.shape:
            raise AutoDDPMError(f"mask {mask_path} has shape {lesion.shape}, its image {image_path} {stack.array.shape}")
        keep &= ~(lesion > 0).reshape(len(lesion), -1).any(axis=1)
    if not keep.any():
        return torch.empty(0, 1, image_size, image_size)
    grid, _ = to_model_grid(slices01[keep], stack.pixel_spacing, image_size)
    return grid


def load_healthy_slices(
    sources: list[str | os.PathLike],
    image_size: int,
    percentiles: tuple[float, float],
    min_foreground_fraction: float,
) -> torch.Tensor:
    """All healthy slices of all sources on the model grid, [N, 1, size, size] in [0, 1]."""
    batches = [
        healthy_slices(image, mask, image_size, percentiles, min_foreground_fraction)
        for source in sources
        for image, mask in find_training_images(source)
    ]
    slices = torch.cat(batches) if batches else torch.empty(0)
    if len(slices) == 0:
        raise AutoDDPMError(f"no healthy slices with signal found in {', '.join(map(str, sources))}")
    return slices
