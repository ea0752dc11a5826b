#!/usr/bin/env python3
"""Detection on a development set against the noise level of AutoDDPM's coarse reconstruction.

    python tools/coarse_level_sweep.py flair-lgg ../shared/data --levels 100 200 300 400
    python tools/coarse_level_sweep.py t1-ixi-midaxial ../shared/data --dataset ixi-dev --levels 100 150 200

For each level the fast schedule (10 strided coarse steps, then 5 x 3 re-sampling
steps) starts its coarse reconstruction there. Both thresholds are recalibrated
at that level by `autoddpm calibrate`'s rule on healthy validation slices (LGG
val patients, IXI val subjects), so each row is what shipping that level would
give. Scored on a development set of the benchmark, never on the validation data:
lgg-dev (the tumour slices of every 8th LGG training patient) or ixi-dev (synthetic
lesions on every 8th IXI training slice), with calibrated and oracle Dice (per
lesion size on ixi-dev), AUPRC, and the share of lesion pixels that the mask step
sends to re-sampling. The paper's level is 200. ``--lpips-sizes`` and
``--resample-starts`` (the level re-sampling starts from, the paper's 50, in as
many steps as the card's fast schedule takes) sweep those too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from AutoDDPMLib.benchmark.datasets import load_ixi_dev, load_lgg_dev
from AutoDDPMLib.benchmark.metrics import SIZE_BIN_NAMES, average_precision, best_dice, dice_at_threshold
from AutoDDPMLib.benchmark.scoring import oracle_thresholds
from AutoDDPMLib.detection.inference import AutoDDPM
from AutoDDPMLib.provenance import git_commit
from AutoDDPMLib.training.calibrate import healthy_calibration_slices, healthy_thresholds

# Where each development set and the healthy slices that set its thresholds live under the data root.
DEV_SETS = {
    "lgg-dev": (lambda root, card: load_lgg_dev(root / "lgg_flair" / "train", card), "lgg_flair/val"),
    "ixi-dev": (lambda root, card: load_ixi_dev(root / "ixi_t1_midaxial" / "train", card), "ixi_t1_midaxial/val"),
}


def _dice(scores: np.ndarray, truth: np.ndarray, threshold: float) -> str:
    """Calibrated / oracle Dice."""
    oracle, _ = best_dice(scores, truth, oracle_thresholds(scores))
    return f"{dice_at_threshold(scores, truth, threshold):.3f} / {oracle:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="bundled model name or model folder")
    parser.add_argument("data", type=Path, help="the data root, with lgg_flair/ or ixi_t1_midaxial/ (train/ and val/)")
    parser.add_argument("--dataset", choices=sorted(DEV_SETS), default="lgg-dev")
    parser.add_argument("--levels", type=int, nargs="+", default=[100, 200, 300, 400])
    parser.add_argument("--lpips-sizes", type=int, nargs="+", default=[None],
                        help="pixels the slices are resized to for LPIPS (default: the card's lpips_image_size)")
    parser.add_argument("--resample-starts", type=int, nargs="+", default=[None],
                        help="noise levels the stitch-and-re-sample step starts from (default: the card's)")
    parser.add_argument("--calibration-slices", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = AutoDDPM(args.model, device="cpu", seed=args.seed, backend="torch")
    card, pipeline = engine.card, engine.pipeline
    load_dev, healthy_folder = DEV_SETS[args.dataset]
    dev = load_dev(args.data, card)
    healthy = healthy_calibration_slices([args.data / healthy_folder], card, args.calibration_slices)
    lesion_cases = dev.truth.reshape(len(dev), -1).any(axis=1)
    bins = [b for b in SIZE_BIN_NAMES if b in dev.bins]
    fast = pipeline.schedule

    print(f"`python {' '.join(sys.argv)}` (commit {git_commit()}): model {card.name}, {args.dataset} {len(dev)} slices "
          f"({int(lesion_cases.sum())} with a lesion), thresholds from {len(healthy)} healthy slices of {healthy_folder}")
    print()
    by_bin = "".join(f" {b}: Dice calibrated / oracle |" for b in bins)
    print(f"| coarse level | LPIPS size | re-sampling from | tau | anomaly threshold | Dice calibrated / oracle | AUPRC | lesion re-sampled |{by_bin}")
    print("|---" * (8 + len(bins)) + "|")
    for level, lpips_size, resample_start in [(level, size, start) for level in args.levels
                                              for size in args.lpips_sizes for start in args.resample_starts]:
        pipeline.schedule = dataclasses.replace(fast, coarse_start=level, resample_start=resample_start or fast.resample_start)
        pipeline.lpips_size = lpips_size or card.lpips_image_size
        tau, threshold, _, _ = healthy_thresholds(pipeline, healthy, 0.05, 0.01, engine.batch_size, engine.device,
                                                  torch.Generator().manual_seed(args.seed))
        pipeline.mask_threshold = tau
        generator = torch.Generator().manual_seed(args.seed)
        outputs = [pipeline(batch, generator) for batch in dev.x.split(engine.batch_size)]
        scores = torch.cat([o.anomaly_map for o in outputs])[:, 0].numpy()
        resampled = torch.cat([o.mask for o in outputs])[:, 0].numpy() > 0
        per_bin = ""
        for b in bins:
            cases = np.array([case_bin == b for case_bin in dev.bins])  # as the benchmark's per-size rows
            per_bin += f" {_dice(scores[cases], dev.truth[cases], threshold)} |"
        print(f"| {level} | {pipeline.lpips_size} | {pipeline.schedule.resample_start} | {tau:.4f} | {threshold:.4f} | {_dice(scores, dev.truth, threshold)} "
              f"| {average_precision(scores, dev.truth):.3f} | {resampled[dev.truth].mean():.0%} |{per_bin}", flush=True)


if __name__ == "__main__":
    main()
