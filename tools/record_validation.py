#!/usr/bin/env python3
"""Record a benchmark run in its model's card (the validation that `autoddpm models` shows).

    python tools/record_validation.py Resources/Benchmark/flair-lgg-volumes
    python tools/record_validation.py Resources/Benchmark/t1-ixi-midaxial-quick --model-dir Resources/Models/t1-ixi-midaxial

An `autoddpm benchmark-volumes` run becomes the card's ``validation_volumes``
(``validation_volumes_deepbet`` when it ran with ``--postprocess deepbet``), an
`autoddpm benchmark` run its ``validation``.

The run must have been made with the thresholds the card holds now; the card
gets the default schedule's results per dataset and lesion size, with the
run's command, commit and date (see AutoDDPMLib/benchmark/validation_record.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from AutoDDPMLib.benchmark.validation_record import record_validation, record_volume_validation
from AutoDDPMLib.errors import AutoDDPMError
from AutoDDPMLib.models.bundle import bundled_models_dir
from AutoDDPMLib.models.validation import validation_headline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `autoddpm benchmark` or `benchmark-volumes` output folder (results.json, meta.json)")
    parser.add_argument("--model-dir", type=Path, default=None, help="the model bundle to write to (default: the bundled model the run names)")
    args = parser.parse_args()
    try:
        meta = json.loads((args.run / "meta.json").read_text(encoding="utf-8"))
        model_dir = args.model_dir or bundled_models_dir() / meta["model"]
        record = record_volume_validation if "found_dice" in meta else record_validation
        card = record(args.run, model_dir)
    except (AutoDDPMError, OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"record_validation: error: {exc}", file=sys.stderr)
        return 2
    settings = meta.get("postprocessing") or {}
    postprocess = "deepbet" if settings.get("brain_region") == "deepbet" else "card"
    print(f"{card.path}: {validation_headline(card, postprocess, bool(settings.get('skull_stripped_input')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
