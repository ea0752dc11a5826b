#!/usr/bin/env python3
"""Choose the anomaly map's post-processing on the LGG development patients.

    python tools/postprocess_sweep.py --data ../shared/data --cache runs/pp-cache

Runs the shipped model's default schedule (as ``autoddpm run`` does: seed 0,
batches of 16) once on the whole volumes of the development patients (every 8th
training patient, tumour and tumour-free slices) and of the validation patients,
keeping the model-grid outputs in ``--cache``. Then, for each post-processing
setting, it calibrates the threshold on the validation patients' healthy voxels
(as ``autoddpm calibrate`` does: no tumour is looked at but to stay away from it)
and scores the development patients only: pooled Dice, AUPRC, per-patient Dice
and how many tumours are found at all. The validation patients' tumours are never
scored here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from AutoDDPMLib.benchmark.datasets import DEV_STRIDE
from AutoDDPMLib.detection.inference import AutoDDPM
from AutoDDPMLib.training.training_data import find_training_images
from AutoDDPMLib.volumes.slices import AxialStack, has_signal, intensity_window, normalize, to_model_grid
from AutoDDPMLib.volumes.volume_io import read_volume


def patients(data: Path) -> dict[str, list[tuple[Path, Path]]]:
    """The development patients (every DEV_STRIDE-th training patient, as lgg-dev) and the validation patients."""
    train = [pair for pair in find_training_images(data / "lgg_flair" / "train") if pair[1] is not None]
    val = [pair for pair in find_training_images(data / "lgg_flair" / "val") if pair[1] is not None]
    return {"dev": train[::DEV_STRIDE], "val": val}


def compute_cache(engine: AutoDDPM, pairs: list[tuple[Path, Path]], cache: Path) -> None:
    """The model-grid outputs of one run per volume (pseudo-healthy, likelihood map M, re-sampling mask)."""
    cache.mkdir(parents=True, exist_ok=True)
    for image_path, _ in pairs:
        target = cache / (image_path.name.replace(".nii.gz", "") + ".npz")
        if target.exists():
            continue
        stack = AxialStack.from_image(read_volume(image_path))
        slices01 = normalize(stack.array, intensity_window(stack.array, engine.card.intensity_percentiles))
        keep = np.array([has_signal(s, engine.card.min_foreground_fraction) for s in slices01], dtype=bool)
        grid, _ = to_model_grid(slices01[keep], stack.pixel_spacing, engine.card.image_size)
        out = engine.process_slices(grid)
        np.savez_compressed(target.with_suffix(".tmp.npz"), pseudo_healthy=out.pseudo_healthy.numpy(),
                            likelihood=out.likelihood_map.numpy(), resampled=out.mask.numpy().astype(np.uint8))
        target.with_suffix(".tmp.npz").rename(target)
        print(f"computed {target.name}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flair-lgg")
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder (lgg_flair/train and lgg_flair/val)")
    parser.add_argument("--cache", type=Path, required=True, help="folder for the model's outputs, reused by later runs")
    parser.add_argument("--compute-only", action="store_true")
    args = parser.parse_args()
    engine = AutoDDPM(args.model, seed=0)
    for split, pairs in patients(args.data).items():
        compute_cache(engine, pairs, args.cache / engine.card.name / engine.schedule_name / split)
    if args.compute_only:
        return


if __name__ == "__main__":
    main()
