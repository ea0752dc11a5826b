#!/usr/bin/env python3
"""How much of a tumour does step 1 send to re-sampling, and what do repeats add? Swept on the LGG development patients.

    python tools/mask_step_sweep.py --data ../shared/data --cache runs/pp-cache

Starting from ``flair-lgg``'s step 1 before this sweep (fast schedule, tau at 5 %
of healthy tissue, the paper's 3-pixel dilation, re-sampling from level 150), one setting
is changed at a time: the share of healthy tissue tau sends to re-sampling
(``--mask-fractions``; tau recalibrated on the card's healthy validation slices
as ``autoddpm calibrate`` does), the dilation of the mask on the model grid
(``--dilations``), the level the coarse reconstruction and the re-sampling start
from (``--resample-starts``, up to the model's 499), and the number of repeats
averaged (``--repeats``); ``--combined`` moves tau's share and the dilation together.
Each variant runs the development and validation
volumes as ``autoddpm run`` does (outputs cached in ``--cache``), post-processes
the map as the card says, calibrates the threshold on the validation patients'
healthy voxels and scores the development patients only (tools/postprocess_sweep.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from postprocess_sweep import Volume, cache_files, compute_cache, evaluate, patients

from AutoDDPMLib.detection.inference import AutoDDPM
from AutoDDPMLib.detection.postprocessing import PostProcessing
from AutoDDPMLib.training.calibrate import coarse_likelihood, healthy_calibration_slices, healthy_tau
from AutoDDPMLib.volumes.slices import FOREGROUND_LEVEL

# Where the sweep starts from: flair-lgg's step 1 before it (the fast schedule now dilates by 9, chosen here).
SHIPPED = dict(mask_fraction=0.05, dilation=3, resample_start=None, repeats=1)


def variant_name(mask_fraction: float, dilation: int, resample_start: int | None, repeats: int) -> str:
    """The cache folder of a variant; the shipped one uses the folder tools/postprocess_sweep.py fills."""
    if (mask_fraction, dilation, resample_start) == (0.05, 3, None):
        return ""
    return f"tau{mask_fraction:g}-dilation{dilation}-start{resample_start or 'card'}"


def configure(engine: AutoDDPM, mask_fraction: float, dilation: int, resample_start: int | None) -> float:
    """Set the engine's pipeline to the variant, recalibrating tau when its step 1 changed; returns tau."""
    pipeline = engine.pipeline
    pipeline.schedule = dataclasses.replace(pipeline.schedule, mask_dilation=dilation)
    if resample_start is not None:
        pipeline.schedule = dataclasses.replace(pipeline.schedule, resample_start=resample_start,
                                                coarse_start=max(pipeline.schedule.coarse_start, resample_start))
    if mask_fraction != SHIPPED["mask_fraction"] or resample_start is not None:
        card = engine.card
        slices = healthy_calibration_slices(card.data["thresholds"]["calibration"]["data"], card, 128)
        batches = [batch.to(engine.device) for batch in slices.split(engine.batch_size)]
        _, likelihood = coarse_likelihood(pipeline, batches, torch.Generator().manual_seed(0))
        pipeline.mask_threshold = healthy_tau(likelihood, slices > FOREGROUND_LEVEL, mask_fraction)
    return pipeline.mask_threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flair-lgg")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--mask-fractions", type=float, nargs="*", default=[0.10, 0.20])
    parser.add_argument("--dilations", type=int, nargs="*", default=[5, 7, 9, 11, 13])
    parser.add_argument("--resample-starts", type=int, nargs="*", default=[250, 350, 499])
    parser.add_argument("--repeats", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--combined", nargs="*", default=[], metavar="FRACTION:DILATION",
                        help="tau's healthy share and the dilation changed together, e.g. 0.1:5")
    args = parser.parse_args()

    variants = [dict(SHIPPED)]
    variants += [dict(SHIPPED, mask_fraction=f) for f in args.mask_fractions]
    variants += [dict(SHIPPED, dilation=d) for d in args.dilations]
    variants += [dict(SHIPPED, resample_start=s) for s in args.resample_starts]
    variants += [dict(SHIPPED, repeats=n) for n in args.repeats]
    for pair in args.combined:
        fraction, dilation = pair.split(":")
        variants.append(dict(SHIPPED, mask_fraction=float(fraction), dilation=int(dilation)))
    splits = patients(args.data)
    print("| tau: healthy share | dilation (px) | re-sampling from | repeats | tau | tumour re-sampled | threshold | "
          "Dice (pooled) | AUPRC | median patient Dice | found (Dice > 0.1) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in variants:
        engine = AutoDDPM(args.model, seed=0)
        settings = PostProcessing.from_dict(engine.card.postprocessing)
        tau = configure(engine, variant["mask_fraction"], variant["dilation"], variant["resample_start"])
        cache = args.cache / engine.card.name / engine.schedule_name / variant_name(
            variant["mask_fraction"], variant["dilation"], variant["resample_start"], variant["repeats"])
        for split, pairs in splits.items():
            compute_cache(engine, pairs, cache / split, variant["repeats"])
        volumes = {split: [Volume(image, mask, engine.card, cache_files(cache / split, image, variant["repeats"]))
                           for image, mask in pairs] for split, pairs in splits.items()}
        raw = {(v.name, settings.polarity): v.raw_map(settings.polarity) for v in volumes["dev"] + volumes["val"]}
        row = evaluate(settings, volumes["dev"], volumes["val"], raw, 0.01)
        resampled = sum(v.tumour_resampled() for v in volumes["dev"]) / len(volumes["dev"])
        start = variant["resample_start"] or engine.card.schedule(engine.schedule_name).resample_start
        print(f"| {variant['mask_fraction']:.0%} | {variant['dilation']} | {start} | {variant['repeats']} | {tau:.4f} | "
              f"{resampled:.0%} | {row['threshold']:.4f} | {row['dice']:.3f} | {row['auprc']:.3f} | "
              f"{row['patient_dice_median']:.3f} | {row['found']}/{row['patients']} |", flush=True)


if __name__ == "__main__":
    main()
