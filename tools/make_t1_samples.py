#!/usr/bin/env python3
"""Make the T1 sample cases of ``Resources/SampleData`` (the paper's setting) from one IXI slice.

Each case is the mid-axial T1 slice of one IXI validation subject with one
synthetic lesion (small, medium, large) painted in by the engine's seeded
generator (:func:`AutoDDPMLib.benchmark.lesions.add_lesion`), at the slice's own 1 mm
resolution, with its mask. The healthy slice is known, so what the demo
shows can be checked exactly. No shipped model was trained on this subject.
Each lesion is the first one of its seed sequence in the upper half (log scale)
of its size bin, so that even the small one covers a few pixels of a 64 px
model grid.

    python tools/make_t1_samples.py ../shared/data/ixi_t1_midaxial/val/IXI012.png Resources/SampleData
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AutoDDPMLib.benchmark.lesions import add_lesion
from AutoDDPMLib.benchmark.metrics import size_bin_edges

SEED = 2023


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png", type=Path, help="a mid-axial IXI T1 slice (8-bit PNG, 1 mm)")
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args()

    image = sitk.ReadImage(str(args.png))
    healthy = sitk.GetArrayFromImage(image).astype(np.float32) / 255.0
    rows, cols = healthy.shape
    # add_lesion works on square slices: pad with the background, then crop back.
    size = max(rows, cols)
    top, left = (size - rows) // 2, (size - cols) // 2
    square = np.zeros((size, size), np.float32)
    square[top:top + rows, left:left + cols] = healthy
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for i, (bin_name, low, high) in enumerate(size_bin_edges(size)):
        seed = SEED + 1000 * i
        while True:
            with_lesion, mask = add_lesion(square, bin_name, seed=seed)
            if np.isinf(high) or mask.sum() >= np.sqrt(max(low, 1) * high):
                break
            seed += 1
        with_lesion = with_lesion[top:top + rows, left:left + cols]
        mask = mask[top:top + rows, left:left + cols]
        for array, suffix in ((np.round(255 * with_lesion).clip(0, 255).astype(np.uint8), ""),
                              (mask.astype(np.uint8), "_mask")):
            out = sitk.GetImageFromArray(array)
            out.CopyInformation(image)
            path = args.output_dir / f"IXI_T1_midaxial_{bin_name}{suffix}.nii.gz"
            sitk.WriteImage(out, str(path), useCompression=True)
        print(f"{bin_name}: {int(mask.sum())} lesion pixels -> {args.output_dir}/IXI_T1_midaxial_{bin_name}.nii.gz")


if __name__ == "__main__":
    main()
