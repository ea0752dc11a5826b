#!/usr/bin/env python3
"""What a network size costs on this machine: training step and fast-schedule inference, measured.

    python tools/training_cost.py                 # the sizes tried for the shipped models
    python tools/training_cost.py --threads 2 --steps 6

For each (grid, UNet widths) it times full AdamW training steps at batch 16
(forward, backward, update; float32, eager and channels_last) and the
inference forward, and prints a Markdown table with the two budgets of the
models issue: CPU-hours for 12,000 training steps, and seconds for the fast
schedule (25 network evaluations per slice) on a 34-slice volume. Random
inputs: the cost of a step does not depend on the data.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from AutoDDPMLib.diffusion.unet import UNet, UNetConfig
from AutoDDPMLib.provenance import git_commit

SIZES = [  # (grid, channels per level); attention at the coarsest level
    (64, (32, 64, 128, 128)),  # shipped
    (64, (64, 128, 256, 256)),
    (96, (32, 64, 128, 128)),
    (128, (32, 64, 128, 128)),
    (128, (64, 128, 256, 256)),  # about the reference's width (its 128x128 network: 18.5 M parameters)
]
BATCH = 16
TRAINING_STEPS = 12_000
FAST_EVALUATIONS, VOLUME_SLICES = 25, 34


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, kernel selection
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def _network(grid: int, channels: tuple[int, ...], layout: torch.memory_format) -> UNet:
    config = UNetConfig(image_size=grid, channels=channels, attention_levels=(False,) * (len(channels) - 1) + (True,))
    return UNet(config).to(memory_format=layout)


def training_step_seconds(network: UNet, layout: torch.memory_format, steps: int) -> float:
    """Seconds per AdamW training step (forward, backward, update) at batch 16."""
    grid = network.config.image_size
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    x = torch.rand(BATCH, 1, grid, grid).contiguous(memory_format=layout)
    t = torch.randint(500, (BATCH,))
    noise = torch.randn_like(x)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(network(x, t), noise).backward()
        optimizer.step()

    return _seconds(train_step, steps)


@torch.no_grad()
def forward_seconds(network: UNet, layout: torch.memory_format, steps: int) -> float:
    """Seconds per inference forward of one batch of 16."""
    grid = network.config.image_size
    x = torch.rand(BATCH, 1, grid, grid).contiguous(memory_format=layout)
    t = torch.randint(500, (BATCH,))
    return _seconds(lambda: network(x, t), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=4, help="timed repetitions per setting (after one warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"`python tools/training_cost.py --threads {args.threads} --steps {args.steps}` (commit {git_commit()}): "
          f"torch {torch.__version__}, {args.threads} threads, batch {BATCH}, float32\n")
    print("| grid | UNet channels | parameters | training step, eager | training step, channels_last "
          f"| {TRAINING_STEPS:,} steps (best layout) | fast schedule, {VOLUME_SLICES}-slice volume (channels_last) |")
    print("|---|---|---|---|---|---|---|")
    for grid, channels in SIZES:
        network = _network(grid, channels, torch.contiguous_format)
        parameters = sum(p.numel() for p in network.parameters())
        eager = training_step_seconds(network, torch.contiguous_format, args.steps)
        network = _network(grid, channels, torch.channels_last)
        nhwc = training_step_seconds(network, torch.channels_last, args.steps)
        forward = forward_seconds(network, torch.channels_last, args.steps)  # inference runs channels_last
        hours = TRAINING_STEPS * min(eager, nhwc) / 3600
        volume = FAST_EVALUATIONS * VOLUME_SLICES * forward / BATCH
        print(f"| {grid} | {'/'.join(map(str, channels))} | {parameters / 1e6:.1f} M | {eager:.2f} s | {nhwc:.2f} s "
              f"| {hours:.1f} h | {volume:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
