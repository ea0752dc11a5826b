#!/usr/bin/env python3
"""Make the Sample Data thumbnails of ``Resources/SampleData``: ``<name>.png`` beside each ``<name>.nii.gz``.

The axial slice with the most lesion (from ``<name>_mask.nii.gz``; the middle slice
without a mask), windowed to the 1st-99th percentile of the volume, at most
``--size`` pixels wide, grey levels in 8 bits: a few KB each. Only missing
thumbnails are made unless ``--force``.

    python tools/make_sample_thumbnails.py Resources/SampleData
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image


def read_slices(path: Path) -> np.ndarray:
    """The image as [slice, row, column]; a single slice (the T1 samples) reads as a 2D array."""
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return voxels[np.newaxis] if voxels.ndim == 2 else voxels


def thumbnail(volume: Path, size: int) -> Image.Image:
    """The sample's most telling axial slice as a small grey image (rows from anterior to posterior)."""
    voxels = read_slices(volume).astype(np.float32)
    mask_path = volume.with_name(volume.name.removesuffix(".nii.gz") + "_mask.nii.gz")
    if mask_path.is_file():
        mask = read_slices(mask_path)
        index = int(np.argmax(mask.reshape(len(mask), -1).sum(axis=1)))
    else:
        index = len(voxels) // 2
    low, high = np.percentile(voxels, [1, 99])
    grey = np.clip((voxels[index] - low) / max(high - low, 1e-6), 0, 1)
    image = Image.fromarray((grey * 255).astype(np.uint8), mode="L")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the SampleData folder")
    parser.add_argument("--size", type=int, default=96, help="largest side in pixels (default 96)")
    parser.add_argument("--force", action="store_true", help="make them again even where they exist")
    args = parser.parse_args()
    for volume in sorted(args.folder.glob("*.nii.gz")):
        if volume.name.endswith("_mask.nii.gz"):
            continue
        target = volume.with_name(volume.name.removesuffix(".nii.gz") + ".png")
        if target.exists() and not args.force:
            continue
        thumbnail(volume, args.size).save(target, optimize=True)
        print(f"{target}: {target.stat().st_size} bytes")


if __name__ == "__main__":
    main()
