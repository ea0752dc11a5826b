"""``autoddpm benchmark-merge``: one report from benchmark runs of different methods (``--methods``).

A full run reconstructs every slice from up to 500 noise levels with every
baseline: more CPU hours than a laptop, or a working session, may give in one
go. Split by method (a method's rows depend only on its own maps and its own
threshold, and its noise only on its place in the full method list), the pieces
run apart and are joined here into the report the one run would have written.
Only runs with the same identity (model weights and card, engine source, seed,
batch size, backend, device, cases) are joined, and never one method twice.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Optional

from ..errors import AutoDDPMError
from ..provenance import command_line
from .report import read_run, write_figures, write_run
from .scoring import BIN_ORDER

_SPLIT_NOTE = "Methods of this run:"


def _read_run(folder: Path) -> tuple[dict, list[dict]]:
    rows, meta = read_run(folder)
    if "identity" not in meta:
        raise AutoDDPMError(f"{folder} was written by an older `autoddpm benchmark` that did not record what made it: run it again")
    return meta, rows


def merge_benchmarks(run_dirs: list[str | Path], output_dir: str | Path, command: Optional[str] = None,
                     figures: bool = True) -> list[dict]:
    """Join benchmark runs of different methods of one benchmark into ``output_dir``; returns the rows.

    Writes results.json, meta.json, results.md and tradeoff.png as ``autoddpm benchmark``
    does; examples.png (AutoDDPM fast's cases) is copied from the run that made it.
    """
    folders = [Path(d) for d in run_dirs]
    output_dir = Path(output_dir)
    if any(f.resolve() == output_dir.resolve() for f in folders):
        raise AutoDDPMError(f"--output-dir {output_dir} is one of the runs to join: choose another folder")
    runs = [(f, *_read_run(f)) for f in folders]
    identities = {meta["identity"] for _, meta, _ in runs}
    if len(identities) > 1:
        by_identity = "; ".join(f"{f}: {meta['identity'][:8]} (commit {meta['commit']}, {meta['model']})" for f, meta, _ in runs)
        raise AutoDDPMError("these runs are of different benchmarks (model, engine, seed, batch size, backend, device or "
                            f"cases differ) and cannot be joined: {by_identity}")
    seen: dict[str, Path] = {}
    for folder, meta, _ in runs:
        for name in meta["methods"]:
            if name in seen:
                raise AutoDDPMError(f"{name} was run by both {seen[name]} and {folder}: join each method once")
            seen[name] = folder

    first = runs[0][1]
    order = first["method_order"]
    missing = [name for name in order if name not in seen]
    datasets: list[str] = []
    for _, _, rows in runs:
        datasets += [r["dataset"] for r in rows if r["dataset"] not in datasets]
    rows = sorted((r for _, _, rows in runs for r in rows),
                  key=lambda r: (datasets.index(r["dataset"]), BIN_ORDER.index(r["size_bin"]), order.index(r["method"])))

    notes = list(dict.fromkeys(n for _, meta, _ in runs for n in meta["notes"] if not n.startswith(_SPLIT_NOTE)))
    notes.append(f"Joined from {len(runs)} runs of this benchmark, each of some of its methods (`autoddpm benchmark --methods`): "
                 + "; ".join(f"`{meta['command']}` ({meta['date']}, {meta['wall_seconds']:.0f} s)" for _, meta, _ in runs)
                 + ". Wall time is their sum, peak memory the largest.")
    if missing:
        notes.append(f"Not run (no rows): {', '.join(missing)}.")
    meta = {
        **first,
        "command": command or "autoddpm benchmark-merge",
        "date": max(meta["date"] for _, meta, _ in runs),
        "methods": [name for name in order if name in seen],
        "peak_rss_mb": max(meta["peak_rss_mb"] for _, meta, _ in runs),
        "wall_seconds": round(sum(meta["wall_seconds"] for _, meta, _ in runs), 1),
        "notes": notes,
        "merged": [{key: meta[key] for key in ("command", "date", "methods", "wall_seconds", "peak_rss_mb")} | {"folder": str(f)}
                   for f, meta, _ in runs],
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    figure_names = []
    if figures:
        examples = [f / "examples.png" for f, meta, _ in runs if (f / "examples.png").is_file()]
        if examples:
            shutil.copyfile(examples[0], output_dir / "examples.png")
            figure_names.append("examples.png")
        try:
            figure_names += write_figures(output_dir, rows, {})
        except ImportError:
            meta["notes"].append("matplotlib is not installed: no trade-off figure (pip install matplotlib).")
    write_run(output_dir, rows, meta, figure_names)
    return rows


def add_merge_command(subparsers) -> None:
    """Adds ``benchmark-merge`` to the ``autoddpm`` sub-commands (handler in ``args.handler``)."""
    merge = subparsers.add_parser("benchmark-merge", help="join benchmark runs of different methods (--methods) into one report")
    merge.add_argument("runs", nargs="+", help="output folders of `autoddpm benchmark --methods ...` runs of the same benchmark")
    merge.add_argument("--output-dir", required=True, help="folder for the joined results.json, results.md and figures")
    merge.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    merge.set_defaults(handler=_merge_main)


def _merge_main(args: argparse.Namespace) -> int:
    merge_benchmarks(args.runs, args.output_dir, command=command_line("benchmark-merge"), figures=not args.no_figures)
    print(f"joined {len(args.runs)} runs: {Path(args.output_dir) / 'results.md'}")
    return 0
