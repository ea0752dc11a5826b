"""``autoddpm benchmark-speed``: how fast the network forward runs, to choose the default batch size and backend.

The network is timed alone at the card's image size (every sampling step is
one forward on a batch of slices), for each backend

* ``eager``: plain PyTorch, float32;
* ``channels_last``: float32 with NHWC memory layout (often faster convolutions on CPUs and GPUs);
* ``bfloat16`` (CPU) / ``float16`` (CUDA, MPS): autocast to half precision;
* ``compile``: ``torch.compile`` of the float32 network (optional; skipped with
  a note when it is unavailable or fails, e.g. without a C++ compiler),

and each batch size (1, 4, 8, 16, 32 by default). Prints a table and writes
speed.json and speed.md; the recommendation is the fastest (backend, batch size)
per slice, and the smallest batch within 10% of it. Half precision changes the
numbers a little: its largest deviation from the float32 output is reported.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional


def _log(message: str) -> None:
    print(f"[speed] {message}", file=sys.stderr, flush=True)


def _time_forward(fn: Callable, x, t, sync: Callable, min_seconds: float, max_repeats: int, warmup: int = 2) -> float:
    """Median seconds per call after ``warmup`` calls, repeating until ``min_seconds`` or ``max_repeats``."""
    for _ in range(warmup):
        fn(x, t)
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < 3 or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn(x, t)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def run_speed(
    model: Optional[str] = None,
    device: str = "auto",
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32),
    backends: tuple[str, ...] = ("eager", "channels_last", "half", "compile"),
    min_seconds: float = 1.0,
    max_repeats: int = 20,
    output_dir: Optional[str | Path] = None,
) -> list[dict]:
    """Time the card's network forward for each backend and batch size; returns the rows."""
    import torch

    from .bundle import load_unet, read_card, resolve_model
    from .devices import select_device

    folder = resolve_model(model)
    card = read_card(folder)
    dev = select_device(device)
    network = load_unet(card, dev)
    n = card.image_size
    parameters = sum(p.numel() for p in network.parameters())
    half_dtype = torch.bfloat16 if dev.type == "cpu" else torch.float16

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    notes = []
    generator = torch.Generator().manual_seed(0)
    reference_out = {}

    def make(backend: str) -> Optional[Callable]:
        if backend == "eager":
            net = network.to(memory_format=torch.contiguous_format)
            return lambda x, t: net(x, t)
        if backend == "channels_last":
            net = network.to(memory_format=torch.channels_last)
            return lambda x, t: net(x.contiguous(memory_format=torch.channels_last), t)
        if backend == "half":
            net = network.to(memory_format=torch.contiguous_format)

            def run(x, t):
                with torch.autocast(device_type=dev.type, dtype=half_dtype):
                    return net(x, t)

            return run
        if backend == "compile":
            if not hasattr(torch, "compile"):
                notes.append("torch.compile: not available in this PyTorch")
                return None
            try:
                compiled = torch.compile(network.to(memory_format=torch.contiguous_format), dynamic=False)
                x0 = torch.rand(2, 1, n, n, generator=generator).to(dev)
                compiled(x0, torch.zeros(2, dtype=torch.long, device=dev))
                return lambda x, t: compiled(x, t)
            except Exception as error:  # any backend failure: report it, keep the other results
                first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                notes.append(f"torch.compile failed and was skipped: {type(error).__name__}: {first}")
                return None
        raise ValueError(f"unknown backend '{backend}'")

    rows = []
    with torch.inference_mode():
        for backend in backends:
            t_start = time.perf_counter()
            fn = make(backend)
            if fn is None:
                continue
            setup = time.perf_counter() - t_start
            label = {"half": str(half_dtype).replace("torch.", "")}.get(backend, backend)
            for batch in batch_sizes:
                x = torch.rand(batch, 1, n, n, generator=generator).to(dev)
                t = torch.randint(0, card.max_timestep + 1, (batch,), generator=generator).to(dev)
                try:
                    seconds = _time_forward(fn, x, t, sync, min_seconds, max_repeats)
                    out = fn(x, t).float()
                except Exception as error:  # e.g. out of memory at a large batch
                    notes.append(f"{label} at batch {batch} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
                    continue
                if backend == "eager":
                    reference_out[batch] = out
                deviation = float((out - reference_out[batch]).abs().max()) if batch in reference_out else None
                row = {
                    "backend": label,
                    "batch_size": batch,
                    "ms_per_forward": round(1000 * seconds, 3),
                    "ms_per_slice": round(1000 * seconds / batch, 3),
                    "slices_per_second": round(batch / seconds, 1),
                    "max_abs_deviation_from_eager": None if deviation is None else round(deviation, 6),
                    "setup_seconds": round(setup, 2),
                }
                rows.append(row)
                _log(f"{label:>14} batch {batch:>3}: {row['ms_per_forward']:9.2f} ms/forward  {row['ms_per_slice']:8.2f} ms/slice")
    network.to(memory_format=torch.contiguous_format)

    best = min(rows, key=lambda r: r["ms_per_slice"]) if rows else None
    good_enough = None
    if best:
        same = [r for r in rows if r["backend"] == best["backend"] and r["ms_per_slice"] <= 1.1 * best["ms_per_slice"]]
        good_enough = min(same, key=lambda r: r["batch_size"])
    meta = {
        "model": card.name,
        "model_path": str(folder),
        "image_size": n,
        "parameters": parameters,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "best": best,
        "smallest_batch_within_10_percent": good_enough,
        "notes": notes,
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
        (out / "speed.md").write_text(speed_markdown(rows, meta), encoding="utf-8")
    print(speed_markdown(rows, meta))
    return rows


def speed_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# AutoDDPM network speed",
        "",
        f"- Model: `{meta['model']}`, {meta['image_size']}x{meta['image_size']}, {meta['parameters'] / 1e6:.2f} M parameters",
        f"- Device: {meta['device']}, torch {meta['torch']}, {meta['date']}",
        "",
        "| backend | batch | ms / forward | ms / slice | slices / s | max deviation from eager |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        dev = "–" if r["max_abs_deviation_from_eager"] is None else f"{r['max_abs_deviation_from_eager']:.2e}"
        lines.append(f"| {r['backend']} | {r['batch_size']} | {r['ms_per_forward']:.2f} | {r['ms_per_slice']:.2f} | {r['slices_per_second']:.1f} | {dev} |")
    if meta["best"]:
        b, g = meta["best"], meta["smallest_batch_within_10_percent"]
        lines += ["", f"Fastest per slice: **{b['backend']}, batch {b['batch_size']}** ({b['ms_per_slice']:.2f} ms/slice); "
                  f"smallest batch within 10%: {g['backend']}, batch {g['batch_size']} ({g['ms_per_slice']:.2f} ms/slice)."]
    if meta["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="bundled model name or model bundle folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its first compilation can take minutes)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time each setting for at least this long (default 1 s)")
    parser.add_argument("--output-dir", default=None, help="also write speed.json and speed.md here")


def speed_main(args: argparse.Namespace) -> int:
    backends = ("eager", "channels_last", "half") + (() if args.no_compile else ("compile",))
    run_speed(args.model, args.device, tuple(args.batch_sizes), backends, args.min_seconds, output_dir=args.output_dir)
    return 0
