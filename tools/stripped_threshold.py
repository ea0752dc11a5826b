#!/usr/bin/env python3
"""Would a threshold calibrated on skull-stripped volumes make `flair-lgg` work on skull-stripped scans?

    python tools/stripped_threshold.py --data ../shared/data --work runs/stripped-threshold

Both the development patients (lgg-dev) and the validation patients are
stripped as tools/dev_volumes.py and `autoddpm calibrate --with-stripped` strip
them (0 outside the head eroded by the card's ``brain_erosion_mm``;
LabelledVolume's ``skull_stripped``). Each volume's map is made once, as `autoddpm run`
makes it (fast schedule, the card's polarity), and post-processed with the
card's head region and with deepbet's; for each region a threshold is calibrated
on the stripped validation volumes' healthy voxels (1%, as the card's), and the
stripped development patients are scored at it, beside the card's threshold
(calibrated on volumes with skull). The validation patients' tumours are never
scored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from postprocess_sweep import patients  # noqa: E402

from AutoDDPMLib.benchmark.volume_benchmark import score  # noqa: E402
from AutoDDPMLib.detection.inference import AutoDDPM  # noqa: E402
from AutoDDPMLib.detection.map_filters import anomaly_mask, postprocess_map  # noqa: E402
from AutoDDPMLib.detection.postprocessing import PostProcessing, option_settings  # noqa: E402
from AutoDDPMLib.training.volume_calibration import LabelledVolume, calibrate_volume_threshold  # noqa: E402
from AutoDDPMLib.volumes.slices import AxialStack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="where the raw maps are kept")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    engine = AutoDDPM(args.model, postprocess="none")  # the raw map, with the card's polarity set below
    card = engine.card
    engine.pipeline.polarity = PostProcessing.from_dict(card.postprocessing).polarity
    split_pairs = patients(args.data)
    cases = {split: [LabelledVolume(image, mask, card, skull_stripped=True) for image, mask in pairs]
             for split, pairs in split_pairs.items()}
    raw = {}
    for split, volumes in cases.items():
        for case in volumes:
            cached = args.work / f"{case.name}_raw.npy"
            if not cached.exists():
                np.save(cached, AxialStack.from_image(engine.process_volume(case.image).anomaly_map).array)
            raw[case.name] = np.load(cached)
            print(f"{split} {case.name}: raw map", flush=True)
    print(f"\n`python tools/stripped_threshold.py {' '.join(sys.argv[1:])}`; model {card.name}; "
          f"{len(cases['dev'])} stripped lgg-dev patients scored\n")
    print("| region | threshold from | threshold | Dice (pooled) | AUPRC | median patient Dice | found (Dice > 0.1) |")
    print("|---|---|---|---|---|---|---|")
    for option in ("card", "deepbet"):
        settings_dict = option_settings(option, card.postprocessing)
        settings = PostProcessing.from_dict(settings_dict)

        def post(case: LabelledVolume) -> np.ndarray:
            return postprocess_map(raw[case.name], case.slices01, case.spacing, settings, case.array)[0]

        val_maps = [post(case) for case in cases["val"]]
        stripped_threshold, _ = calibrate_volume_threshold(
            val_maps, [c.healthy for c in cases["val"]], [c.spacing for c in cases["val"]], settings)
        dev_maps = [post(case) for case in cases["dev"]]
        for source, threshold in (("the card (volumes with skull)", card.run_threshold(engine.schedule_name, settings_dict)),
                                  ("stripped validation volumes", stripped_threshold)):
            masks = [anomaly_mask(m, threshold, c.spacing, settings) for m, c in zip(dev_maps, cases["dev"])]
            row = score(option, cases["dev"], dev_maps, masks, threshold)
            print(f"| {settings.describe()} | {source} | {threshold:.4g} | {row['dice']:.3f} | {row['auprc']:.3f} | "
                  f"{row['patient_dice_median']:.3f} | {row['found']}/{row['patients']} |", flush=True)


if __name__ == "__main__":
    main()
