"""The benchmark's report: results.md and the figures (examples.png, tradeoff.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import AutoDDPMError
from .methods import INTENSITY_METHOD
from .scoring import BIN_ORDER


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """A finished benchmark run's rows (results.json) and meta.json."""
    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        meta = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AutoDDPMError(f"{run_dir} is not a finished benchmark run ({exc}); run `autoddpm benchmark --output-dir {run_dir}`") from None
    return results, meta


def write_run(output_dir: Path, rows: list[dict], meta: dict, figure_names: list[str]) -> None:
    """Write a run's results.json, meta.json and results.md, which ``read_run`` reads back.

    Called after the figures are drawn, so that a note made while drawing them (matplotlib missing) is in meta.json.
    """
    (output_dir / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (output_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (output_dir / "results.md").write_text(markdown_report(rows, meta, figure_names), encoding="utf-8")


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_threshold(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def _paired(rows: list[dict]) -> dict:
    """{(method, size bin): (calibrated row, oracle row)} in the rows' order."""
    pairs: dict = {}
    for r in rows:
        slot = pairs.setdefault((r["method"], r["size_bin"]), [None, None])
        slot[0 if r["threshold_kind"] == "calibrated" else 1] = r
    return {k: tuple(v) for k, v in pairs.items() if v[0] is not None and v[1] is not None}


def markdown_report(rows: list[dict], meta: dict, figures: list[str]) -> str:
    lines = [
        f"# AutoDDPM benchmark{' (quick)' if meta['quick'] else ''}",
        "",
        f"- Command: `{meta['command']}`",
        f"- Model: `{meta['model']}` ({meta['model_path']}), {meta['image_size']}x{meta['image_size']} grid, thresholds {json.dumps(meta['thresholds'])}",
        f"- Commit: `{meta['commit']}`",
        f"- Device: {meta['device']}, torch {meta['torch']} (backend {meta.get('backend', 'torch')}), batch size {meta['batch_size']}, seed {meta['seed']}",
        f"- Date: {meta['date']}; wall time {meta['wall_seconds']:.0f} s; peak memory (process RSS) {meta['peak_rss_mb']:.0f} MB",
        "",
        "Datasets:",
        "",
        *[f"- {d}" for d in meta["datasets"]],
        "",
        "Thresholds: **calibrated** rows use thresholds fixed before looking at the test data (the card's for AutoDDPM; "
        "baselines: the same healthy false-positive fraction on held-out healthy slices, see the notes). "
        "**oracle** rows use the best threshold chosen on the test data itself (the reference's 101 thresholds in [0, 1] plus 401 "
        "quantiles of each map's positive values, so that maps with a small range are not handicapped by the 0.01 grid): "
        "an upper bound, not an achievable result. "
        "Dice and AUPRC pool all pixels of the evaluated slices; FPR pixels = flagged head-foreground pixels of lesion-free slices, "
        "FPR slices = lesion-free slices with any flagged pixel. Healthy tissue = head foreground more than 2 pixels from a lesion.",
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in meta["notes"]],
        "",
    ]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    for dataset in datasets:
        ds_rows = [r for r in rows if r["dataset"] == dataset]
        pairs = _paired(ds_rows)
        lines += [f"## {dataset}", "", "### Detection, all slices", "",
                  "| method | Dice (calibrated) | Dice (**oracle**) @ threshold | AUPRC | per-volume Dice, calibrated: median [IQR] | "
                  "FPR pixels / slices (lesion-free, calibrated) | evals / slice | s / slice | s / volume |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (method, bin_name), (cal, orc) in pairs.items():
            if bin_name != "all":
                continue
            vol = f"{_fmt(cal['volume_dice_median'])} [{_fmt(cal['volume_dice_q1'])}, {_fmt(cal['volume_dice_q3'])}]"
            lines.append(
                f"| {method} | {_fmt(cal['dice'])} | {_fmt(orc['dice'])} @ {_fmt_threshold(orc['threshold'])} | {_fmt(cal['auprc'])} | {vol} | "
                f"{_fmt(cal['fpr_pixels'], 4)} / {_fmt(cal['fpr_slices'], 2)} | {cal['evaluations_per_slice']} | "
                f"{_fmt(cal['seconds_per_slice'], 3)} | {_fmt(cal['seconds_per_volume'], 1)} |"
            )
        by_bin = [(k, v) for k, v in pairs.items() if k[1] != "all"]
        if by_bin:
            lines += ["", "### Detection by lesion size (slices with a lesion of that size bin only)", "",
                      "| method | size bin | slices | Dice (calibrated) | Dice (**oracle**) @ threshold | AUPRC |", "|---|---|---|---|---|---|"]
            for (method, bin_name), (cal, orc) in sorted(by_bin, key=lambda kv: (BIN_ORDER.index(kv[0][1]), 0)):
                lines.append(f"| {method} | {bin_name} | {cal['n_slices']} | {_fmt(cal['dice'])} | {_fmt(orc['dice'])} @ {_fmt_threshold(orc['threshold'])} | {_fmt(cal['auprc'])} |")
        known = any(r["mae_lesion"] is not None for r in ds_rows)
        title = "against the known healthy image" if known else "against the input, in healthy tissue only (no healthy image is known inside real lesions)"
        lines += ["", f"### Pseudo-healthy fidelity, {title}", "",
                  "| method | size bin | MAE healthy | SSIM healthy | LPIPS healthy | MAE lesion | SSIM lesion | LPIPS lesion |",
                  "|---|---|---|---|---|---|---|---|"]
        for (method, bin_name), (cal, _) in sorted(pairs.items(), key=lambda kv: BIN_ORDER.index(kv[0][1])):
            if method == INTENSITY_METHOD:  # it makes no pseudo-healthy image
                continue
            lines.append(
                f"| {method} | {bin_name} | {_fmt(cal['mae_healthy'], 4)} | {_fmt(cal['ssim_healthy'])} | {_fmt(cal['lpips_healthy'], 4)} | "
                f"{_fmt(cal['mae_lesion'], 4)} | {_fmt(cal['ssim_lesion'])} | {_fmt(cal['lpips_lesion'], 4)} |"
            )
        lines.append("")
    if figures:
        lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    lines += ["Regenerate with the command above; these numbers are written by `autoddpm benchmark`, never by hand.", ""]
    return "\n".join(lines)


def write_figures(output_dir: Path, rows: list[dict], examples: dict) -> list[str]:
    """examples.png (input | pseudo-healthy | anomaly map | mask vs truth) and tradeoff.png (Dice vs evaluations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.pyplot as plt

    from .metrics import LESION_FREE

    names = []
    # Example cases: AutoDDPM fast, for up to 3 lesion cases per dataset (largest, median, smallest lesion).
    picks = []
    for dataset, (evalset, runs) in examples.items():
        run = runs.get("AutoDDPM fast")
        if run is None:
            continue
        sizes = evalset.truth.reshape(len(evalset), -1).sum(axis=1)
        lesion = [i for i in np.argsort(-sizes) if evalset.bins[i] != LESION_FREE]
        chosen = list(dict.fromkeys([lesion[0], lesion[len(lesion) // 2], lesion[-1]])) if lesion else []
        picks += [(dataset, evalset, run, i) for i in chosen]
    if picks:
        fig, axes = plt.subplots(len(picks), 4, figsize=(10, 2.6 * len(picks)), squeeze=False)
        for row, (dataset, evalset, run, i) in enumerate(picks):
            x = evalset.x[i, 0].numpy()
            truth = evalset.truth[i]
            pred = run.scores[i] > run.threshold
            overlay = np.zeros(x.shape + (3,))
            overlay[..., 0] = pred & ~truth
            overlay[..., 1] = truth & ~pred
            overlay[..., :2] += (pred & truth)[..., None]
            panels = [(x, "gray", "input"), (run.pseudo_healthy[i], "gray", "pseudo-healthy"),
                      (run.scores[i], "inferno", "anomaly map A"), (None, None, "mask (red) / truth (green) / both (yellow)")]
            for col, (img, cmap, title) in enumerate(panels):
                ax = axes[row, col]
                if img is None:
                    ax.imshow(x, cmap="gray", vmin=0, vmax=1)
                    ax.imshow(overlay, alpha=0.55)
                else:
                    ax.imshow(img, cmap=cmap, vmin=0, vmax=1 if cmap == "gray" else max(float(np.nanmax(img)), 1e-6))
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(title if row == 0 else "", fontsize=8)
            axes[row, 0].set_ylabel(f"{dataset}\n{evalset.volumes[i]}\n{evalset.bins[i]}", fontsize=7)
        fig.suptitle("AutoDDPM fast, calibrated threshold", fontsize=10)
        fig.tight_layout()
        fig.savefig(output_dir / "examples.png", dpi=110)
        plt.close(fig)
        names.append("examples.png")

    # Dice against network evaluations per slice, per dataset ("all" bin).
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    columns = min(3, len(datasets))
    n_rows = math.ceil(len(datasets) / columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(5.5 * columns, 4.2 * n_rows), squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    for ax, dataset in zip(axes.flat, datasets):
        for r in rows:
            if r["dataset"] != dataset or r["size_bin"] != "all" or r["dice"] is None or not r["evaluations_per_slice"]:
                continue
            oracle = r["threshold_kind"] == "oracle"
            color = "C0" if r["method"].startswith("AutoDDPM") else ("C1" if r["method"].startswith("AnoDDPM") else "C2")
            ax.scatter(r["evaluations_per_slice"], r["dice"], marker="o", s=36, color=color if oracle else "none", edgecolors=color)
            if oracle:
                ax.annotate(r["method"].replace("AutoDDPM ", "Auto "), (r["evaluations_per_slice"], r["dice"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        for kind, color in (("AutoDDPM", "C0"),):  # its schedules form the speed/quality curve
            for threshold_kind, style in (("oracle", "-"), ("calibrated", ":")):
                points = sorted((r["evaluations_per_slice"], r["dice"]) for r in rows
                                if r["dataset"] == dataset and r["size_bin"] == "all" and r["dice"] is not None
                                and r["method"].startswith(kind) and r["threshold_kind"] == threshold_kind)
                if len(points) > 1:
                    ax.plot(*zip(*points), style, color=color, linewidth=0.8, alpha=0.6)
        handles = [matplotlib.lines.Line2D([], [], marker="o", linestyle="", color=c, label=l)
                   for c, l in (("C0", "AutoDDPM"), ("C1", "AnoDDPM (fixed noise level)"), ("C2", "residual of the coarse reconstruction"))]
        ax.legend(handles=handles, fontsize=7, loc="best")
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per slice")
        ax.set_ylabel("pooled Dice (filled: oracle, hollow: calibrated)")
        ax.set_title(dataset, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output_dir / "tradeoff.png", dpi=110)
    plt.close(fig)
    names.append("tradeoff.png")
    return names
