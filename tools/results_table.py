#!/usr/bin/env python3
"""Print the README's summary table of a benchmark run, from its results.json (never typed by hand).

    python tools/results_table.py Resources/Benchmark/flair-lgg-quick
    python tools/results_table.py Resources/Benchmark/t1-ixi-midaxial-quick --by-size ixi

One row per method: for each dataset (all slices) the pooled Dice at the
calibrated threshold, at the oracle threshold and the AUPRC; then network
evaluations, seconds per slice and the healthy-tissue MAE of the first dataset.
``--by-size DATASET``: Dice calibrated / oracle and AUPRC per lesion-size bin instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rows(results: list[dict], dataset: str, size_bin: str, kind: str) -> dict[str, dict]:
    return {r["method"]: r for r in results
            if r["dataset"] == dataset and r["size_bin"] == size_bin and r["threshold_kind"] == kind}


def headline_methods(results: list[dict]) -> list[str]:
    """AutoDDPM's schedules, the best fixed-noise AnoDDPM (calibrated Dice, first dataset) and the input intensity."""
    first = next(r["dataset"] for r in results)
    calibrated = _rows(results, first, "all", "calibrated")
    anoddpm = [m for m in calibrated if m.startswith("AnoDDPM")]
    best = [max(anoddpm, key=lambda m: calibrated[m]["dice"])] if anoddpm else []
    return [m for m in calibrated if m.startswith("AutoDDPM") or m.startswith("Input intensity") or m in best]


def summary(results: list[dict], only: list[str] | None = None) -> str:
    datasets = [d for d in dict.fromkeys(r["dataset"] for r in results) if "[" not in d]
    methods = [m for m in dict.fromkeys(r["method"] for r in results if r["dataset"] in datasets) if only is None or m in only]
    first = datasets[0]
    header = ["method"] + [f"{d}: Dice calibrated / oracle, AUPRC" for d in datasets] + \
             ["evaluations / slice", f"s / slice ({first})", f"healthy-tissue MAE ({first})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        cells = [method]
        for d in datasets:
            cal, orc = _rows(results, d, "all", "calibrated").get(method), _rows(results, d, "all", "oracle").get(method)
            cells.append("–" if cal is None else f"{_fmt(cal['dice'])} / {_fmt(orc['dice'])}, {_fmt(cal['auprc'])}")
        own = _rows(results, first, "all", "calibrated").get(method) or {}
        cells += [str(own.get("evaluations_per_slice", "–")), _fmt(own.get("seconds_per_slice"), 2), _fmt(own.get("mae_healthy"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_size(results: list[dict], dataset: str) -> str:
    bins = ("small", "medium", "large")
    methods = list(dict.fromkeys(r["method"] for r in results if r["dataset"] == dataset))
    header = ["method"] + [f"{b}: Dice calibrated / oracle, AUPRC" for b in bins] + ["MAE healthy / in lesion"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        cells = [method]
        for b in bins:
            cal, orc = _rows(results, dataset, b, "calibrated").get(method), _rows(results, dataset, b, "oracle").get(method)
            cells.append("–" if cal is None else f"{_fmt(cal['dice'])} / {_fmt(orc['dice'])}, {_fmt(cal['auprc'])}")
        own = _rows(results, dataset, "all", "calibrated").get(method) or {}
        cells.append(f"{_fmt(own.get('mae_healthy'), 4)} / {_fmt(own.get('mae_lesion'), 4)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a benchmark output folder (with results.json and meta.json)")
    parser.add_argument("--by-size", metavar="DATASET", help="per lesion-size bin, for this dataset")
    parser.add_argument("--headline", action="store_true",
                        help="only AutoDDPM, the best fixed-noise AnoDDPM and the input intensity (the README's rows)")
    args = parser.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    meta = json.loads((args.run / "meta.json").read_text())
    print(f"`{meta['command']}` (commit {meta['commit']}, {meta['device']}, {meta['wall_seconds']:.0f} s)\n")
    print(by_size(results, args.by_size) if args.by_size else summary(results, headline_methods(results) if args.headline else None))


if __name__ == "__main__":
    main()
