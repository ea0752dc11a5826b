"""The ``autoddpm`` command line: run, demo, models, train, calibrate, benchmark.

Every command reports a problem the user can fix as one line on stderr and
exit code 2 (never a traceback); ``python -m AutoDDPMLib.cli`` is the same
program, which is how the Slicer module launches it with Slicer's Python.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AutoDDPMError


def _train(args: argparse.Namespace) -> int:
    from .train import Trainer, TrainConfig, read_checkpoint_config
    from .unet import UNetConfig

    if args.resume:
        config = read_checkpoint_config(args.output)
    else:
        if not args.data:
            raise AutoDDPMError("give the training data with --data FOLDER (or a text file listing images)")
        config = TrainConfig(
            data=[str(Path(d).resolve()) for d in args.data],
            validation_data=[str(Path(d).resolve()) for d in args.validation_data],
            name=args.name or Path(args.output).name,
            modality=args.modality,
            description=args.description,
            license=args.license,
            unet=UNetConfig(
                image_size=args.image_size,
                channels=tuple(args.channels),
                attention_levels=tuple(i == len(args.channels) - 1 for i in range(len(args.channels))),
                layers_per_block=args.layers_per_block,
            ),
            max_timestep=args.max_timestep,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
        )
    for key in ("steps", "max_minutes", "checkpoint_minutes"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    trainer = Trainer(config, Path(args.output), device=args.device)
    if args.resume:
        trainer.load_checkpoint()
    trainer.run()
    print(f"model bundle: {Path(args.output).resolve()} (step {trainer.step}, best validation MSE {trainer.best_validation:.5f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoddpm",
        description="AutoDDPM: unsupervised anomaly detection in brain MRI with diffusion models (mask, stitch, re-sample).",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: all cores)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a healthy-brain model and write a model bundle")
    train.add_argument("--data", action="append", default=[], help="folder of healthy images/volumes (with optional *_mask lesion masks) or a text file listing them; repeatable")
    train.add_argument("--output", required=True, help="model bundle folder to write (checkpoints go in its checkpoint/ subfolder)")
    train.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --output")
    train.add_argument("--validation-data", action="append", default=[], help="held-out healthy data for picking the best checkpoint (default: slices held out of --data)")
    train.add_argument("--name", default=None, help="model name for its card (default: the output folder's name)")
    train.add_argument("--modality", default="unknown", help="e.g. FLAIR or T1, recorded in the card")
    train.add_argument("--description", default="", help="one line for the card")
    train.add_argument("--license", default="see the training data's license", help="license of the weights (follows the training data)")
    train.add_argument("--image-size", type=int, default=64, help="model grid in pixels (default 64)")
    train.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 128], help="UNet width per level; attention at the coarsest")
    train.add_argument("--layers-per-block", type=int, default=1)
    train.add_argument("--max-timestep", type=int, default=500, help="train noise levels 0..N-1 only (default 500: AutoDDPM uses <= 200, the baselines <= 500)")
    train.add_argument("--steps", type=int, default=None, help="optimiser steps in all (default 20000)")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--learning-rate", type=float, default=2e-4)
    train.add_argument("--checkpoint-minutes", type=float, default=None, help="minutes between checkpoints (default 5)")
    train.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this many minutes (resume later)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (under torchrun: one GPU per process)")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(handler=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``autoddpm`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return args.handler(args)
    except AutoDDPMError as error:
        print(f"autoddpm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoddpm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
