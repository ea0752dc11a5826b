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
import torch

from AutoDDPMLib.benchmark.datasets import DEV_STRIDE
from AutoDDPMLib.benchmark.volume_benchmark import score
from AutoDDPMLib.detection.inference import AutoDDPM
from AutoDDPMLib.detection.map_filters import anomaly_mask, postprocess_map
from AutoDDPMLib.detection.postprocessing import PostProcessing
from AutoDDPMLib.diffusion.polarity import deviation
from AutoDDPMLib.training.training_data import find_training_images
from AutoDDPMLib.training.volume_calibration import LabelledVolume, calibrate_volume_threshold, healthy_voxels
from AutoDDPMLib.volumes.slices import FOREGROUND_LEVEL, AxialStack, has_signal, intensity_window, normalize, to_model_grid
from AutoDDPMLib.volumes.volume_io import read_volume


def patients(data: Path) -> dict[str, list[tuple[Path, Path]]]:
    """The development patients (every DEV_STRIDE-th training patient, as lgg-dev) and the validation patients."""
    train = [pair for pair in find_training_images(data / "lgg_flair" / "train") if pair[1] is not None]
    val = [pair for pair in find_training_images(data / "lgg_flair" / "val") if pair[1] is not None]
    return {"dev": train[::DEV_STRIDE], "val": val}


def candidate_settings(stage: str) -> list[PostProcessing]:
    """The settings each stage of the sweep compares (each stage builds on the choice of the one before)."""
    bright = dict(polarity="bright")
    region = dict(bright, brain_erosion_mm=12.0)
    median = dict(region, median_mm=5.0)
    chosen = dict(median, min_component_mm3=1000.0)
    stages = {
        "polarity": [PostProcessing.none(), PostProcessing(**bright)],
        "region": [PostProcessing(**bright, brain_erosion_mm=e) for e in (0.0, 4.0, 8.0, 12.0, 16.0, 20.0)],
        "median": [PostProcessing(**region, median_mm=m) for m in (3.0, 5.0, 7.0)],
        "components": [PostProcessing(**median, min_component_mm3=c) for c in (0.0, 100.0, 300.0, 1000.0, 3000.0)],
        "check": [PostProcessing(**dict(chosen, brain_erosion_mm=e)) for e in (8.0, 12.0, 16.0)],
    }
    return [s for name, group in stages.items() if stage in (name, "all") for s in group]


def cache_files(cache: Path, image_path: Path, repeats: int) -> list[Path]:
    """Where the outputs of repeats 0 .. repeats-1 of one volume are kept."""
    stem = image_path.name.replace(".nii.gz", "")
    return [cache / (f"{stem}.npz" if r == 0 else f"{stem}.r{r}.npz") for r in range(repeats)]


def compute_cache(engine: AutoDDPM, pairs: list[tuple[Path, Path]], cache: Path, repeats: int = 1) -> None:
    """The model-grid outputs of each run of each volume (pseudo-healthy, likelihood map M, re-sampling mask),
    repeat r with the seeds `autoddpm run --repeats` gives it."""
    cache.mkdir(parents=True, exist_ok=True)
    for image_path, _ in pairs:
        missing = [(r, f) for r, f in enumerate(cache_files(cache, image_path, repeats)) if not f.exists()]
        if not missing:
            continue
        stack = AxialStack.from_image(read_volume(image_path))
        slices01 = normalize(stack.array, intensity_window(stack.array, engine.card.intensity_percentiles))
        keep = np.array([has_signal(s, engine.card.min_foreground_fraction) for s in slices01], dtype=bool)
        grid, _ = to_model_grid(slices01[keep], stack.pixel_spacing, engine.card.image_size)
        for repeat, target in missing:
            out = engine.process_slices(grid, repeat=repeat)
            np.savez_compressed(target.with_suffix(".tmp.npz"), pseudo_healthy=out.pseudo_healthy.numpy(),
                                likelihood=out.likelihood_map.numpy(), resampled=out.mask.numpy().astype(np.uint8))
            target.with_suffix(".tmp.npz").rename(target)
            print(f"computed {target.name}", file=sys.stderr, flush=True)


class Volume(LabelledVolume):
    """One patient's volume and truth (as benchmark-volumes reads them) with the cached model outputs."""

    def __init__(self, image_path: Path, mask_path: Path, card, cache: list[Path], slice_spacing: float | None = None) -> None:
        super().__init__(image_path, mask_path, card)
        if slice_spacing is not None:
            # LGG's volumes carry a nominal 1 mm grid; --slice-spacing reads them as the thick stacks they likely are.
            self.spacing = (slice_spacing, *self.spacing[1:])
            self.healthy = healthy_voxels(self.truth, self.slices01 > FOREGROUND_LEVEL, self.spacing)
        self.keep = np.array([has_signal(s, card.min_foreground_fraction) for s in self.slices01], dtype=bool)
        self.x, self.transform = to_model_grid(self.slices01[self.keep], self.spacing[1:], card.image_size)
        self.runs = [np.load(path) for path in cache]  # one per repeat

    def raw_map(self, polarity: str) -> np.ndarray:
        """The pipeline's map with ``polarity`` in the volume before post-processing, the mean over the repeats,
        as ``autoddpm run`` makes it."""
        maps = [AutoDDPM.raw_anomaly_in_volume(deviation(self.x, torch.from_numpy(run["pseudo_healthy"]), polarity)
                                               * torch.from_numpy(run["likelihood"]), self.transform, self.keep, self.slices01)
                for run in self.runs]
        return maps[0] if len(maps) == 1 else np.mean(maps, axis=0)

    def tumour_resampled(self) -> float:
        """The share of the tumour that the first run's step 1 sent to re-sampling."""
        resampled = np.zeros(self.truth.shape, bool)
        resampled[self.keep] = self.transform.from_model_grid(torch.from_numpy(self.runs[0]["resampled"]).float()) > 0
        return float(resampled[self.truth].mean())


def evaluate(settings: PostProcessing, dev: list[Volume], val: list[Volume], raw: dict, healthy_rate: float) -> dict:
    """Calibrate on the validation patients' healthy voxels, score the development patients."""
    def maps_of(volumes):
        return [postprocess_map(raw[(v.name, settings.polarity)], v.slices01, v.spacing, settings) for v in volumes]

    val_maps = [m for m, _ in maps_of(val)]
    threshold, rate = calibrate_volume_threshold(val_maps, [v.healthy for v in val], [v.spacing for v in val],
                                                 settings, healthy_rate)
    dev_maps = maps_of(dev)
    masks = [anomaly_mask(m, threshold, v.spacing, settings) for (m, _), v in zip(dev_maps, dev)]
    in_region = [v.truth[brain].sum() / v.truth.sum() for (_, brain), v in zip(dev_maps, dev) if brain is not None]
    row = score(settings.describe(), dev, [m for m, _ in dev_maps], masks, threshold)
    return dict(row, calibrated_healthy_rate=rate, tumour_in_region=float(np.mean(in_region)) if in_region else 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flair-lgg")
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder (lgg_flair/train and lgg_flair/val)")
    parser.add_argument("--cache", type=Path, required=True, help="folder for the model's outputs, reused by later runs")
    parser.add_argument("--compute-only", action="store_true")
    parser.add_argument("--stage", default="all", choices=("polarity", "region", "median", "components", "check", "all"))
    parser.add_argument("--healthy-rate", type=float, default=0.01)
    parser.add_argument("--slice-spacing", type=float, default=None, metavar="MM",
                        help="read every volume with this slice spacing instead of its header's (LGG's is a nominal 1 mm)")
    args = parser.parse_args()
    engine = AutoDDPM(args.model, seed=0)
    for split, pairs in patients(args.data).items():
        compute_cache(engine, pairs, args.cache / engine.card.name / engine.schedule_name / split)
    if args.compute_only:
        return
    card = engine.card
    cache = args.cache / card.name / engine.schedule_name
    volumes = {split: [Volume(image, mask, card, cache_files(cache / split, image, 1), args.slice_spacing)
                       for image, mask in pairs] for split, pairs in patients(args.data).items()}
    dev, val = volumes["dev"], volumes["val"]
    raw = {(v.name, polarity): v.raw_map(polarity) for v in dev + val for polarity in ("both", "bright")}
    print(f"model {card.name}, schedule {engine.schedule_name}; {len(dev)} development patients scored, "
          f"thresholds from the healthy voxels of {len(val)} validation patients at {args.healthy_rate:.0%}; "
          f"slice spacing {'from the headers' if args.slice_spacing is None else f'{args.slice_spacing:g} mm'}\n")
    print("| post-processing | threshold | Dice (pooled) | AUPRC | median patient Dice | found (Dice > 0.1) | tumour in region |")
    print("|---|---|---|---|---|---|---|")
    for settings in candidate_settings(args.stage):
        row = evaluate(settings, dev, val, raw, args.healthy_rate)
        print(f"| {row['method']} | {row['threshold']:.4f} | {row['dice']:.3f} | {row['auprc']:.3f} | "
              f"{row['patient_dice_median']:.3f} | {row['found']}/{row['patients']} | {row['tumour_in_region']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
