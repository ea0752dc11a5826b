"""``autoddpm benchmark``: detection quality, pseudo-healthy fidelity and cost, AutoDDPM against baselines.

The harness: it loads the datasets (:mod:`datasets`), calibrates the
baselines' thresholds on healthy slices, runs every method
(:mod:`methods`), scores them (:mod:`scoring`) and writes
the report (:mod:`report`).

Outputs in ``--output-dir``: ``results.json``, a list of rows, one per (method,
dataset, size_bin, threshold_kind) with dice, auprc, threshold,
volume_dice_median/q1/q3, fpr_pixels, fpr_slices, mae/ssim/lpips_healthy and
_lesion, evaluations_per_slice, seconds_per_slice, seconds_per_volume,
cuda_peak_mb, peak_rss_mb and case counts (missing values are null);
``meta.json`` (command, model, commit, device, date, notes); ``results.md``
(the tables); ``examples.png`` and ``tradeoff.png`` (with matplotlib). With
``--quick`` the reference schedule runs on a subset of each dataset, reported
as the dataset ``"<name> [reference subset]"`` with every method on the same cases.

The network runs as ``autoddpm run`` runs it (``--backend``, ONNX Runtime on a
CPU where installed). A full run takes hours on a laptop CPU: each finished
method run is kept in ``OUTPUT_DIR/partial`` (:mod:`parts`), and the
same command with ``--resume`` goes on from there after a stop; or ``--methods``
runs some of the methods and ``autoddpm benchmark-merge`` (:mod:`merge`)
joins such runs into one report.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..diffusion.onnx_backend import BACKENDS
from ..errors import AutoDDPMError
from ..models.bundle import WEIGHTS_FILE
from ..provenance import command_line, file_sha256, git_commit
from .datasets import DATASETS, EvalSet, calibration_slices, default_datasets, load_with_provenance, spread
from .methods import MethodRun, Runner, build_methods
from .parts import PartStore, engine_digest
from .prepared_data import is_prepared_data, read_prepared_data, write_prepared_data
from .report import write_figures, write_run
from .scoring import BIN_ORDER, calibrate_baselines, evaluate_rows, fidelity_maps

# Sizes of a --quick run (about 15 minutes for a 64x64 4.5M-parameter model on 2 CPU cores).
QUICK = dict(max_volumes=3, max_images=8, reference_cases=8, calibration_slices=16, baseline_steps=10)
FULL = dict(max_volumes=None, max_images=None, reference_cases=None, calibration_slices=48, baseline_steps=None)


def default_data_root() -> Optional[Path]:
    """``<repository>/../shared/data`` when it exists (a development checkout), else None."""
    candidate = Path(__file__).resolve().parents[4] / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def _inputs(model: Optional[str], data: Optional[str | Path], quick: bool, overrides: dict) -> tuple[Path, Any, Path, dict]:
    """The model folder and card, the data root (or prepared file) and the run's sizes, checked."""
    from ..models.bundle import read_card, resolve_model

    root = Path(data) if data else default_data_root()
    if root is None or not (Path(root).is_dir() or is_prepared_data(root)):
        raise AutoDDPMError("no benchmark data: give --data FOLDER (with lgg_flair/ and/or ixi_t1_midaxial/ as in "
                            "shared/data) or a file from `autoddpm benchmark --prepare-data`")
    folder = resolve_model(model)
    sizes = dict(QUICK if quick else FULL)
    sizes.update({key: value for key, value in overrides.items() if value is not None})
    return folder, read_card(folder), Path(root), sizes


def prepare_benchmark_data(
    output: str | Path,
    model: Optional[str] = None,
    data: Optional[str | Path] = None,
    quick: bool = False,
    datasets: Optional[list[str]] = None,
    seed: int = 0,
    max_volumes: Optional[int] = None,
    max_images: Optional[int] = None,
    calibration_slices_count: Optional[int] = None,
) -> Path:
    """Load what a run of ``run_benchmark`` with these arguments would, and write it to ``output`` (.safetensors)."""
    folder, card, root, sizes = _inputs(model, data, quick, dict(
        max_volumes=max_volumes, max_images=max_images, calibration_slices=calibration_slices_count))
    if is_prepared_data(root):
        raise AutoDDPMError("--prepare-data reads a data folder, not a prepared file")
    evalsets, families, overlaps = {}, {}, {}
    for name in datasets or default_datasets(card):
        evalsets[name], families[name], overlaps[name] = load_with_provenance(name, root, card, sizes, seed)
        _log(f"{name}: {len(evalsets[name])} cases")
    calibrations = {family: calibration_slices(family, root, card, sizes["calibration_slices"])
                    for family in dict.fromkeys(families.values())}
    return write_prepared_data(output, card, evalsets, families, overlaps, calibrations, sizes, seed)


def _reference_subset(evalset: EvalSet, count: Optional[int]) -> np.ndarray:
    """Lesion cases spread over the set (and a quarter lesion-free), for the costly reference schedule."""
    from .metrics import LESION_FREE

    if not count or count >= len(evalset):
        return np.arange(len(evalset))
    lesion = np.array([i for i, b in enumerate(evalset.bins) if b != LESION_FREE], dtype=int)
    free = np.array([i for i, b in enumerate(evalset.bins) if b == LESION_FREE], dtype=int)
    n_free = min(len(free), count // 4)
    n_lesion = min(len(lesion), count - n_free)
    pick = [lesion[spread(len(lesion), n_lesion)], free[spread(len(free), count - n_lesion)]]
    return np.sort(np.concatenate(pick)).astype(int)


def run_benchmark(
    model: Optional[str] = None,
    output_dir: str | Path = "benchmark",
    data: Optional[str | Path] = None,
    quick: bool = False,
    datasets: Optional[list[str]] = None,
    device: str = "auto",
    seed: int = 0,
    batch_size: int = 16,
    max_volumes: Optional[int] = None,
    max_images: Optional[int] = None,
    reference_cases: Optional[int] = None,
    calibration_slices_count: Optional[int] = None,
    baseline_steps: Optional[int] = None,
    figures: bool = True,
    command: Optional[str] = None,
    backend: str = "auto",
    resume: bool = False,
    methods: Optional[list[str]] = None,
) -> list[dict]:
    """Run the benchmark and write results.json, results.md and figures into ``output_dir``; returns the rows.

    ``data`` is a data root (as ../shared/data) or a file from ``prepare_benchmark_data``.
    ``backend`` runs the network as ``autoddpm run --backend`` does. Finished method
    runs are kept in ``output_dir/partial`` until the report is written; ``resume``
    reuses those an earlier, stopped run of the same benchmark left there.
    ``methods`` (keys as ``Method.key``: fast, reference, anoddpm-100, ...) runs
    only those: a full run split into runs of a few methods each, joined by
    ``merge_benchmarks`` (each method's rows depend only on its own maps).
    """
    import torch

    from ..diffusion.devices import describe_device, select_device

    started = time.perf_counter()
    folder, card, root, sizes = _inputs(model, data, quick, dict(
        max_volumes=max_volumes, max_images=max_images, reference_cases=reference_cases,
        calibration_slices=calibration_slices_count, baseline_steps=baseline_steps))
    torch_device = select_device(device)
    notes: list[str] = []
    prepared = None
    if is_prepared_data(root):
        prepared = read_prepared_data(root, card)
        sizes.update({key: prepared.sizes[key] for key in ("max_volumes", "max_images", "calibration_slices")})
        seed = prepared.seed  # the synthetic lesions in the file were drawn with it
        notes.append(f"Cases read from {root} (prepared by `autoddpm benchmark --prepare-data`, seed {seed}).")
        missing = [d for d in datasets or [] if d not in prepared.datasets]
        if missing:
            raise AutoDDPMError(f"{root} holds {', '.join(prepared.datasets)}, not {', '.join(missing)}")
    datasets = list(datasets or (prepared.datasets if prepared else default_datasets(card)))
    try:
        load = os.getloadavg()[0]
        if load > 0.5:
            notes.append(f"Load average {load:.1f} at the start (on {os.cpu_count()} CPUs): other processes shared the machine, "
                         "so the times are pessimistic (on a busy CPU, --threads 1 avoids thread oversubscription).")
    except (OSError, AttributeError):
        pass
    if not card.data.get("thresholds", {}).get("calibrated", False):
        notes.append("The model card's thresholds are NOT calibrated (placeholders): the 'calibrated' rows use them as they are.")
    all_methods = build_methods(card, quick, sizes["baseline_steps"], notes)
    keys = [m.key for m in all_methods]
    unknown = sorted(set(methods or []) - set(keys))
    if unknown:
        raise AutoDDPMError(f"unknown method(s) {', '.join(unknown)} for this run; choose from {', '.join(keys)}")
    # The method's index in the full list seeds its noise: a method run alone draws what it draws in a full run.
    chosen = [(i, m) for i, m in enumerate(all_methods) if not methods or m.key in methods]
    chosen_keys = {m.key for _, m in chosen}
    if len(chosen) < len(all_methods):
        notes.append(f"Methods of this run: {', '.join(m.key for _, m in chosen)} (of {', '.join(keys)}); "
                     "`autoddpm benchmark-merge` joins it with runs of the others.")
    for schedule in sorted({m.schedule for _, m in chosen if m.kind == "autoddpm"}):
        if not card.thresholds_for(schedule)[2]:
            notes.append(f"AutoDDPM {schedule} runs with thresholds NOT calibrated for it (the card's main ones): its "
                         f"calibrated rows are not what the schedule can do (`autoddpm calibrate --schedule {schedule}`).")
    if sizes["baseline_steps"] and any(m.kind == "anoddpm" for _, m in chosen):
        notes.append(f"AnoDDPM reconstructions take {sizes['baseline_steps']} strided reverse steps (the reference takes all t+1 ancestral steps).")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The code that runs is the checkout as it is now: edits made while the run goes on do not count.
    commit = git_commit()
    run_fields = {
        "weights": file_sha256(Path(folder) / WEIGHTS_FILE), "card": card.data, "engine": engine_digest(),
        "seed": seed, "batch_size": batch_size, "backend": backend, "device": torch_device.type,
    }
    parts = PartStore(output_dir, run_fields, resume)
    if parts.discarded:
        _log(f"removed {parts.discarded} finished parts of an earlier run in {parts.folder} (--resume continues from them)")
    runner = Runner(card, torch_device, batch_size, seed, backend, parts)
    if runner.backend_note:
        notes.append(f"The network runs on {runner.backend}: {runner.backend_note}.")
    _log(f"model {card.name} ({folder}), device {torch_device}, datasets {', '.join(datasets)}, {'quick' if quick else 'full'} run")

    rows: list[dict] = []
    examples: dict[str, tuple[EvalSet, dict[str, MethodRun]]] = {}
    thresholds_by_family: dict[str, dict[str, float]] = {}
    descriptions = []
    for dataset_name in datasets:
        if prepared:
            evalset = EvalSet(**prepared.datasets[dataset_name])
            family, overlap = prepared.families[dataset_name], prepared.overlaps[dataset_name]
        else:
            evalset, family, overlap = load_with_provenance(dataset_name, root, card, sizes, seed)
        if overlap:
            notes.append(f"WARNING: the card's thresholds were calibrated on {overlap}, which `{dataset_name}` evaluates: "
                         "its false-positive rates are optimistic.")
        descriptions.append(f"`{dataset_name}`: {evalset.description}")
        _log(f"{dataset_name}: {len(evalset)} cases")

        if family not in thresholds_by_family:
            calib, calib_source = (prepared.calibrations[family] if prepared
                                   else calibration_slices(family, root, card, sizes["calibration_slices"]))
            _log(f"calibrating baseline thresholds on {len(calib)} healthy slices ({calib_source})")
            all_idx = np.arange(len(calib))
            calib_runs = {}
            for i, method in enumerate(all_methods):
                # AutoDDPM fast always calibrates: the baselines' note says what it flags there.
                if method.key != "fast" and method.key not in chosen_keys:
                    continue
                if method.kind == "autoddpm" and method.schedule != "fast":
                    continue
                if method.kind == "residual" and method.schedule != "fast" and quick:
                    continue
                calib_runs[method.name] = runner.run(method, i, f"calibration-{family}", calib, all_idx, [all_idx])
            notes.append(f"Calibration slices for {family}: {len(calib)} healthy slices from {calib_source}.")
            thresholds_by_family[family] = calibrate_baselines(calib_runs, card, calib[:, 0].numpy() > 0.05, notes)
        thresholds = thresholds_by_family[family]

        subset = _reference_subset(evalset, sizes["reference_cases"]) if quick else np.arange(len(evalset))
        runs = {}
        for i, method in chosen:
            indices = subset if method.subset_only else np.arange(len(evalset))
            t0 = time.perf_counter()
            run = runner.run(method, i, dataset_name, evalset.x, indices, evalset.groups())
            run.threshold = (card.thresholds_for(method.schedule)[1] if method.kind == "autoddpm"
                             else thresholds.get(method.name, float("nan")))
            if math.isnan(run.threshold) and method.name == "Residual (coarse, reference)":
                run.threshold = thresholds.get("Residual (coarse, fast)", float("nan"))
            run.fidelity = fidelity_maps(run, evalset, runner.lpips, torch_device) if method.kind != "intensity" else {}
            runs[method.name] = run
            _log(f"{dataset_name}: {method.name}: {len(indices)} slices in {time.perf_counter() - t0:.1f} s")

        labels = [(dataset_name, np.arange(len(evalset)), False)]
        if quick and len(subset) < len(evalset):
            labels.append((f"{dataset_name} [reference subset]", subset, True))
        for label, cases, is_subset in labels:
            for bin_name in BIN_ORDER:
                idx = cases if bin_name == "all" else np.array([i for i in cases if evalset.bins[i] == bin_name], dtype=int)
                if len(idx) == 0:
                    continue
                for name, run in runs.items():
                    if run.method.subset_only and not is_subset:
                        continue
                    rows += evaluate_rows(run, evalset, idx, label, bin_name, str(torch_device))
        examples[dataset_name] = (evalset, runs)

    if parts.resumed:
        runs = dict.fromkeys(label.split(" [")[0] for label in parts.resumed)  # a label per chunk: name each run once
        notes.append(f"Resumed: {len(parts.resumed)} stored parts (chunks of method runs) were read back from an earlier, "
                     f"stopped run of this benchmark (their seconds were measured then), of: {'; '.join(runs)}.")
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    meta = {
        "command": command or "autoddpm benchmark",
        "model": card.name,
        "model_path": str(folder),
        "image_size": card.image_size,
        "thresholds": card.data.get("thresholds", {}),
        "commit": commit,
        "device": describe_device(torch_device),
        "backend": runner.backend,
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "seed": seed,
        "batch_size": batch_size,
        "datasets": descriptions,
        "methods": [m.name for _, m in chosen],
        "method_order": [m.name for m in all_methods],
        # What makes two runs' rows comparable (benchmark-merge joins only runs with the same one).
        "identity": hashlib.sha256(json.dumps({"run": run_fields, "datasets": descriptions, "sizes": sizes, "quick": quick},
                                              sort_keys=True, default=str).encode()).hexdigest()[:32],
        "peak_rss_mb": round(peak_rss_mb, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "notes": notes,
    }
    for row in rows:
        row["peak_rss_mb"] = meta["peak_rss_mb"]
    figure_names = []
    if figures:
        try:
            figure_names = write_figures(output_dir, rows, examples)
        except ImportError:
            meta["notes"].append("matplotlib is not installed: no figures (pip install matplotlib).")
    write_run(output_dir, rows, meta, figure_names)
    parts.remove()
    _log(f"done in {meta['wall_seconds']:.0f} s: {output_dir / 'results.md'}")
    return rows


# ----------------------------------------------------------------------------- command line


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="bundled model name or model bundle folder (default: the default model)")
    parser.add_argument("--quick", action="store_true", help="a ~15-minute run on a small CPU: fewer cases, the reference schedule on a subset")
    parser.add_argument("--output-dir", default="benchmark", help="folder for results.json, results.md and the figures (default ./benchmark)")
    parser.add_argument("--data", default=None, help="data root with lgg_flair/ and/or ixi_t1_midaxial/ (default: the repository's ../shared/data), or a file from --prepare-data")
    parser.add_argument("--prepare-data", default=None, metavar="FILE", help="only load the cases this run would use and write them to FILE (.safetensors), to run the benchmark on a machine without the data: --data FILE there")
    parser.add_argument("--datasets", default=None, help=f"comma-separated, from {', '.join(DATASETS)} (default: by the card's modality)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="slices per network forward (default 16)")
    parser.add_argument("--max-volumes", type=int, default=None, help="LGG patients to evaluate (default: all; --quick: 3)")
    parser.add_argument("--max-images", type=int, default=None, help="healthy slices for the synthetic sets (default: all IXI / 40 LGG; --quick: 8)")
    parser.add_argument("--reference-cases", type=int, default=None, help="cases per dataset for the reference schedule in --quick (default 8)")
    parser.add_argument("--calibration-slices", type=int, default=None, help="held-out healthy slices for the baselines' thresholds: the card's calibration data, else the training split (default 48; --quick: 16)")
    parser.add_argument("--baseline-steps", type=int, default=None, help="reverse steps of AnoDDPM reconstructions (default: all t+1; --quick: 10)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="how the network runs, as for `autoddpm run` (default auto: ONNX Runtime on the CPU when installed, else torch)")
    parser.add_argument("--resume", action="store_true", help="go on from the method runs a stopped run with the same arguments left in OUTPUT_DIR/partial")
    parser.add_argument("--methods", default=None, help="comma-separated method keys to run, e.g. fast,reference,anoddpm-100 (default: all); `autoddpm benchmark-merge` joins runs of different methods")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")


def benchmark_main(args: argparse.Namespace) -> int:
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    if args.prepare_data:
        path = prepare_benchmark_data(args.prepare_data, model=args.model, data=args.data, quick=args.quick,
                                      datasets=datasets, seed=args.seed, max_volumes=args.max_volumes,
                                      max_images=args.max_images, calibration_slices_count=args.calibration_slices)
        print(f"benchmark data: {path.resolve()} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    run_benchmark(
        model=args.model,
        output_dir=args.output_dir,
        data=args.data,
        quick=args.quick,
        datasets=datasets,
        device=args.device,
        seed=args.seed,
        batch_size=args.batch_size,
        max_volumes=args.max_volumes,
        max_images=args.max_images,
        reference_cases=args.reference_cases,
        calibration_slices_count=args.calibration_slices,
        baseline_steps=args.baseline_steps,
        figures=not args.no_figures,
        command=command_line("benchmark"),
        backend=args.backend,
        resume=args.resume,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
    )
    return 0


def add_benchmark_command(subparsers) -> None:
    """Adds ``benchmark``, ``benchmark-merge``, ``benchmark-volumes`` and ``benchmark-speed`` to the ``autoddpm`` sub-commands (handler in ``args.handler``)."""
    from .merge import add_merge_command
    from .speed import add_speed_arguments, speed_main
    from .volume_benchmark import add_volume_benchmark_command

    bench = subparsers.add_parser("benchmark", help="detection quality, fidelity and cost against baselines on the shared data")
    add_benchmark_arguments(bench)
    bench.set_defaults(handler=benchmark_main)
    add_merge_command(subparsers)
    add_volume_benchmark_command(subparsers)
    speed = subparsers.add_parser("benchmark-speed", help="network forward speed: eager, channels_last, bfloat16, torch.compile, batch sizes")
    add_speed_arguments(speed)
    speed.set_defaults(handler=speed_main)
