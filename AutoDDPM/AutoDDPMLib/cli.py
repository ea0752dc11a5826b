"""The ``autoddpm`` command line: run, demo, models, train, calibrate, benchmark.

Every command reports a problem the user can fix as one line on stderr and
exit code 2 (never a traceback); ``python -m AutoDDPMLib.cli`` is the same
program, which is how the Slicer module launches it with Slicer's Python.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from .cohort.earlier_runs import earlier_outputs, settle_earlier_outputs
from .cohort.output_files import OUTPUT_SUFFIXES, output_path, remove_other_outputs, sidecar_path
from .cohort.ranks import Ranks
from .cohort.run_record import NIFTI_DESCRIPTION_KEY, RunContext, RunSettings, record_bytes, run_record
from .cohort.summary import SummaryRow, write_summary
from .cpu_sharing import lower_priority, wait_passively
from .detection.postprocessing import POSTPROCESS_CHOICES, SKULL_STRIPPED_CHOICES, PostProcessing, for_skull_stripped_input, option_settings
from .diffusion.onnx_backend import BACKENDS
from .diffusion.sampling_schedules import DEFAULT_SCHEDULE, SCHEDULES
from .errors import AutoDDPMError
from .models.fit_checks import SLICE_LEVELS
from .progress import Reporter, make_reporter
from .slicer_bridge.licences import is_non_commercial

# What `autoddpm demo` runs, by the model's modality: a real LGG patient for FLAIR; for T1, the paper's
# setting, one IXI subject's mid-axial slice with a synthetic lesion of each size (tools/make_t1_samples.py).
DEMO_SAMPLES = {
    "FLAIR": ["TCGA_LGG_FLAIR.nii.gz"],
    "T1": [f"IXI_T1_midaxial_{size}.nii.gz" for size in ("small", "medium", "large")],
}


def _settings(args: argparse.Namespace) -> RunSettings:
    return RunSettings.for_run(args.model, args.schedule, args.postprocess, args.threshold, args.seed,
                               getattr(args, "repeats", 1), args.batch_size, SKULL_STRIPPED_CHOICES[args.skull_stripped])


def _load_engine(args: argparse.Namespace, settings: RunSettings, reporter: Reporter, ranks: Ranks):
    """The loaded model, and what the sidecars of its run share; says when the model's license forbids
    commercial use."""
    from .detection.inference import AutoDDPM

    reporter.loading(settings.model)
    started = time.perf_counter()
    engine = AutoDDPM(args.model, schedule=args.schedule, device=ranks.device(args.device), seed=args.seed,
                      batch_size=args.batch_size, threshold=args.threshold, backend=args.backend,
                      postprocess=args.postprocess, skull_stripped=SKULL_STRIPPED_CHOICES[args.skull_stripped])
    seconds = time.perf_counter() - started
    licence = str(engine.card.data.get("license", ""))
    if is_non_commercial(licence) and ranks.is_first:
        print(f"autoddpm: note: model {engine.card.name} is licensed {licence}: its results are not for commercial use",
              file=sys.stderr)
    return engine, RunContext(settings, args.command_line, seconds, ranks.rank, ranks.world)


def _check_engine_options(args: argparse.Namespace) -> None:
    """Refuses option values the engine would silently turn into something else, or refuse after the model loaded."""
    from .diffusion.devices import select_device

    select_device(args.device)  # an unknown device, or one this machine lacks
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold >= 0):
        raise AutoDDPMError(f"--threshold must be a finite number of at least 0 (got {args.threshold}); "
                            "leave it out for the model card's calibrated value")
    if args.batch_size is not None and args.batch_size < 1:
        raise AutoDDPMError(f"--batch-size must be at least 1 (got {args.batch_size}); "
                            "leave it out for the default")
    # PyTorch seeds are 64-bit; repeats and batches add to the seed, which leaves room for them in the signed range.
    if not -2**63 <= args.seed < 2**63:
        raise AutoDDPMError(f"--seed must be a whole number between {-2**63} and {2**63 - 1} (got {args.seed})")


def _skip_or_raise(error: AutoDDPMError, path: Path, single: bool, rows: list[SummaryRow]) -> None:
    """With one input its error is the run's; with several it is reported, that input skipped, the others run."""
    if single:
        raise error
    rows.append(SummaryRow(path.name, "failed", str(error), input=str(path)))
    print(f"autoddpm: error: {path}: {error}", file=sys.stderr)


def _check_inputs(inputs: list[Path], single: bool) -> tuple[list[Path], list[SummaryRow]]:
    """The inputs whose headers pass, checked before the model loads rather than minutes into a run.

    A single input that fails is an error; among several, each that fails is reported and left out.
    """
    from .volumes.volume_io import check_input

    passed, failures = [], []
    for path in inputs:
        try:
            check_input(path)
            passed.append(path)
        except AutoDDPMError as error:
            _skip_or_raise(error, path, single, failures)
    return passed, failures


def _process(engine, inputs: list[Path], output_dir: Path, reporter: Reporter, run: RunContext,
             single: bool) -> tuple[dict[Path, dict[str, Path]], list[SummaryRow]]:
    """Run every input, writing its outputs and their sidecar; one that fails is reported and skipped.

    Returns each finished input's output files (only their paths: a cohort's volumes are not held in memory) and
    the summary rows."""
    from .volumes.volume_io import input_stem, make_output_dir, read_scan, write_outputs_atomically

    done, rows = {}, []
    for path in inputs:
        stem = input_stem(path)
        try:
            with reporter.working_on(path):
                reporter.stage(path, "reading", 0.0)
                started = time.perf_counter()
                image = read_scan(path)
                reading_seconds = time.perf_counter() - started
                reporter.start(path, engine, image)
                result = engine.process_volume(image, lambda fraction, stage: reporter.stage(path, stage, 0.95 * fraction),
                                               name=path.name, repeats=run.settings.repeats)
                for warning in result.warnings:
                    reporter.warning(warning)
                reporter.stage(path, "writing", 0.97)
                images = {"pseudohealthy": result.pseudo_healthy, "anomaly": result.anomaly_map, "mask": result.mask,
                          "brain": result.brain_region, "spread": result.spread}
                outputs = {key: output_path(output_dir, stem, key).resolve() for key, image in images.items()
                           if image is not None}
                for key in outputs:
                    images[key].SetMetaData(NIFTI_DESCRIPTION_KEY, run.settings.nifti_description(result.threshold))
                record = run_record(run, input_path=path, image=image, engine=engine, result=result, outputs=outputs,
                                    reading_seconds=reading_seconds)
                # Created only now, so that a run that fails before its first result leaves no empty folder.
                make_output_dir(output_dir)
                # The sidecar lands last: where it is, the outputs it lists are too.
                files = {**{outputs[key]: images[key] for key in outputs},
                         sidecar_path(output_dir, stem).resolve(): record_bytes(record)}
                write_outputs_atomically(files)
                remove_other_outputs(output_dir, stem, list(files))
                reporter.done(path, outputs, engine, result)
            done[path] = outputs
            rows.append(SummaryRow(path.name, "ok", "", result.anomalous_volume_ml, result.slices, result.seconds,
                                   list(result.warnings), str(path)))
        except AutoDDPMError as error:
            _skip_or_raise(error, path, single, rows)
    return done, rows


def _run(args: argparse.Namespace) -> int:
    from .volumes.volume_io import check_output_dir, expand_inputs, input_stem

    if args.repeats < 1:
        raise AutoDDPMError("--repeats must be at least 1")
    _check_engine_options(args)
    ranks = Ranks.from_environment()
    inputs, passed_over = expand_inputs(args.inputs, skip_endings=tuple(OUTPUT_SUFFIXES.values()))
    if passed_over and ranks.is_first:
        print(f"autoddpm: skipping {len(passed_over)} file(s) named like lesion masks or AutoDDPM outputs: "
              + ", ".join(path.name for path in passed_over), file=sys.stderr)
    check_output_dir(args.output_dir)
    output_dir = Path(args.output_dir)
    stems = [input_stem(path) for path in inputs]
    duplicates = sorted({stem for stem in stems if stems.count(stem) > 1})
    if duplicates:
        raise AutoDDPMError(f"several inputs share the name {', '.join(duplicates)}: their outputs would overwrite each other; rename them or run them separately")
    # Every process decides the same from the same files, before any of them loads the model.
    earlier = earlier_outputs(output_dir, inputs, stems)
    settings = _settings(args) if args.resume and earlier else None
    done_before = settle_earlier_outputs(output_dir, earlier, settings, args.overwrite)

    reporter = make_reporter(args.progress)
    rows: list[SummaryRow] = []
    if ranks.is_first:
        for path, record in done_before.items():
            reason = f"done before with the same settings ({sidecar_path(output_dir, input_stem(path)).name})"
            reporter.skipped(path, reason)
            rows.append(SummaryRow.from_record(path, record, reason))
    single = len(inputs) == 1 and ranks.world == 1
    mine, rows_refused = _check_inputs(ranks.share([path for path in inputs if path not in done_before]), single)
    rows += rows_refused
    if mine:
        settings = settings or _settings(args)
        engine, run = _load_engine(args, settings, reporter, ranks)
        rows += _process(engine, mine, output_dir, reporter, run, single)[1]
    reporter.finished()
    every_row = ranks.gather(rows)
    if every_row is not None and len(inputs) > 1 and output_dir.is_dir():
        order = {str(path): index for index, path in enumerate(inputs)}
        summary = write_summary(sorted(every_row, key=lambda row: order[row.input]), output_dir)
        if args.progress == "bar":
            print(f"summary of {len(inputs)} inputs: {summary.resolve()}", file=sys.stderr)
    return 2 if any(row.status == "failed" for row in (rows if every_row is None else every_row)) else 0


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    import SimpleITK as sitk

    from .benchmark.figures import FigureRow, save_overview
    from .resources import resources_dir
    from .volumes.volume_io import check_output_dir, read_scan

    _check_engine_options(args)
    check_output_dir(args.output_dir)
    settings = _settings(args)
    reporter = make_reporter(args.progress)
    engine, run = _load_engine(args, settings, reporter, Ranks())  # one process: three samples at most
    modality = str(engine.card.data["modality"])
    if modality.upper() not in DEMO_SAMPLES:
        raise AutoDDPMError(f"no sample ships for {modality} models (only {', '.join(DEMO_SAMPLES)}); "
                            f"try `autoddpm run` on your own {modality} data")
    samples = [resources_dir() / "SampleData" / name for name in DEMO_SAMPLES[modality.upper()]]
    missing = [str(path) for path in samples if not path.is_file()]
    if missing:
        raise AutoDDPMError(f"the demo data {', '.join(missing)} is missing; reinstall AutoDDPM")
    output_dir = Path(args.output_dir)
    # The demo's folder is its own: a second demo replaces the first one's outputs.
    done, _ = _process(engine, samples, output_dir, reporter, run, single=True)
    rows, overlap, flagged, truth_voxels = [], 0, 0, 0
    for path in samples:
        arrays = {key: _slices(sitk.ReadImage(str(output))) for key, output in done[path].items()}
        image = _slices(read_scan(path))
        truth = _slices(sitk.ReadImage(str(path).replace(".nii.gz", "_mask.nii.gz"))) > 0
        # The slices with the most lesion, as the expert outlined it (three in all).
        for z in sorted(np.argsort(truth.reshape(len(truth), -1).sum(1))[-max(1, 3 // len(samples)):]):
            label = f"slice {z}" if len(truth) > 1 else path.name.replace(".nii.gz", "")
            rows.append(FigureRow(label, image[z], arrays["pseudohealthy"][z], arrays["anomaly"][z], arrays["mask"][z], truth[z]))
        mask = arrays["mask"] > 0
        overlap, flagged, truth_voxels = overlap + (mask & truth).sum(), flagged + mask.sum(), truth_voxels + truth.sum()
    figure = output_dir / "autoddpm-demo.png"
    save_overview(rows, figure)
    print(f"\nAutoDDPM demo on {', '.join(p.name for p in samples)} (model {engine.card.name}, schedule {engine.schedule_name}, "
          f"backend {engine.backend_name}):")
    for path in samples:
        for key, output in done[path].items():
            print(f"  {key:14s} {output.resolve()}")
    print(f"  {'figure':14s} {figure.resolve()}")
    dice = 2 * overlap / max(flagged + truth_voxels, 1)
    print(f"Dice against the lesion masks: {dice:.3f} (threshold {engine.threshold:.4g} from the model card)")
    return 0


def _slices(image):
    """The image's voxels as [slices, rows, columns]; a 2D image is one slice."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    return array[None] if array.ndim == 2 else array


def _models(args: argparse.Namespace) -> int:
    from .models.bundle import list_bundled_models
    from .models.validation import validation_headline

    cards = list_bundled_models()
    if args.json:
        print(json.dumps([dict(card.data, path=str(card.path.parent)) for card in cards], indent=2))
        return 0
    if not cards:
        print("no bundled models")
        return 0
    # The threshold `autoddpm run` applies by default: on the post-processed map where the card post-processes.
    print(f"{'name':18s} {'modality':9s} {'grid':>7s} {'tau':>7s} {'threshold':>9s}  {'calibrated for':16s}  license")
    for card in cards:
        calibrated = ", ".join(s for s in SCHEDULES if card.thresholds_for(s)[2]) or "NOTHING"
        print(f"{card.name:18s} {card.data['modality']:9s} {card.image_size:>4d} px {card.mask_threshold:7.4f} "
              f"{card.run_threshold(DEFAULT_SCHEDULE):9.3g}  {calibrated:16s}  {card.data.get('license', '?')}")
        print(f"{'':18s} validation: {validation_headline(card)}")
        deepbet = option_settings("deepbet", card.postprocessing) if card.postprocessing else None
        if deepbet and card.postprocessed_threshold(DEFAULT_SCHEDULE, deepbet) is not None:
            print(f"{'':18s} --postprocess deepbet: threshold {card.run_threshold(DEFAULT_SCHEDULE, deepbet):.3g}, "
                  f"validation: {validation_headline(card, 'deepbet')}")
        for option in ("card", "deepbet") if card.postprocessing else ():
            stripped = for_skull_stripped_input(option_settings(option, card.postprocessing))
            if card.postprocessed_threshold(DEFAULT_SCHEDULE, stripped) is not None:
                print(f"{'':18s} skull-stripped inputs, --postprocess {option}: threshold "
                      f"{card.run_threshold(DEFAULT_SCHEDULE, stripped):.3g}, validation: "
                      f"{validation_headline(card, option, skull_stripped=True)}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .training.calibrate import calibrate

    # Calibrating the reference schedule takes hours on a CPU: show how far it is, from its first progress on,
    # so that what calibrate refuses first (options, model, data) is the only line printed.
    bars = []

    def progress(fraction: float, stage: str) -> None:
        if not bars:
            bars.append(tqdm(total=100, desc=f"calibrating ({args.schedule})", unit="%",
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"))
        bars[0].update(round(100 * fraction) - bars[0].n)
        bars[0].set_postfix_str(stage)

    try:
        thresholds = calibrate(args.model_dir, args.data, schedule=args.schedule, mask_fraction=args.mask_fraction,
                               healthy_fpr=args.healthy_fpr, max_slices=args.max_slices, device=args.device,
                               seed=args.seed, progress=progress, backend=args.backend, coarse_start=args.coarse_start,
                               lpips_size=args.lpips_size, resample_start=args.resample_start,
                               mask_dilation=args.mask_dilation, with_deepbet=args.with_deepbet,
                               with_stripped=args.with_stripped)
    finally:
        for bar in bars:
            bar.close()
    info = thresholds["calibration"]
    print(f"tau = {thresholds['mask_tau']:.5f} (flags {100 * info['flagged_by_tau']:.2f}% of healthy tissue), "
          f"anomaly threshold = {thresholds['anomaly']:.5f} (flags {100 * info['flagged_by_anomaly_threshold']:.2f}%), "
          f"from {info['healthy_slices']} healthy slices; written to {Path(args.model_dir) / 'model.json'}")
    for entry in [thresholds.get("postprocessed")] + thresholds.get("postprocessed_alternatives", []):
        if entry:
            print(f"threshold on the map post-processed with {PostProcessing.from_dict(entry['settings']).describe()} "
                  f"= {entry['anomaly']:.5f}, from {entry['calibration']['volumes']} whole volumes")
    return 0


def _add_backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS),
                        help="what runs the network: torch, onnxruntime (CPU only; pip install \"autoddpm[onnx]\") or "
                             "auto (default: onnxruntime on the CPU when installed, else torch)")


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="bundled model name or model folder (default: flair-lgg; see `autoddpm models`)")
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=list(SCHEDULES),
                        help="fast: strided steps, 25 network evaluations per slice (default); reference: the paper's 451")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    _add_backend_option(parser)
    parser.add_argument("--postprocess", default="card", choices=list(POSTPROCESS_CHOICES),
                        help="card: the model card's post-processing of the anomaly map (which deviations count, brain region, "
                             "3D median, small components removed; default); deepbet: the same with deepbet's brain mask as "
                             "the brain region (pip install --no-deps deepbet==1.0.2); none: the paper's raw map |x - x_ph| * M")
    parser.add_argument("--threshold", type=float, default=None, help="threshold on the anomaly map for the mask (default: the model card's calibrated value for the --postprocess chosen)")
    parser.add_argument("--skull-stripped", default="auto", choices=list(SKULL_STRIPPED_CHOICES),
                        help="whether the inputs are skull-stripped: auto (default) looks at each (is the background "
                             "around the brain exactly one value?); a stripped input gets the model card's threshold "
                             "for stripped inputs where it has one (see `autoddpm models`)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same result")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per batch (default 16 on CPU, 64 on GPU; halved on out-of-memory)")
    parser.add_argument("--progress", default="bar", choices=["bar", "json", "none"], help="a progress bar, JSON lines for programs, or nothing")


def _train(args: argparse.Namespace) -> int:
    from .diffusion.unet import UNetConfig
    from .models.bundle import read_card, resolve_model
    from .training.acquisition_augmentation import AcquisitionAugmentation
    from .training.train import TrainConfig, Trainer, read_checkpoint_config

    if args.snapshot_steps is not None and args.snapshot_steps < 0:
        raise AutoDDPMError(f"--snapshot-steps must be at least 0 (got {args.snapshot_steps}); 0 keeps no snapshots")
    if args.resume:
        config = read_checkpoint_config(args.output)
    else:
        if not args.data:
            raise AutoDDPMError("give the training data with --data FOLDER (or a text file listing images)")
        unet = UNetConfig(
            image_size=args.image_size,
            channels=tuple(args.channels),
            attention_levels=tuple(i == len(args.channels) - 1 for i in range(len(args.channels))),
            layers_per_block=args.layers_per_block,
        )
        defaults = TrainConfig(data=[])
        percentiles, min_foreground, max_timestep = defaults.percentiles, defaults.min_foreground_fraction, args.max_timestep
        if args.init_from:
            start = read_card(resolve_model(args.init_from))
            unet = UNetConfig.from_dict(start.data["unet"])
            percentiles, min_foreground = start.intensity_percentiles, start.min_foreground_fraction
            max_timestep = start.max_timestep + 1
        config = TrainConfig(
            data=[str(Path(d).resolve()) for d in args.data],
            validation_data=[str(Path(d).resolve()) for d in args.validation_data],
            name=args.name or Path(args.output).name,
            modality=args.modality,
            description=args.description,
            valid_for=args.valid_for,
            license=args.license,
            unet=unet,
            percentiles=percentiles,
            min_foreground_fraction=min_foreground,
            max_timestep=max_timestep,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            augmentation=AcquisitionAugmentation(gamma=args.augment_gamma, contrast=args.augment_contrast,
                                                 bias_field=args.augment_bias_field, skull_strip=args.augment_skull_strip),
        )
    for key in ("steps", "max_minutes", "checkpoint_minutes", "snapshot_steps", "slice_levels"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    if args.covers_skull_stripped is not None:  # what the card says about its inputs, correctable on resume too
        config.covers_skull_stripped = args.covers_skull_stripped == "yes"
    trainer = Trainer(config, Path(args.output), device=args.device)
    if args.resume:
        trainer.load_checkpoint()
    elif args.init_from:
        trainer.initialise_from(start)
    trainer.run()
    print(f"model bundle: {Path(args.output).resolve()} (step {trainer.step}, best validation MSE {trainer.best_validation:.5f})")
    return 0


def _prepare_slices(args: argparse.Namespace) -> int:
    from .models.bundle import read_card, resolve_model
    from .training.slice_file import write_slice_file
    from .training.train import TrainConfig
    from .training.training_data import load_healthy_slices

    defaults = TrainConfig(data=[])
    size, percentiles, min_foreground = args.image_size, defaults.percentiles, defaults.min_foreground_fraction
    if args.like:
        card = read_card(resolve_model(args.like))
        size, percentiles, min_foreground = card.image_size, card.intensity_percentiles, card.min_foreground_fraction
    sources = [str(Path(d).resolve()) for d in args.data]
    slices = load_healthy_slices(sources, size, percentiles, min_foreground)
    write_slice_file(args.output, slices, percentiles, min_foreground, sources)
    print(f"{len(slices)} healthy slices on the {size}x{size} grid: {Path(args.output).resolve()}")
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """Reports a bad command line as every other error is: one line, exit 2 (not the usage, then the error)."""

    def error(self, message: str):
        self.exit(2, f"autoddpm: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="autoddpm",
        description="AutoDDPM: unsupervised anomaly detection in brain MRI with diffusion models (mask, stitch, re-sample).",
    )
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: all cores; waiting threads sleep, so runs that share the cores "
                             "share their time rather than slowing each other down)")
    parser.add_argument("--nice", action="store_true",
                        help="run below normal CPU priority, so an interactive application on the same cores stays "
                             "responsive (the Slicer module sets it)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="find anomalies in volumes: pseudo-healthy volume, anomaly map and mask")
    run.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="NIfTI, NRRD, MHA, PNG file, DICOM series folder, or a folder of image files "
                          "(every one in it except *_mask/_anomaly/_pseudohealthy/_spread.nii.gz)")
    run.add_argument("--output-dir", required=True,
                     help="folder for <name>_pseudohealthy/_anomaly/_mask.nii.gz, <name>_autoddpm.json (how they were "
                          "made) and, with several inputs, summary.csv")
    _add_engine_options(run)
    run.add_argument("--repeats", type=int, default=1, metavar="N",
                     help="run N times with different seeds (N times the time): the outputs are the mean over the runs, "
                          "and <name>_spread.nii.gz the per-voxel standard deviation of their anomaly maps")
    run.add_argument("--resume", action="store_true",
                     help="skip the inputs whose outputs in --output-dir were made with the same settings "
                          "(as their <name>_autoddpm.json records), e.g. to continue an interrupted cohort run")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the outputs an earlier run left in --output-dir (refused without it or --resume)")
    run.set_defaults(handler=_run)

    demo = commands.add_parser("demo", help="run on the bundled sample FLAIR volume and draw a figure")
    demo.add_argument("--output-dir", default="autoddpm-demo", help="where to write (default ./autoddpm-demo)")
    _add_engine_options(demo)
    demo.set_defaults(handler=_demo)

    models = commands.add_parser("models", help="list the bundled models")
    models.add_argument("--json", action="store_true", help="print the model cards as JSON")
    models.set_defaults(handler=_models)

    calibrate = commands.add_parser("calibrate", help="set a model's thresholds from healthy held-out data")
    calibrate.add_argument("model_dir", metavar="MODEL_DIR")
    calibrate.add_argument("--data", action="append", required=True, help="healthy images/volumes (lesion slices excluded by *_mask files); repeatable")
    calibrate.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=list(SCHEDULES))
    calibrate.add_argument("--mask-fraction", type=float, default=0.05, help="share of healthy tissue tau marks for re-sampling (reference: 0.05)")
    calibrate.add_argument("--healthy-fpr", type=float, default=0.01, help="share of healthy tissue the output mask may flag (default 0.01)")
    calibrate.add_argument("--max-slices", type=int, default=256)
    calibrate.add_argument("--coarse-start", type=int, default=None, metavar="LEVEL", help="start the schedule's coarse reconstruction at this noise level and calibrate for it (written to the card; default: the card's level, 200 as in the paper)")
    calibrate.add_argument("--resample-start", type=int, default=None, metavar="LEVEL", help="start the schedule's stitch-and-re-sample stage at this noise level and calibrate for it (written to the card; default: the card's level, 50 as in the paper)")
    calibrate.add_argument("--lpips-size", type=int, default=None, metavar="PIXELS", help="resize slices to this size for LPIPS in the mask step and calibrate for it (written to the card, for every schedule; default: the card's, else the model grid)")
    calibrate.add_argument("--with-deepbet", action="store_true",
                           help="also calibrate the threshold for `--postprocess deepbet` (the same maps, post-processed "
                                "with deepbet's brain region; pip install --no-deps deepbet==1.0.2)")
    calibrate.add_argument("--with-stripped", action="store_true",
                           help="also calibrate the thresholds for skull-stripped inputs (each --data volume again, set to 0 "
                                "outside the card's brain region; the maps take as long again), which `autoddpm run` "
                                "uses for an input that looks skull-stripped")
    calibrate.add_argument("--mask-dilation", type=int, default=None, metavar="PIXELS", help="dilate the schedule's step-1 mask by a square of this odd size on the model grid and calibrate for it (written to the card; default: the card's, else the paper's 3)")
    calibrate.add_argument("--device", default="auto")
    _add_backend_option(calibrate)
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.set_defaults(handler=_calibrate)

    # The Slicer extension installs the engine without its benchmark (the pip package has it).
    if importlib.util.find_spec(f"{__package__}.benchmark") is not None:
        from .benchmark.runner import add_benchmark_command

        add_benchmark_command(commands)

    prepare = commands.add_parser("prepare-slices", help="write a cohort's healthy training slices to one file, to train where the data is not")
    prepare.add_argument("--data", action="append", required=True, help="folder of healthy images/volumes (with optional *_mask lesion masks) or a text file listing them; repeatable")
    prepare.add_argument("--output", required=True, help="slice file to write (.safetensors); give it to `autoddpm train --data`")
    prepare.add_argument("--like", default=None, metavar="MODEL", help="take the grid and preprocessing of this model (for `train --init-from MODEL`)")
    prepare.add_argument("--image-size", type=int, default=64, help="model grid in pixels, without --like (default 64)")
    prepare.set_defaults(handler=_prepare_slices)

    train = commands.add_parser("train", help="train a healthy-brain model and write a model bundle")
    train.add_argument("--data", action="append", default=[], help="folder of healthy images/volumes (with optional *_mask lesion masks), a text file listing them, or a file from `autoddpm prepare-slices`; repeatable")
    train.add_argument("--output", required=True, help="model bundle folder to write (checkpoints go in its checkpoint/ subfolder)")
    train.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --output")
    train.add_argument("--init-from", default=None, metavar="MODEL", help="start from a trained model's weights (name or folder), e.g. to fine-tune on your own healthy cohort; its architecture and preprocessing are kept")
    train.add_argument("--validation-data", action="append", default=[], help="held-out healthy data for picking the best checkpoint (default: slices held out of --data)")
    train.add_argument("--name", default=None, help="model name for its card (default: the output folder's name)")
    train.add_argument("--modality", default="unknown", help="e.g. FLAIR or T1, recorded in the card")
    train.add_argument("--description", default="", help="one line for the card")
    train.add_argument("--valid-for", default="axial slices", help="what inputs the model suits, for its card, e.g. 'axial FLAIR, whole brain, all slice levels'")
    train.add_argument("--slice-levels", choices=SLICE_LEVELS, default=None,
                       help="'all' (default) or 'mid-axial' when the data is one mid-axial slice per subject: then "
                            "`autoddpm run` warns when given other levels (with --resume: corrects the card)")
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
    train.add_argument("--snapshot-steps", type=int, default=None, metavar="N",
                       help="also keep the EMA weights every N steps as a bundle of their own in OUTPUT/snapshots/step-NNNNNN, "
                            "to choose the checkpoint on development sets afterwards (default: none)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (under torchrun: one GPU per process)")
    train.add_argument("--seed", type=int, default=0)
    augmentation = train.add_argument_group(
        "acquisition augmentation", "simulate other scanners and skull-stripped inputs (off by default; on the "
        "preprocessed [0, 1] slices, each slice its own draw; recorded in the card's training config)")
    augmentation.add_argument("--augment-gamma", type=float, default=0.0, metavar="G",
                              help="raise each slice to a gamma in [exp(-G), exp(G)], e.g. 0.3")
    augmentation.add_argument("--augment-contrast", type=float, default=0.0, metavar="C",
                              help="scale each slice's intensities by a factor in [exp(-C), exp(C)], clipped at 1, e.g. 0.15")
    augmentation.add_argument("--augment-bias-field", type=float, default=0.0, metavar="B",
                              help="multiply each slice by a smooth field exp(a * f), f in [-1, 1], a up to B, e.g. 0.3")
    augmentation.add_argument("--augment-skull-strip", type=float, default=0.0, metavar="P",
                              help="set each slice to 0 outside its brain region with probability P (the region "
                                   "flair-lgg's post-processing uses: the head eroded by 12 mm), e.g. 0.3")
    augmentation.add_argument("--covers-skull-stripped", choices=["yes", "no"], default=None,
                              help="whether the model is meant for skull-stripped scans, for the card's covers "
                                   "(`autoddpm run` warns on a stripped input with 'no'); default: yes with "
                                   "--augment-skull-strip, else not recorded (with --resume: corrects the card)")
    train.set_defaults(handler=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``autoddpm`` console script; returns the exit code."""
    wait_passively()  # before anything imports torch (the benchmark commands' parser does)
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a bare `autoddpm` asks what it can do
        parser.print_usage(sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a bad command line that argparse reported: its code, as for any error
        return stop.code
    args.command_line = "autoddpm " + shlex.join(argv)  # for the sidecars
    try:
        if args.threads is not None and args.threads < 1:
            raise AutoDDPMError(f"--threads must be at least 1 (got {args.threads}); leave it out for the default")
        if args.nice:
            lower_priority()
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
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): stop quietly, as Unix tools do.
        sys.stdout = open(os.devnull, "w")
        return 141


if __name__ == "__main__":
    sys.exit(main())
