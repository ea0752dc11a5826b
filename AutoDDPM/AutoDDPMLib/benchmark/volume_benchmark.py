"""Detection on whole volumes, as a user runs it: ``autoddpm benchmark-volumes``.

``autoddpm benchmark`` scores slices on the model grid, which is how the paper
compares methods. A user runs whole volumes in their own geometry, with the
model card's post-processing (detection.map_filters) and its threshold. This
benchmark runs exactly that on volumes with expert masks and scores it per
patient as well as pooled: a radiologist asks how often a tumour is missed,
not only how many voxels were right.

With ``--postprocess deepbet`` every post-processed method below searches
deepbet's brain mask instead of the card's brain region.

Methods, each thresholded at 1 % of the healthy tissue of the same volumes
(tissue at least 10 mm from the lesion, or on lesion-free slices; see
training.volume_calibration), except AutoDDPM with the card's own threshold:

- ``AutoDDPM fast``: ``autoddpm run`` with the card's post-processing;
- ``AutoDDPM fast (raw map)``: ``autoddpm run --postprocess none``, the paper's map;
- ``Input intensity``: the normalised FLAIR itself as the map (no model), raw and
  with the card's post-processing, calibrated the same way: what a plain
  threshold finds.
- with ``--baselines``, the fixed-noise reconstructions of the slice benchmark:
  the residual of AutoDDPM's own coarse reconstruction (``residual-fast``) and
  AnoDDPM from t = 100 in all its 101 steps (``anoddpm-100``), each raw (|x - x_rec|)
  and with the card's polarity and post-processing, calibrated the same way.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import numpy as np

from ..detection.map_filters import anomaly_mask, postprocess_map
from ..detection.postprocessing import SKULL_STRIPPED_CHOICES, PostProcessing
from ..diffusion.onnx_backend import BACKENDS
from ..errors import AutoDDPMError
from ..provenance import command_line, git_commit
from ..training.volume_calibration import LabelledVolume, calibrate_volume_threshold
from ..volumes.slices import AxialStack
from .metrics import average_precision, dice

if TYPE_CHECKING:
    from ..detection.inference import AutoDDPM
# The engine, SimpleITK and the volume readers are imported where a run needs them: the command
# line builds this command's parser where SimpleITK is missing too (a GPU node that only trains).

FOUND_DICE = 0.1  # a patient's tumour counts as found when its Dice is above this
# The fixed-noise baselines: name, start level and reverse steps (None: the fast schedule's coarse reconstruction).
RECONSTRUCTION_BASELINES = {"residual-fast": ("Residual (coarse, fast)", None, None), "anoddpm-100": ("AnoDDPM t=100", 100, 101)}


def score(name: str, cases: list[LabelledVolume], maps: list[np.ndarray], masks: list[np.ndarray], threshold: float,
          seconds: Optional[float] = None) -> dict:
    """Pooled and per-patient figures of one method."""
    per_patient = {case.name: dice(mask, case.truth) for case, mask in zip(cases, masks)}
    overlap = sum(int((mask & case.truth).sum()) for mask, case in zip(masks, cases))
    flagged = sum(int(mask.sum()) for mask in masks)
    truth = sum(int(case.truth.sum()) for case in cases)
    healthy_flagged = sum(int(mask[case.healthy].sum()) for mask, case in zip(masks, cases))
    values = list(per_patient.values())
    return {
        "method": name,
        "threshold": threshold,
        "dice": 2 * overlap / max(1, flagged + truth),
        "auprc": average_precision(np.concatenate([m.ravel() for m in maps]), np.concatenate([c.truth.ravel() for c in cases])),
        "patient_dice_median": float(np.median(values)),
        "patient_dice_q1": float(np.percentile(values, 25)),
        "patient_dice_q3": float(np.percentile(values, 75)),
        "found": sum(v > FOUND_DICE for v in values),
        "patients": len(values),
        "healthy_fpr": healthy_flagged / max(1, sum(int(c.healthy.sum()) for c in cases)),
        "seconds_per_volume": seconds,
        "per_patient_dice": per_patient,
    }


class EngineRun(NamedTuple):
    """What ``autoddpm run`` made of every case, and how."""

    maps: list[np.ndarray]
    masks: list[np.ndarray]
    seconds: float  # per volume
    threshold: float  # the masks' (NaN where it differed: skull-stripped inputs get the card's own)
    postprocessing: dict  # the masks' settings (PostProcessing.to_dict), or the engine's where they differed
    skull_stripped: int  # how many cases were taken for skull-stripped inputs


def run_autoddpm(engine: AutoDDPM, cases: list[LabelledVolume], log) -> EngineRun:
    """The map and mask ``autoddpm run`` writes for each case, and how they were made."""
    maps, masks, thresholds, settings, stripped, started = [], [], set(), [], 0, time.perf_counter()
    for case in cases:
        result = engine.process_volume(case.image, name=case.name)
        maps.append(AxialStack.from_image(result.anomaly_map).array)
        masks.append(AxialStack.from_image(result.mask).array > 0)
        thresholds.add(result.threshold)
        settings.append(result.postprocessing_settings)
        stripped += result.skull_stripped
        log(f"{result.postprocessing}: {case.name} done")
    same = all(s == settings[0] for s in settings)
    return EngineRun(maps, masks, (time.perf_counter() - started) / len(cases),
                     thresholds.pop() if len(thresholds) == 1 else math.nan,
                     settings[0] if same else engine.postprocessing.to_dict(), stripped)


def reconstruction_maps(engine: AutoDDPM, cases: list[LabelledVolume], level: int, steps: int,
                        polarity: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(raw |x - x_rec|, the ``polarity`` residual) in each volume, from a reconstruction of every slice with signal
    from noise level ``level`` in ``steps`` steps, batch i drawing its noise from seed + i as ``autoddpm run`` does."""
    import torch

    from ..diffusion.polarity import deviation
    from ..volumes.slices import has_signal, to_model_grid

    card, raw, polar = engine.card, [], []
    for case in cases:
        keep = np.array([has_signal(s, card.min_foreground_fraction) for s in case.slices01], dtype=bool)
        grid, transform = to_model_grid(case.slices01[keep], case.spacing[1:], card.image_size)
        with torch.no_grad():
            rec = torch.cat([engine.pipeline.reconstruct(batch.to(engine.device), level, steps,
                                                         torch.Generator().manual_seed(engine.seed + i)).cpu()
                             for i, batch in enumerate(grid.split(engine.batch_size))])
        raw.append(engine.raw_anomaly_in_volume(deviation(grid, rec, "both"), transform, keep, case.slices01))
        polar.append(engine.raw_anomaly_in_volume(deviation(grid, rec, polarity), transform, keep, case.slices01))
    return raw, polar


def calibrated_method(cases: list[LabelledVolume], raw_maps: list[np.ndarray],
                      settings: PostProcessing) -> tuple[list[np.ndarray], list[np.ndarray], float, float]:
    """A map post-processed with ``settings`` and thresholded at 1% of the healthy voxels:
    (maps, masks, threshold, seconds per volume of the post-processing and thresholding as a run does them)."""
    started = time.perf_counter()
    maps = [postprocess_map(raw, case.slices01, case.spacing, settings, case.array)[0] for raw, case in zip(raw_maps, cases)]
    seconds = time.perf_counter() - started
    threshold, _ = calibrate_volume_threshold(maps, [c.healthy for c in cases], [c.spacing for c in cases], settings)
    started = time.perf_counter()
    masks = [anomaly_mask(m, threshold, c.spacing, settings) for m, c in zip(maps, cases)]
    seconds += time.perf_counter() - started
    return maps, masks, threshold, seconds / len(cases)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Whole-volume benchmark: {meta['model']} on {meta['data']}", "",
             f"{meta['cases']} patients; command `{meta['command']}`, commit {meta['commit']}, {meta['date']}.", "",
             f"Post-processing: {PostProcessing.from_dict(meta['postprocessing']).describe()}.", "",
             "| method | threshold | Dice (pooled) | AUPRC | patient Dice: median [IQR] | found (Dice > 0.1) | healthy voxels flagged "
             "| s / volume |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['threshold']:.4g} | {r['dice']:.3f} | {r['auprc']:.3f} | "
                     f"{r['patient_dice_median']:.3f} [{r['patient_dice_q1']:.3f}, {r['patient_dice_q3']:.3f}] | "
                     f"{r['found']}/{r['patients']} | {100 * r['healthy_fpr']:.2f}% | {r['seconds_per_volume']:.1f} |")
    lines += ["", "Per patient (Dice):", "", "| patient | " + " | ".join(r["method"] for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for patient in rows[0]["per_patient_dice"]:
        lines.append(f"| {patient} | " + " | ".join(f"{r['per_patient_dice'][patient]:.3f}" for r in rows) + " |")
    if meta.get("figure"):
        lines += ["", f"![per-patient Dice]({meta['figure']})"]
    return "\n".join(lines) + "\n"


def box_plot(rows: list[dict], path: Path) -> Optional[str]:
    """A box plot of per-patient Dice per method (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(2 + 1.6 * len(rows), 4))
    data = [list(r["per_patient_dice"].values()) for r in rows]
    axes.boxplot(data, showfliers=False)
    for i, values in enumerate(data, start=1):
        axes.scatter(np.full(len(values), i) + np.linspace(-0.12, 0.12, len(values)), values, s=12, alpha=0.7)
    axes.axhline(FOUND_DICE, color="grey", linestyle=":", linewidth=1)
    axes.set_xticks(range(1, len(rows) + 1), [r["method"].replace(" (", "\n(") for r in rows], fontsize=8)
    axes.set_ylabel("Dice per patient")
    axes.set_ylim(0, 1)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path.name


def run_volume_benchmark(model: Optional[str], data: str | os.PathLike, output_dir: str | os.PathLike,
                         max_volumes: Optional[int] = None, backend: str = "auto", baselines: Sequence[str] = (),
                         log=print, postprocess: str = "card", skull_stripped: Optional[bool] = None) -> list[dict]:
    """Run and score every method (and the ``baselines``, keys of RECONSTRUCTION_BASELINES) on the volumes with masks
    in ``data``, every post-processed one as ``--postprocess postprocess`` says (card or deepbet), AutoDDPM's
    skull-stripped inputs as ``autoddpm run --skull-stripped`` says (None: auto); write results.json, meta.json,
    results.md."""
    from ..detection.inference import AutoDDPM
    from ..training.training_data import find_training_images

    commit = git_commit()  # the code that runs now: a commit made while a long run goes on must not be recorded
    unknown = sorted(set(baselines) - set(RECONSTRUCTION_BASELINES))
    if unknown:
        raise AutoDDPMError(f"unknown baselines {', '.join(unknown)}: choose from {', '.join(RECONSTRUCTION_BASELINES)}")
    pairs = [(image, mask) for image, mask in find_training_images(data) if mask is not None][:max_volumes]
    if not pairs:
        raise AutoDDPMError(f"no volumes with expert masks (*_mask) in {data}")
    engine = AutoDDPM(model, backend=backend, postprocess=postprocess, skull_stripped=skull_stripped)
    settings = engine.postprocessing
    if settings.is_none:
        raise AutoDDPMError(f"model {engine.card.name} has no post-processing in its card; `autoddpm benchmark` scores its raw map")
    raw_engine = AutoDDPM(model, backend=backend, postprocess="none")
    cases = [LabelledVolume(image, mask, engine.card) for image, mask in pairs]
    rows = []
    autoddpm = run_autoddpm(engine, cases, log)
    rows.append(score("AutoDDPM fast", cases, autoddpm.maps, autoddpm.masks, autoddpm.threshold, autoddpm.seconds))
    raw = run_autoddpm(raw_engine, cases, log)
    rows.append(score("AutoDDPM fast (raw map)", cases, raw.maps, raw.masks, raw.threshold, raw.seconds))
    for label, method_settings in (("Input intensity", settings), ("Input intensity (raw)", PostProcessing.none())):
        # No model: its seconds are those of the post-processing alone (and of the brain region).
        maps, masks, threshold, seconds = calibrated_method(cases, [case.slices01 for case in cases], method_settings)
        rows.append(score(label, cases, maps, masks, threshold, seconds))
    schedule = engine.pipeline.schedule
    for key in baselines:
        label, level, steps = RECONSTRUCTION_BASELINES[key]
        started = time.perf_counter()
        raw, polar = reconstruction_maps(engine, cases, level or schedule.coarse_start, steps or schedule.coarse_steps,
                                         settings.polarity)
        seconds = (time.perf_counter() - started) / len(cases)
        log(f"{label}: reconstructed")
        for row_label, maps_in, method_settings in ((label, polar, settings), (f"{label} (raw)", raw, PostProcessing.none())):
            maps, masks, threshold, postprocess_seconds = calibrated_method(cases, maps_in, method_settings)
            rows.append(score(row_label, cases, maps, masks, threshold, seconds + postprocess_seconds))
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": engine.card.name, "data": str(data), "cases": len(cases), "postprocessing": autoddpm.postprocessing,
        "skull_stripped_inputs": autoddpm.skull_stripped,
        "schedule": engine.schedule_name, "backend": engine.backend_name, "baselines": list(baselines), "command": command_line("benchmark-volumes"),
        "commit": commit, "date": _dt.date.today().isoformat(), "found_dice": FOUND_DICE,
        "figure": box_plot(rows, output / "patient_dice.png"),
    }
    (output / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (output / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    (output / "results.md").write_text(markdown(rows, meta), encoding="utf-8")
    return rows


def add_volume_benchmark_command(subparsers) -> None:
    """Adds ``benchmark-volumes`` to the ``autoddpm`` sub-commands (handler in ``args.handler``)."""
    command = subparsers.add_parser("benchmark-volumes", help="detection on whole volumes with expert masks, as `autoddpm run` "
                                                              "makes it, pooled and per patient")
    command.add_argument("--model", default=None, help="bundled model name or model folder (default: flair-lgg)")
    command.add_argument("--data", required=True, help="folder of volumes with expert masks (<name>_flair + <name>_mask)")
    command.add_argument("--output-dir", required=True)
    command.add_argument("--max-volumes", type=int, default=None)
    command.add_argument("--backend", default="auto", choices=list(BACKENDS))
    command.add_argument("--baselines", nargs="*", default=[], choices=list(RECONSTRUCTION_BASELINES),
                         help="also the fixed-noise reconstructions (network evaluations: residual-fast 10 per slice, "
                              "anoddpm-100 101), raw and post-processed")
    command.add_argument("--postprocess", default="card", choices=["card", "deepbet"],
                         help="the post-processing of every method but the raw rows: the model card's (default), or the "
                              "same with deepbet's brain mask as the brain region")
    command.add_argument("--skull-stripped", default="auto", choices=list(SKULL_STRIPPED_CHOICES),
                         help="AutoDDPM's threshold for skull-stripped inputs, as `autoddpm run --skull-stripped`: auto "
                              "(default) uses it for the volumes that look stripped")
    command.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    rows = run_volume_benchmark(args.model, args.data, args.output_dir, args.max_volumes, args.backend, args.baselines,
                                postprocess=args.postprocess,
                                skull_stripped=SKULL_STRIPPED_CHOICES[args.skull_stripped])
    for row in rows:
        print(f"{row['method']:26s} Dice {row['dice']:.3f}  AUPRC {row['auprc']:.3f}  "
              f"patients found {row['found']}/{row['patients']}")
    print(f"report: {Path(args.output_dir) / 'results.md'}")
    return 0
