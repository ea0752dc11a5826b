#!/usr/bin/env python3
"""Interpolate the weights of a model and of its fine-tuned continuation (WiSE-FT).

    python tools/interpolate_weights.py flair-lgg RUN/snapshots/step-002400 0.5 runs/wise/wise-0.50

Writes ``(1 - alpha) * START + alpha * TUNED`` as a model bundle with TUNED's card,
its ``training`` record extended by what was interpolated. Wortsman et al. (CVPR 2022,
"Robust fine-tuning of zero-shot models") found that such a mix keeps most of the start
model's accuracy on its own distribution and most of the fine-tuned model's gain on the
new one, because both lie in one basin of the loss. Issue 17 uses it on a continuation of
`flair-lgg` with skull-strip augmentation, which gains on skull-stripped scans but loses
a little on scans with skull; ``tools/compare_checkpoints.py`` then scores the mix on the
development patients like any snapshot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from AutoDDPMLib.errors import AutoDDPMError
from AutoDDPMLib.models.bundle import load_unet, read_card, resolve_model, save_unet, write_card


def interpolated(start: dict, tuned: dict, alpha: float) -> dict:
    """``(1 - alpha) * start + alpha * tuned`` for every floating-point tensor; other tensors from ``tuned``."""
    return {name: (1 - alpha) * start[name] + alpha * t if t.is_floating_point() else t for name, t in tuned.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("start", help="the model the fine-tuning started from (a bundled name or a folder)")
    parser.add_argument("tuned", help="the fine-tuned model's folder (a training run's bundle or snapshot)")
    parser.add_argument("alpha", type=float, help="weight of the fine-tuned model, 0 (start) to 1 (tuned)")
    parser.add_argument("output", type=Path, help="folder for the interpolated bundle")
    args = parser.parse_args()
    try:
        if not 0.0 <= args.alpha <= 1.0:
            raise AutoDDPMError(f"alpha {args.alpha} is outside [0, 1]")
        start, tuned = read_card(resolve_model(args.start)), read_card(resolve_model(args.tuned))
        if start.data["unet"] != tuned.data["unet"]:
            raise AutoDDPMError(f"{start.path.parent} and {tuned.path.parent} have different networks; "
                                "interpolate only a model and its own continuation")
        start_network, network = load_unet(start), load_unet(tuned)  # each checked against its card, in float32
    except AutoDDPMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    network.load_state_dict(interpolated(start_network.state_dict(), network.state_dict(), args.alpha))
    save_unet(network, args.output)
    card = tuned.data
    card["training"]["interpolated"] = {"start": str(args.start), "tuned": str(args.tuned), "alpha": args.alpha,
                                        "command": "python tools/interpolate_weights.py " + " ".join(sys.argv[1:])}
    write_card(args.output, card)
    print(f"{args.output}: {1 - args.alpha:g} x {args.start} + {args.alpha:g} x {args.tuned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
