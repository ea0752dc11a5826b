#!/usr/bin/env python3
"""Write the LGG development patients as whole volumes, as given or skull-stripped, for `autoddpm benchmark-volumes`.

    python tools/dev_volumes.py --data ../shared/data --output runs/lgg-dev-volumes
    python tools/dev_volumes.py --data ../shared/data --output runs/lgg-dev-volumes-stripped --stripped
    autoddpm benchmark-volumes --data runs/lgg-dev-volumes-stripped --output-dir runs/bench-dev-stripped
    python tools/dev_volumes.py --data ../shared/data --output runs/lgg-val-volumes-stripped --stripped --split val

The patients are lgg-dev's (every 8th training patient with a tumour mask, which
training never saw; tools/postprocess_sweep.py ``patients``). ``--stripped`` sets
each volume to 0 outside the brain region the engine computes with the model
card (the head eroded by its ``brain_erosion_mm``), as the slice benchmark's
``lgg-dev-stripped`` does (benchmark.datasets ``skull_stripped``), so that issue
17's skull-stripped criterion can be measured on whole volumes with the card's
post-processing, away from the validation patients. ``--split val`` writes the
validation patients instead, for the one run that judges a change shipped for
skull-stripped inputs (chosen on the development patients).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))
from postprocess_sweep import patients  # noqa: E402

from AutoDDPMLib.models.bundle import read_card, resolve_model  # noqa: E402
from AutoDDPMLib.volumes.head_region import skull_stripped, strip_erosion_mm  # noqa: E402
from AutoDDPMLib.volumes.slices import AxialStack  # noqa: E402
from AutoDDPMLib.volumes.volume_io import read_volume  # noqa: E402


def write_stripped(image_path: Path, target: Path, card) -> None:
    """``image_path`` set to 0 outside ``card``'s brain region (12 mm without one), written to ``target``."""
    stack = AxialStack.from_image(read_volume(image_path))
    stripped = skull_stripped(stack.array, stack.spacing, card.intensity_percentiles, strip_erosion_mm(card.postprocessing))
    sitk.WriteImage(stack.to_image(stripped), str(target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the project's data folder (../shared/data)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--stripped", action="store_true", help="0 outside the card's brain region")
    parser.add_argument("--model", default=None, help="the card whose brain region strips (default: flair-lgg)")
    parser.add_argument("--split", default="dev", choices=["dev", "val"],
                        help="dev: the development patients (default); val: the validation patients, to judge a change once")
    args = parser.parse_args()
    card = read_card(resolve_model(args.model))
    erosion_mm = strip_erosion_mm(card.postprocessing)
    args.output.mkdir(parents=True, exist_ok=True)
    chosen = patients(args.data)[args.split]
    for image_path, mask_path in chosen:
        shutil.copy(mask_path, args.output / mask_path.name)
        target = args.output / image_path.name
        if args.stripped:
            write_stripped(image_path, target, card)
        else:
            shutil.copy(image_path, target)
    print(f"{len(chosen)} {'development' if args.split == 'dev' else 'validation'} patients in {args.output}"
          + (f", skull-stripped to the head region eroded {erosion_mm:g} mm" if args.stripped else ""))


if __name__ == "__main__":
    main()
