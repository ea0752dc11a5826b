#!/usr/bin/env python3
"""Detection on the LGG development set against the noise level of AutoDDPM's coarse reconstruction.

    python tools/coarse_level_sweep.py flair-lgg ../shared/data/lgg_flair --levels 100 200 300 400

For each level the fast schedule (10 strided coarse steps, then 5 x 3 re-sampling
steps) starts its coarse reconstruction there. Both thresholds are recalibrated
at that level by `autoddpm calibrate`'s rule on healthy slices of the val
patients, so each row is what shipping that level would give. Printed on lgg-dev
(the tumour slices of every 8th training patient; never the val patients):
calibrated and oracle Dice, AUPRC, and the share of tumour pixels that the mask
step sends to re-sampling. The paper's level is 200.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from AutoDDPMLib.benchmark import load_lgg_dev, oracle_thresholds
from AutoDDPMLib.calibrate import healthy_calibration_slices, healthy_thresholds
from AutoDDPMLib.inference import AutoDDPM
from AutoDDPMLib.metrics import average_precision, best_dice, dice_at_threshold
from AutoDDPMLib.provenance import git_commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="bundled model name or model folder")
    parser.add_argument("lgg", type=Path, help="the LGG FLAIR folder with train/ (lgg-dev) and val/ (healthy slices for the thresholds)")
    parser.add_argument("--levels", type=int, nargs="+", default=[100, 200, 300, 400])
    parser.add_argument("--calibration-slices", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = AutoDDPM(args.model, device="cpu", seed=args.seed, backend="torch")
    card, pipeline = engine.card, engine.pipeline
    dev = load_lgg_dev(args.lgg / "train", card)
    healthy = healthy_calibration_slices([args.lgg / "val"], card, args.calibration_slices)
    fast = pipeline.schedule

    print(f"`python {' '.join(sys.argv)}` (commit {git_commit()}): model {card.name}, lgg-dev {len(dev)} tumour slices, "
          f"thresholds from {len(healthy)} healthy val slices")
    print()
    print("| coarse level | tau | anomaly threshold | Dice calibrated | Dice oracle | AUPRC | tumour re-sampled |")
    print("|---|---|---|---|---|---|---|")
    for level in args.levels:
        pipeline.schedule = dataclasses.replace(fast, coarse_start=level)
        tau, threshold, _, _ = healthy_thresholds(pipeline, healthy, 0.05, 0.01, engine.batch_size, engine.device,
                                                  torch.Generator().manual_seed(args.seed))
        pipeline.mask_threshold = tau
        generator = torch.Generator().manual_seed(args.seed)
        outputs = [pipeline(batch, generator) for batch in dev.x.split(engine.batch_size)]
        scores = torch.cat([o.anomaly_map for o in outputs])[:, 0].numpy()
        resampled = torch.cat([o.mask for o in outputs])[:, 0].numpy() > 0
        oracle, _ = best_dice(scores, dev.truth, oracle_thresholds(scores))
        print(f"| {level} | {tau:.4f} | {threshold:.4f} | {dice_at_threshold(scores, dev.truth, threshold):.3f} | {oracle:.3f} "
              f"| {average_precision(scores, dev.truth):.3f} | {resampled[dev.truth].mean():.0%} |", flush=True)


if __name__ == "__main__":
    main()
