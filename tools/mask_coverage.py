#!/usr/bin/env python3
"""Which lesions does AutoDDPM's mask step reach? Step 1 diagnostics per lesion-size bin.

    python tools/mask_coverage.py t1-ixi-midaxial ../shared/data/ixi_t1_midaxial/val --max-images 8
    python tools/mask_coverage.py flair-lgg ../shared/data/lgg_flair/train --dataset lgg-dev

Runs the fast schedule on the benchmark's IXI cases (the same seeded lesions as
``autoddpm benchmark --quick``), or on its LGG development set (the tumour slices
of every 8th training patient, expert masks), and prints, per size bin: the lesion sizes on
the model grid, the likelihood map M inside the lesion against tau, how much of
the lesion (and of healthy tissue) the dilated mask sends to re-sampling, and
the anomaly map inside the lesion against the card's threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from AutoDDPMLib.benchmark.datasets import load_ixi, load_lgg_dev
from AutoDDPMLib.detection.inference import AutoDDPM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="bundled model name or model folder")
    parser.add_argument("data", type=Path, help="folder of healthy IXI PNG slices, or of LGG training volumes with --dataset lgg-dev")
    parser.add_argument("--dataset", choices=("ixi", "lgg-dev"), default="ixi")
    parser.add_argument("--max-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    engine = AutoDDPM(args.model, device="cpu", seed=args.seed)
    if args.dataset == "ixi":
        cases = load_ixi(args.data, engine.card, args.max_images, args.seed)
    else:
        cases = load_lgg_dev(args.data, engine.card)
    out = engine.pipeline(cases.x, torch.Generator().manual_seed(args.seed))
    likelihood, mask, anomaly = (t[:, 0].numpy() for t in (out.likelihood_map, out.mask, out.anomaly_map))
    tissue = cases.foreground
    print(f"model {engine.card.name}, tau {engine.pipeline.mask_threshold:.4f}, anomaly threshold {engine.threshold:.4f}")
    print("| size bin | lesion pixels (model grid) | M in lesion: mean / peak (average over cases) | M in healthy tissue: 95th pct "
          "| lesion re-sampled | healthy tissue re-sampled | A in lesion: mean |")
    print("|---|---|---|---|---|---|---|")
    for size in ("small", "medium", "large"):
        idx = [i for i, b in enumerate(cases.bins) if b == size]
        if not idx:
            continue
        lesion = cases.truth[idx]
        healthy = tissue[idx] & ~lesion
        peak = np.mean([likelihood[i][cases.truth[i]].max() for i in idx])
        print(f"| {size} | {int(lesion.sum(axis=(1, 2)).min())}-{int(lesion.sum(axis=(1, 2)).max())} "
              f"| {likelihood[idx][lesion].mean():.3f} / {peak:.3f} | {np.percentile(likelihood[idx][healthy], 95):.3f} "
              f"| {mask[idx][lesion].mean():.0%} | {mask[idx][healthy].mean():.0%} | {anomaly[idx][lesion].mean():.4f} |")


if __name__ == "__main__":
    main()
