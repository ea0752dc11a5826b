"""``autoddpm benchmark-speed``: how fast the network forward runs, to choose the default batch size and backend.

The network is timed alone at the card's image size (every sampling step is
one forward on a batch of slices), for each backend

* ``eager``: plain PyTorch, float32;
* ``channels_last``: float32 with NHWC memory layout (often faster convolutions on CPUs and GPUs);
* ``bfloat16`` (CPU) / ``float16`` (CUDA, MPS): autocast to half precision;
* ``compile``: ``torch.compile`` of the float32 network (with ``--compile``:
  compiling takes minutes per batch size on a small CPU, reported as
  ``first_call_seconds``; skipped with a note when it is unavailable or fails,
  e.g. without a C++ compiler);
* ``onnxruntime`` (CPU only): the float32 network exported to ONNX and run by
  ONNX Runtime's CPUExecutionProvider with as many threads as PyTorch; needs the
  optional packages ``pip install "autoddpm[onnx]"`` (onnxruntime and onnx),
  skipped with a note when they are missing, the export fails or the device is
  not the CPU,

and each batch size (1, 4, 8, 16, 32 by default). Prints a table and writes
speed.json and speed.md; the recommendation is the fastest (backend, batch size)
per slice, and the smallest batch within 10% of it. Half precision changes the
numbers a little, and ONNX Runtime very little: each backend's largest
deviation from the float32 eager output is reported.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..provenance import command_line, git_commit


def _log(message: str) -> None:
    print(f"[speed] {message}", file=sys.stderr, flush=True)


def _failure_note(backend: str, error: Exception) -> str:
    """One line for the report when a backend cannot be built: the others' results are kept."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return f"{backend} failed and was skipped: {type(error).__name__}: {first}"


def run_speed(
    model: Optional[str] = None,
    device: str = "auto",
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32),
    backends: tuple[str, ...] = ("eager", "channels_last", "half", "compile", "onnxruntime"),
    min_seconds: float = 1.0,
    max_repeats: int = 20,
    output_dir: Optional[str | Path] = None,
    command: Optional[str] = None,
) -> list[dict]:
    """Time the card's network forward for each backend and batch size; returns the rows."""
    import torch

    from ..diffusion.devices import describe_device, select_device
    from ..diffusion.onnx_backend import onnxruntime_forward, unavailable_reason
    from ..models.bundle import load_unet, read_card, resolve_model

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
    try:
        load = tuple(round(v, 2) for v in os.getloadavg())
    except (OSError, AttributeError):
        load = None
    generator = torch.Generator().manual_seed(0)

    def make(backend: str) -> Optional[Callable]:
        # Each backend gets its own copy: channels_last converts a module in place.
        net = copy.deepcopy(network)
        if backend == "eager":
            return lambda x, t: net(x, t)
        if backend == "channels_last":
            net = net.to(memory_format=torch.channels_last)
            return lambda x, t: net(x.contiguous(memory_format=torch.channels_last), t)
        if backend == "half":
            def run(x, t):
                with torch.autocast(device_type=dev.type, dtype=half_dtype):
                    return net(x, t)

            return run
        if backend == "compile":
            if not hasattr(torch, "compile"):
                notes.append("torch.compile: not available in this PyTorch")
                return None
            try:
                compiled = torch.compile(net, dynamic=False)
                x0 = torch.rand(2, 1, n, n, generator=generator).to(dev)
                compiled(x0, torch.zeros(2, dtype=torch.long, device=dev))
                return lambda x, t: compiled(x, t)
            except Exception as error:  # any backend failure: report it, keep the other results
                notes.append(_failure_note("torch.compile", error))
                return None
        if backend == "onnxruntime":
            reason = unavailable_reason(dev)
            if reason:
                notes.append(f"onnxruntime: skipped, {reason}")
                return None
            try:
                return onnxruntime_forward(network, n, network.config.in_channels)
            except Exception as error:  # export or session failure: report it, keep the other results
                notes.append(_failure_note("onnxruntime", error))
                return None
        raise ValueError(f"unknown backend '{backend}'")

    rows = []
    with torch.inference_mode():
        functions, setups = {}, {}
        for backend in backends:
            label = {"half": str(half_dtype).replace("torch.", "")}.get(backend, backend)
            t_start = time.perf_counter()
            fn = make(backend)
            if fn is not None:
                functions[label], setups[label] = fn, time.perf_counter() - t_start
        # Backends are timed in turns at each batch size, so a change in load hits them alike.
        for batch in batch_sizes:
            x = torch.rand(batch, 1, n, n, generator=generator).to(dev)
            t = torch.randint(0, card.max_timestep + 1, (batch,), generator=generator).to(dev)
            outputs, first_call = {}, {}
            for label, fn in list(functions.items()):
                try:
                    t0 = time.perf_counter()
                    outputs[label] = fn(x, t).float()  # also the warm-up (torch.compile compiles here per shape)
                    sync()
                    first_call[label] = time.perf_counter() - t0
                except Exception as error:  # e.g. out of memory at a large batch
                    notes.append(f"{label} at batch {batch} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            active = [label for label in functions if label in outputs]
            times: dict[str, list[float]] = {label: [] for label in active}
            started = time.perf_counter()
            for repeat in range(max_repeats):
                for label in active:
                    t0 = time.perf_counter()
                    functions[label](x, t)
                    sync()
                    times[label].append(time.perf_counter() - t0)
                if repeat >= 2 and time.perf_counter() - started > min_seconds * len(active):
                    break
            reference = outputs.get("eager")
            for label in active:
                seconds = float(np.median(times[label]))
                row = {
                    "backend": label,
                    "batch_size": batch,
                    "ms_per_forward": round(1000 * seconds, 3),
                    "ms_per_slice": round(1000 * seconds / batch, 3),
                    "slices_per_second": round(batch / seconds, 1),
                    "repeats": len(times[label]),
                    "max_abs_deviation_from_eager": None if reference is None else round(float((outputs[label] - reference).abs().max()), 6),
                    "setup_seconds": round(setups[label], 2),
                    "first_call_seconds": round(first_call[label], 2),
                }
                rows.append(row)
                _log(f"{label:>14} batch {batch:>3}: {row['ms_per_forward']:9.2f} ms/forward  {row['ms_per_slice']:8.2f} ms/slice")
            eager_row = next((r for r in rows if r["backend"] == "eager" and r["batch_size"] == batch), None)
            for label in active:
                row = next(r for r in rows if r["backend"] == label and r["batch_size"] == batch)
                if eager_row is not None and label != "eager" and row["ms_per_forward"] > 3 * eager_row["ms_per_forward"]:
                    notes.append(f"{label}: {row['ms_per_forward'] / eager_row['ms_per_forward']:.0f}x slower than eager at batch {batch} on this device; larger batches not timed")
                    del functions[label]

    best = min(rows, key=lambda r: r["ms_per_slice"]) if rows else None
    good_enough = None
    if best:
        same = [r for r in rows if r["backend"] == best["backend"] and r["ms_per_slice"] <= 1.1 * best["ms_per_slice"]]
        good_enough = min(same, key=lambda r: r["batch_size"])
    meta = {
        "command": command or "autoddpm benchmark-speed",
        "commit": git_commit(),
        "model": card.name,
        "model_path": str(folder),
        "image_size": n,
        "parameters": parameters,
        "device": describe_device(dev),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "best": best,
        "smallest_batch_within_10_percent": good_enough,
        "load_average_at_start": load,
        "notes": notes,
    }
    if load is not None and load[0] > 0.5:
        notes.append(f"load average {load[0]:.1f} when the timing started: other processes shared the device, so these times are pessimistic")
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
        f"- Command: `{meta['command']}`",
        f"- Commit: `{meta['commit']}`",
        f"- Model: `{meta['model']}`, {meta['image_size']}x{meta['image_size']}, {meta['parameters'] / 1e6:.2f} M parameters",
        f"- Device: {meta['device']}, torch {meta['torch']}, {meta['date']}",
        "",
        "| backend | batch | ms / forward | ms / slice | slices / s | max deviation from eager | first call (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dev = "–" if r["max_abs_deviation_from_eager"] is None else f"{r['max_abs_deviation_from_eager']:.2e}"
        lines.append(f"| {r['backend']} | {r['batch_size']} | {r['ms_per_forward']:.2f} | {r['ms_per_slice']:.2f} | {r['slices_per_second']:.1f} | {dev} | {r['first_call_seconds']:.1f} |")
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
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (compiling takes minutes per batch size on a small CPU)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time each setting for at least this long (default 1 s)")
    parser.add_argument("--output-dir", default=None, help="also write speed.json and speed.md here")


def speed_main(args: argparse.Namespace) -> int:
    backends = ("eager", "channels_last", "half") + (("compile",) if args.compile else ()) + ("onnxruntime",)
    run_speed(args.model, args.device, tuple(args.batch_sizes), backends, args.min_seconds, output_dir=args.output_dir,
              command=command_line("benchmark-speed"))
    return 0
