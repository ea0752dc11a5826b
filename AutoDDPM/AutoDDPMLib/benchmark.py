"""``autoddpm benchmark``: detection quality, pseudo-healthy fidelity and cost, AutoDDPM against baselines.

Everything is evaluated on the model grid, with slices prepared exactly as
inference prepares them (the card's intensity percentiles and signal test,
``slices.to_model_grid``); ground-truth masks go through the same
``to_model_grid`` and are thresholded at 0.5.

Datasets (under the data root, ``../shared/data`` of the repository by default):

* ``lgg``: LGG FLAIR validation patients (``lgg_flair/val``), whole volumes: every
  slice with signal, with and without tumour; expert masks.
* ``lgg-synth``: lesion-free LGG validation slices with synthetic lesions
  (:mod:`lesions`), one per size bin per slice, plus the clean slices.
* ``ixi``: IXI T1 validation slices (``ixi_t1_midaxial/val``) with synthetic
  lesions, one per size bin per slice, plus the clean slices.
* ``lgg-dev``: the tumour slices of every 8th LGG training patient
  (``lgg_flair/train``). Training only ever sees lesion-free slices, so these
  tumours are unseen: a development set for choosing a recipe without looking
  at the validation patients. Never a default; its lesion-free slices are left
  out (their healthy tissue was trained on).
* ``ixi-dev``: every 8th IXI T1 training slice with synthetic lesions, as ``ixi``:
  the T1 development set. The lesions are new to the model but the tissue around
  them is not, so it flatters; for comparing recipes only. Never a default.

By default the datasets follow the model card's modality (FLAIR: lgg and
lgg-synth; T1: ixi; otherwise all three): a model is benchmarked on the
contrast it was trained for.

Methods: AutoDDPM with the card's ``fast`` and ``reference`` schedules (the
final map A; a full run adds ``mid``, fast's start with 100 evaluations),
fixed-noise DDPM reconstruction ("AnoDDPM", map |x - x_rec|) from t = 50,
100, 200, 300, 500, the plain residual |x - x_rec| of AutoDDPM's own coarse
reconstruction (no extra network evaluations), and, as a reference point for
how hard a dataset is, the input intensity itself (no model: a bright lesion
on a dark background is found by a threshold alone; a dark one is not).

Thresholds, each reported separately:

* ``calibrated`` (honest): AutoDDPM uses the model card's anomaly threshold. A
  baseline has no card threshold, so it gets the one that flags the same
  fraction of healthy foreground pixels on healthy calibration slices (the
  card's own calibration data if it records it, else the training split):
  the card's ``healthy_fpr`` when calibrated, else the fraction AutoDDPM-fast
  flags there at the card's threshold. Every method is compared at the same
  healthy false-positive budget, and no test label is used.
* ``oracle``: the best threshold chosen on the evaluated data itself: the
  reference's 101 thresholds in [0, 1] plus 401 quantiles of the map's positive
  values (AutoDDPM's A often lives in [0, 0.05], too fine for a 0.01 grid). An
  upper bound, labelled as such.

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
method run is kept in ``OUTPUT_DIR/partial`` (:mod:`benchmark_parts`), and the
same command with ``--resume`` goes on from there after a stop.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import resource
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .benchmark_data import is_prepared_data, read_prepared_data, write_prepared_data
from .benchmark_parts import PartStore, array_digest, engine_digest, file_digest
from .bundle import WEIGHTS_FILE
from .errors import AutoDDPMError
from .onnx_backend import BACKENDS
from .provenance import command_line, git_commit

DATASETS = ("lgg", "lgg-synth", "ixi", "lgg-dev", "ixi-dev")
DEV_STRIDE = 8  # the development sets: every 8th training patient (lgg-dev: 10 of 80) or subject (ixi-dev: 58 of 461)
ANODDPM_LEVELS = (50, 100, 200, 300, 500)
INTENSITY_METHOD = "Input intensity (no model)"
BIN_ORDER = ("all", "small", "medium", "large")

# Sizes of a --quick run (about 15 minutes for a 64x64 4.5M-parameter model on 2 CPU cores).
QUICK = dict(max_volumes=3, max_images=8, reference_cases=8, calibration_slices=16, baseline_steps=10)
FULL = dict(max_volumes=None, max_images=None, reference_cases=None, calibration_slices=48, baseline_steps=None)


def default_data_root() -> Optional[Path]:
    """``<repository>/../shared/data`` when it exists (a development checkout), else None."""
    candidate = Path(__file__).resolve().parents[3] / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


@dataclass
class EvalSet:
    """Cases on the model grid: inputs, truth, the healthy image when known, grouping."""

    name: str
    x: Any  # torch.Tensor [C, 1, N, N] in [0, 1]
    truth: np.ndarray  # bool [C, N, N]
    healthy: Optional[np.ndarray]  # float32 [C, N, N] or None
    volumes: list[str]  # volume (LGG) or case id per case
    bins: list[str]  # size bin per case
    description: str = ""
    per_volume: bool = False  # whether ``volumes`` are real volumes (timing per volume)

    def __len__(self) -> int:
        return len(self.volumes)

    @property
    def foreground(self) -> np.ndarray:
        from .slices import FOREGROUND_LEVEL

        return self.x[:, 0].numpy() > FOREGROUND_LEVEL

    def groups(self) -> list[np.ndarray]:
        """Case indices per volume (per_volume) or one group of all cases."""
        if not self.per_volume:
            return [np.arange(len(self))]
        ids = np.asarray(self.volumes)
        return [np.flatnonzero(ids == v) for v in dict.fromkeys(self.volumes)]


def _volume_slices(image_path: Path, mask_path: Optional[Path], card):
    """All slices with signal of a volume on the model grid, and the mask on the same grid (> 0.5)."""
    from .slices import AxialStack, has_signal, intensity_window, normalize, to_model_grid
    from .volume_io import read_volume

    percentiles, min_fraction = card.intensity_percentiles, card.min_foreground_fraction
    stack = AxialStack.from_image(read_volume(image_path))
    slices01 = normalize(stack.array, intensity_window(stack.array, percentiles))
    keep = np.array([has_signal(s, min_fraction) for s in slices01], dtype=bool)
    if not keep.any():
        return None, None, keep
    grid, _ = to_model_grid(slices01[keep], stack.pixel_spacing, card.image_size)
    if mask_path is None:
        truth = np.zeros((int(keep.sum()), card.image_size, card.image_size), dtype=bool)
    else:
        mask = AxialStack.from_image(read_volume(mask_path)).array
        if mask.shape != stack.array.shape:
            raise AutoDDPMError(f"mask {mask_path} has shape {mask.shape}, its image {image_path} {stack.array.shape}")
        mask_grid, _ = to_model_grid((mask[keep] > 0).astype(np.float32), stack.pixel_spacing, card.image_size)
        truth = mask_grid[:, 0].numpy() > 0.5
    return grid, truth, keep


def load_lgg(folder: Path, card, max_volumes: Optional[int], name: str = "lgg", stride: int = 1,
             lesion_only: bool = False) -> EvalSet:
    """LGG FLAIR patients (every ``stride``-th): every slice with signal, tumour and tumour-free (or tumour only)."""
    import torch

    from .metrics import size_bin
    from .training_data import find_training_images

    pairs = [p for p in find_training_images(folder) if p[1] is not None][::stride]
    if max_volumes:
        pairs = pairs[:max_volumes]
    xs, truths, volumes = [], [], []
    for image, mask in pairs:
        grid, truth, _ = _volume_slices(image, mask, card)
        if grid is not None and lesion_only:
            keep = truth.any(axis=(1, 2))
            grid, truth = (grid[torch.as_tensor(keep)], truth[keep]) if keep.any() else (None, None)
        if grid is None:
            continue
        patient = image.name.split("_flair")[0] if "_flair" in image.name else image.name.split(".")[0]
        xs.append(grid)
        truths.append(truth)
        volumes += [patient] * len(grid)
    if not xs:
        raise AutoDDPMError(f"no image/mask pairs with signal in {folder}")
    truth = np.concatenate(truths)
    n = card.image_size
    which = f"every {stride}th patient" if stride > 1 else "patients"
    slices = f"their {len(volumes)} tumour slices" if lesion_only else f"all {len(volumes)} slices with signal"
    return EvalSet(
        name=name,
        x=torch.cat(xs),
        truth=truth,
        healthy=None,
        volumes=volumes,
        bins=[size_bin(int(t.sum()), n) for t in truth],
        description=f"LGG FLAIR ({folder}): {len(pairs)} {which}, {slices}, expert masks",
        per_volume=True,
    )


def load_lgg_dev(train_folder: Path, card, max_volumes: Optional[int] = None) -> EvalSet:
    """The development set: the tumour slices of every DEV_STRIDE-th training patient (training saw none)."""
    return load_lgg(train_folder, card, max_volumes, name="lgg-dev", stride=DEV_STRIDE, lesion_only=True)


def _png_slice(path: Path, card):
    grid, _, _ = _volume_slices(path, None, card)
    return None if grid is None else grid[0, 0].numpy()


def synthetic_set(name: str, healthy_slices: list[np.ndarray], ids: list[str], seed: int, source: str) -> EvalSet:
    """Each healthy slice once clean and once with a synthetic lesion per size bin."""
    import torch

    from .lesions import add_lesion
    from .metrics import LESION_FREE, SIZE_BIN_NAMES

    xs, truths, healthies, volumes, bins = [], [], [], [], []
    for i, (image, case) in enumerate(zip(healthy_slices, ids)):
        xs.append(image)
        truths.append(np.zeros(image.shape, dtype=bool))
        healthies.append(image)
        volumes.append(f"{case}:clean")
        bins.append(LESION_FREE)
        for b, bin_name in enumerate(SIZE_BIN_NAMES):
            try:
                lesioned, mask = add_lesion(image, bin_name, seed=np.random.default_rng([seed, i, b]))
            except ValueError as error:
                _log(f"{case}: no {bin_name} lesion ({error})")
                continue
            xs.append(lesioned)
            truths.append(mask)
            healthies.append(image)
            volumes.append(f"{case}:{bin_name}")
            bins.append(bin_name)
    x = torch.from_numpy(np.stack(xs)).float()[:, None]
    return EvalSet(
        name=name,
        x=x,
        truth=np.stack(truths),
        healthy=np.stack(healthies).astype(np.float32),
        volumes=volumes,
        bins=bins,
        description=f"{source}: {len(healthy_slices)} healthy slices, each clean and with one synthetic lesion per size bin (seed {seed})",
    )


def load_ixi(folder: Path, card, max_images: Optional[int], seed: int, name: str = "ixi", stride: int = 1) -> EvalSet:
    """Every ``stride``-th IXI slice of ``folder`` (at most ``max_images``), with synthetic lesions."""
    pngs = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".png")[::stride]
    if max_images:
        pngs = pngs[:max_images]
    images, ids = [], []
    for p in pngs:
        s = _png_slice(p, card)
        if s is not None:
            images.append(s)
            ids.append(p.stem)
    if not images:
        raise AutoDDPMError(f"no PNG slices with signal in {folder}")
    source = f"IXI T1 ({folder}{f', every {stride}th subject' if stride > 1 else ''})"
    return synthetic_set(name, images, ids, seed, source)


def load_ixi_dev(train_folder: Path, card, max_images: Optional[int] = None, seed: int = 0) -> EvalSet:
    """The T1 development set: synthetic lesions on every DEV_STRIDE-th training slice.

    Unlike lgg-dev's tumours, the healthy tissue around these lesions was trained on,
    so the set flatters a model; it serves to compare recipes, not to report.
    """
    return load_ixi(train_folder, card, max_images, seed, name="ixi-dev", stride=DEV_STRIDE)


def _spread(n_total: int, n: Optional[int]) -> np.ndarray:
    """``n`` indices spread evenly over ``range(n_total)`` (all without ``n``)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    if n <= 0:
        return np.zeros(0, dtype=int)
    return np.unique(np.round(np.linspace(0, n_total - 1, n)).astype(int))


def load_lgg_synthetic(folder: Path, card, max_images: Optional[int], seed: int) -> EvalSet:
    """Lesion-free slices of the LGG validation patients, nearest the volume's middle, with synthetic lesions.

    Mid-volume sections show brain with room for a large lesion; the lowest
    sections (orbits, skull base) would put lesions into the face.
    """
    from .training_data import find_training_images

    candidates, ids = [], []
    for image, mask in find_training_images(folder):
        grid, truth, _ = _volume_slices(image, mask, card)
        if grid is None:
            continue
        free = np.flatnonzero(~truth.reshape(len(truth), -1).any(axis=1))
        middle = (len(grid) - 1) / 2
        for k in sorted(free, key=lambda i: abs(i - middle))[:4]:
            candidates.append(grid[k, 0].numpy())
            ids.append(f"{image.name.split('_flair')[0]}#{k}")
    if not candidates:
        raise AutoDDPMError(f"no lesion-free slices with signal in {folder}")
    pick = _spread(len(candidates), max_images or 40)
    return synthetic_set(
        "lgg-synth", [candidates[i] for i in pick], [ids[i] for i in pick], seed, f"LGG FLAIR lesion-free slices ({folder})"
    )


def calibration_slices(family: str, root: Path, card, count: int):
    """Healthy slices for the baselines' thresholds, disjoint from every evaluated case.

    The card's own calibration data when it records folders that exist (family
    ``"card"``), else the training split of the dataset's family.
    """
    import torch

    from .training_data import find_training_images, healthy_slices

    percentiles, min_fraction = card.intensity_percentiles, card.min_foreground_fraction
    if family == "card":
        sources = [Path(d) for d in card.data["thresholds"]["calibration"]["data"]]
        pairs = [pair for source in sources for pair in find_training_images(source)]
        where = ", ".join(str(d) for d in sources) + " (the card's calibration data)"
    else:
        folder = root / ("lgg_flair/train" if family == "lgg" else "ixi_t1_midaxial/train")
        if not folder.is_dir():
            raise AutoDDPMError(f"calibration data {folder} does not exist (the benchmark calibrates baselines on the training split)")
        pairs = find_training_images(folder)
        where = str(folder)
    chosen = [pairs[i] for i in _spread(len(pairs), max(8, count // 4))]
    slices = [healthy_slices(img, mask, card.image_size, percentiles, min_fraction) for img, mask in chosen]
    slices = torch.cat([s for s in slices if len(s)])
    return slices[torch.as_tensor(_spread(len(slices), count))], f"{len(chosen)} files of {where}"


def _calibration_family(card, dataset_name: str) -> str:
    calibration = card.data.get("thresholds", {}).get("calibration", {})
    data = calibration.get("data") if card.data.get("thresholds", {}).get("calibrated") else None
    if isinstance(data, list) and data and all(Path(d).exists() for d in data):
        return "card"
    return "ixi" if dataset_name.startswith("ixi") else "lgg"


# ----------------------------------------------------------------------------- methods


@dataclass
class Method:
    name: str
    kind: str  # "autoddpm" | "anoddpm" | "residual" | "intensity"
    schedule: str = "fast"  # AutoDDPM schedule (autoddpm, residual)
    level: int = 0  # AnoDDPM start level
    steps: int = 0  # AnoDDPM reverse steps
    evaluations: int = 0
    subset_only: bool = False


@dataclass
class MethodRun:
    """One method's outputs on one EvalSet (only the cases in ``indices`` were run)."""

    method: Method
    indices: np.ndarray
    scores: np.ndarray  # float32 [C, N, N]; NaN for cases not run
    pseudo_healthy: np.ndarray  # float32 [C, N, N]
    seconds: float = 0.0
    group_seconds: list[float] = field(default_factory=list)
    cuda_peak_mb: Optional[float] = None
    threshold: float = float("nan")  # calibrated threshold
    fidelity: dict[str, np.ndarray] = field(default_factory=dict)


def benchmark_schedules(card) -> dict:
    """The card's ``fast`` and ``reference`` schedules, and ``mid``: fast's start with 50 coarse steps and 10 levels x 5 re-samples."""
    import dataclasses

    fast = card.schedule("fast")
    mid = dataclasses.replace(fast, coarse_steps=50, resample_steps=10, resample_jumps=5)
    return {"fast": fast, "reference": card.schedule("reference"), "mid": mid}


def build_methods(card, quick: bool, baseline_steps: Optional[int], notes: list[str]) -> list[Method]:
    schedules = benchmark_schedules(card)
    fast, reference, mid = schedules["fast"], schedules["reference"], schedules["mid"]
    methods = [
        Method("AutoDDPM fast", "autoddpm", "fast", evaluations=fast.evaluations),
        Method("AutoDDPM reference", "autoddpm", "reference", evaluations=reference.evaluations, subset_only=quick),
        Method("Residual (coarse, fast)", "residual", "fast", evaluations=fast.coarse_steps),
    ]
    if not quick:  # a point between the two on the speed/quality curve
        methods.insert(1, Method(f"AutoDDPM mid ({mid.evaluations} evals)", "autoddpm", "mid", evaluations=mid.evaluations))
    if not quick:
        methods.append(Method("Residual (coarse, reference)", "residual", "reference", evaluations=reference.coarse_steps))
    for t in ANODDPM_LEVELS:
        if t == card.max_timestep + 1:
            # Models trained on levels 0..499 cover the reference's t=500 up to one level (alpha_bar 0.0786 vs 0.0778).
            notes.append(f"AnoDDPM t={t} runs from level {card.max_timestep}, the highest the model was trained on.")
            t = card.max_timestep
        elif t > card.max_timestep:
            notes.append(f"AnoDDPM t={t} skipped: the model was trained on noise levels up to {card.max_timestep} only.")
            continue
        steps = t + 1 if baseline_steps is None else min(int(baseline_steps), t + 1)
        methods.append(Method(f"AnoDDPM t={t}", "anoddpm", level=t, steps=steps, evaluations=steps))
    methods.append(Method(INTENSITY_METHOD, "intensity"))
    return methods


class Runner:
    """Runs methods on batches of slices, timing them, with a seed per (method, batch).

    Every network run goes through ``parts``: a resumed benchmark reads back what
    an earlier run of the same command finished instead of running it again.
    """

    def __init__(self, card, device, batch_size: int, seed: int, backend: str, parts: PartStore) -> None:
        import torch

        from .networks import load_network
        from .lpips import load_lpips
        from .pipeline import AutoDDPMPipeline
        from .scheduler import DDPMScheduler

        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        self.card = card
        self.parts = parts
        unet, self.backend, self.backend_note = load_network(card, device, backend)
        self.lpips = load_lpips(device)
        self.pipelines = {
            name: AutoDDPMPipeline(unet, DDPMScheduler(), self.lpips, card.thresholds_for(name)[0], schedule=schedule)
            for name, schedule in benchmark_schedules(card).items()
        }
        self.torch = torch
        self._cache: dict = {}
        self._evalset = ""

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _generator(self, method_index: int, batch_index: int):
        salt = zlib.crc32(self._evalset.encode()) % 1_000_000
        return self.torch.Generator().manual_seed(self.seed * 1_000_003 + salt * 1_009 + method_index * 10_007 + batch_index)

    def _cuda_peak(self) -> np.ndarray:
        peak = self.torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else np.nan
        return np.array([peak], np.float64)

    def run_autoddpm(self, schedule: str, x, groups: list[np.ndarray], method_index: int,
                     coarse_only: bool = False) -> dict[str, np.ndarray]:
        """AutoDDPM on x's cases: anomaly, ph and the coarse reconstruction rec, with the seconds per group
        in total and for the coarse stage alone (the residual method's time).

        ``coarse_only`` stops after step 1 (anomaly and ph stay NaN): the same rec, drawn
        from the same noise, for a residual whose AutoDDPM run is not needed.
        """
        torch = self.torch
        pipeline = self.pipelines[schedule]
        coarse_steps = pipeline.schedule.coarse_steps
        n = x.shape[-1]
        out = {k: np.full((len(x), n, n), np.nan, np.float32) for k in ("anomaly", "ph", "rec")}
        times = {"total": [], "coarse": []}
        batch_index = 0
        for group in groups:
            total = coarse = 0.0
            for start in range(0, len(group), self.batch_size):
                rows = group[start : start + self.batch_size]
                xb = x[torch.as_tensor(rows)].to(self.device)
                marks = {}

                def progress(done: int, _total: int) -> None:
                    if done == coarse_steps:
                        self._sync()
                        marks["coarse"] = time.perf_counter()

                self._sync()
                t0 = time.perf_counter()
                generator = self._generator(method_index, batch_index)
                if coarse_only:  # step 1 draws its noise first, so this is the full run's reconstruction
                    s = pipeline.schedule
                    rec = pipeline.reconstruct(xb, s.coarse_start, s.coarse_steps, generator)
                else:
                    result = pipeline(xb, generator=generator, progress=progress)
                    rec = result.reconstruction
                    out["anomaly"][rows] = result.anomaly_map[:, 0].float().cpu().numpy()
                    out["ph"][rows] = result.pseudo_healthy[:, 0].float().cpu().numpy()
                self._sync()
                t1 = time.perf_counter()
                total += t1 - t0
                coarse += marks.get("coarse", t1) - t0
                out["rec"][rows] = rec[:, 0].float().cpu().numpy()
                batch_index += 1
            times["total"].append(total)
            times["coarse"].append(coarse)
        return {**out, "seconds": np.array(times["total"]), "coarse_seconds": np.array(times["coarse"]), "cuda_peak_mb": self._cuda_peak()}

    def run_anoddpm(self, level: int, steps: int, x, groups: list[np.ndarray], method_index: int) -> dict[str, np.ndarray]:
        """AnoDDPM's reconstruction rec from noise level ``level`` in ``steps`` reverse steps, with the seconds per group."""
        torch = self.torch
        pipeline = self.pipelines["fast"]
        n = x.shape[-1]
        rec = np.full((len(x), n, n), np.nan, np.float32)
        group_seconds = []
        batch_index = 0
        for group in groups:
            total = 0.0
            for start in range(0, len(group), self.batch_size):
                rows = group[start : start + self.batch_size]
                xb = x[torch.as_tensor(rows)].to(self.device)
                self._sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    r = pipeline.reconstruct(xb, level, steps, self._generator(method_index, batch_index))
                self._sync()
                total += time.perf_counter() - t0
                rec[rows] = r[:, 0].float().cpu().numpy()
                batch_index += 1
            group_seconds.append(total)
        return {"rec": rec, "seconds": np.array(group_seconds), "cuda_peak_mb": self._cuda_peak()}

    def run(self, method: Method, method_index: int, evalset_name: str, x, indices: np.ndarray, groups: list[np.ndarray]) -> MethodRun:
        """``method`` on the cases ``indices`` of x (grouped as ``groups`` for per-volume timing)."""
        torch = self.torch
        self._evalset = evalset_name
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        groups = [g[np.isin(g, indices)] for g in groups]
        groups = [g for g in groups if len(g)]
        x_np = x[:, 0].numpy()
        cases = {"evalset": evalset_name, "cases": array_digest(x_np, indices), "groups": [g.tolist() for g in groups]}
        if method.kind in ("autoddpm", "residual"):
            # The residual shares AutoDDPM's run (same seeds): it is its first stage. Where AutoDDPM itself
            # does not run on these cases (the baselines' calibration), the residual runs that stage alone.
            key = (evalset_name, method.schedule, tuple(indices.tolist()))
            coarse_only = method.kind == "residual" and key not in self._cache
            if coarse_only:
                key += ("coarse only",)
            if key not in self._cache:
                index = {"fast": 1, "reference": 2}.get(method.schedule, 3)
                self._cache[key] = self.parts.get_or_compute(
                    f"{evalset_name}: AutoDDPM {method.schedule}{' (coarse stage)' if coarse_only else ''}",
                    {**cases, "autoddpm": method.schedule, "coarse_only": coarse_only},
                    lambda: self.run_autoddpm(method.schedule, x, groups, index, coarse_only))
            out = self._cache[key]
            if method.kind == "autoddpm":
                scores, ph, group_seconds = out["anomaly"], out["ph"], out["seconds"]
            else:
                scores, ph, group_seconds = np.abs(x_np - out["rec"]), out["rec"], out["coarse_seconds"]
            cuda_peak = out["cuda_peak_mb"]
        elif method.kind == "intensity":  # the image is its own map; there is no pseudo-healthy image
            scores, ph = np.full_like(x_np, np.nan), np.full_like(x_np, np.nan)
            scores[indices] = x_np[indices]
            group_seconds, cuda_peak = np.zeros(len(groups)), np.array([np.nan])
        else:
            out = self.parts.get_or_compute(
                f"{evalset_name}: {method.name}", {**cases, "anoddpm": [method.level, method.steps, method_index]},
                lambda: self.run_anoddpm(method.level, method.steps, x, groups, method_index))
            scores, ph, group_seconds, cuda_peak = np.abs(x_np - out["rec"]), out["rec"], out["seconds"], out["cuda_peak_mb"]
        peak = float(cuda_peak[0])
        return MethodRun(method, indices, scores.astype(np.float32), ph, float(np.sum(group_seconds)),
                         [float(s) for s in group_seconds], None if math.isnan(peak) else peak)


# ----------------------------------------------------------------------------- metrics


def fidelity_maps(run: MethodRun, evalset: EvalSet, lpips, device) -> dict[str, np.ndarray]:
    """Per-pixel |ph - ref|, SSIM and LPIPS maps of the pseudo-healthy image against the reference.

    The reference is the known healthy image (synthetic sets) or the input (LGG,
    meaningful in healthy tissue only).
    """
    import torch

    from .metrics import ssim_map

    idx = run.indices
    ref = evalset.healthy[idx] if evalset.healthy is not None else evalset.x[idx, 0].numpy()
    ph = run.pseudo_healthy[idx]
    n = ref.shape[-1]
    maps = {k: np.full((len(evalset), n, n), np.nan, np.float32) for k in ("mae", "ssim", "lpips")}
    maps["mae"][idx] = np.abs(ph - ref)
    maps["ssim"][idx] = ssim_map(ph, ref)[:, 0].numpy()
    lp = []
    with torch.no_grad():
        for i in range(0, len(idx), 64):
            a = torch.from_numpy(ph[i : i + 64])[:, None].to(device)
            b = torch.from_numpy(ref[i : i + 64])[:, None].to(device)
            lp.append(lpips(a, b)[:, 0].float().cpu().numpy())
    maps["lpips"][idx] = np.concatenate(lp)
    return maps


def _region_mean(values: np.ndarray, region: np.ndarray) -> Optional[float]:
    n = int(region.sum())
    return None if n == 0 else float(values[region].mean())


def _clean(value):
    if value is None:
        return None
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def oracle_thresholds(scores: np.ndarray, quantiles: int = 401) -> np.ndarray:
    """The reference's 101 thresholds in [0, 1] plus ``quantiles`` quantiles of the positive scores.

    AutoDDPM's map A = |x - x_ph| * M is a product of values below 1 and often
    lives in [0, 0.05], where a 0.01 grid is too coarse to find its best
    threshold; the quantiles give every map the same resolution.
    """
    from .metrics import ORACLE_THRESHOLDS

    positive = scores[np.isfinite(scores) & (scores > 0)]
    extra = np.quantile(positive, np.linspace(0, 1, quantiles)) if positive.size else np.zeros(0)
    return np.unique(np.concatenate([ORACLE_THRESHOLDS, extra]))


def evaluate_rows(run: MethodRun, evalset: EvalSet, indices: np.ndarray, dataset_label: str, bin_name: str,
                  device_name: str) -> list[dict]:
    """The calibrated and the oracle row of one method on the cases ``indices`` of one dataset."""
    from scipy import ndimage

    from .metrics import LESION_FREE, average_precision, best_dice, dice_at_threshold, false_positive_rate, median_iqr, per_volume_dice

    scores = run.scores[indices]
    truth = evalset.truth[indices]
    fg = evalset.foreground[indices]
    volumes = [evalset.volumes[i] for i in indices]
    lesion_free = np.array([evalset.bins[i] == LESION_FREE for i in indices], dtype=bool)
    auprc = average_precision(scores, truth) if truth.any() else float("nan")
    oracle_dice, oracle_threshold = best_dice(scores, truth, oracle_thresholds(scores)) if truth.any() else (float("nan"), float("nan"))

    # Fidelity: healthy tissue = foreground away from the lesion (2-pixel margin for soft edges).
    near_lesion = np.stack([ndimage.binary_dilation(t, iterations=2) if t.any() else t for t in truth])
    healthy_region = fg & ~near_lesion
    fidelity = {}
    for key in ("mae", "ssim", "lpips"):
        values = run.fidelity[key][indices] if key in run.fidelity else None
        fidelity[f"{key}_healthy"] = None if values is None else _region_mean(values, healthy_region)
        fidelity[f"{key}_lesion"] = None if values is None or evalset.healthy is None else _region_mean(values, truth)

    n_slices = len(indices)
    if evalset.per_volume and len(run.indices) == len(evalset):  # whole volumes were run
        per_volume_seconds = float(np.mean(run.group_seconds)) if run.group_seconds else None
    else:
        per_volume_seconds = None
    rows = []
    for kind, threshold in (("calibrated", run.threshold), ("oracle", oracle_threshold)):
        if math.isnan(threshold):
            dice_value = float("nan")
            prediction = None
        else:
            dice_value = oracle_dice if kind == "oracle" else (dice_at_threshold(scores, truth, threshold) if truth.any() else float("nan"))
            prediction = scores > threshold
        if prediction is not None:
            vol = per_volume_dice(prediction, truth, volumes)
            median, q1, q3 = median_iqr(list(vol.values()))
            fpr_pixels, fpr_slices = false_positive_rate(prediction[lesion_free], fg[lesion_free])
        else:
            median = q1 = q3 = fpr_pixels = fpr_slices = float("nan")
        rows.append({k: _clean(v) for k, v in {
            "method": run.method.name,
            "dataset": dataset_label,
            "size_bin": bin_name,
            "threshold_kind": kind,
            "threshold": threshold,
            "dice": dice_value,
            "auprc": auprc,
            "volume_dice_median": median,
            "volume_dice_q1": q1,
            "volume_dice_q3": q3,
            "fpr_pixels": fpr_pixels,
            "fpr_slices": fpr_slices,
            **fidelity,
            "evaluations_per_slice": run.method.evaluations,
            "seconds_per_slice": run.seconds / max(len(run.indices), 1),
            "seconds_per_volume": per_volume_seconds,
            "cuda_peak_mb": run.cuda_peak_mb,
            "n_slices": n_slices,
            "n_lesion_slices": int(truth.reshape(n_slices, -1).any(axis=1).sum()),
            "n_lesion_free_slices": int(lesion_free.sum()),
            "lesion_pixels": int(truth.sum()),
            "device": device_name,
        }.items()})
    return rows


def card_healthy_fpr(card) -> Optional[float]:
    """The healthy false-positive fraction the card's anomaly threshold was calibrated for (None if uncalibrated)."""
    thresholds = card.data.get("thresholds", {})
    value = thresholds.get("calibration", {}).get("healthy_fpr") if thresholds.get("calibrated") else None
    return float(value) if isinstance(value, (int, float)) and 0 < value < 1 else None


def calibrate_baselines(runs: dict[str, MethodRun], card, foreground: np.ndarray, notes: list[str]) -> dict[str, float]:
    """Thresholds per method: the card's for AutoDDPM; for each baseline the healthy-FPR rule on the calibration slices.

    A calibrated card records the fraction of healthy tissue its threshold may flag
    (``thresholds.calibration.healthy_fpr``): every baseline gets the same rule. An
    uncalibrated card has no rule, so the baselines flag the fraction that
    AutoDDPM-fast flags on the calibration slices at the card's threshold.
    """
    fast = runs["AutoDDPM fast"]
    flagged_fast = float(np.mean(fast.scores[foreground] > card.anomaly_threshold))
    rule = card_healthy_fpr(card)
    target = rule if rule is not None else flagged_fast
    thresholds = {}
    for name, run in runs.items():
        if run.method.kind == "autoddpm":
            thresholds[name] = card.anomaly_threshold
            continue
        values = run.scores[foreground]
        thresholds[name] = float(values.max()) if target <= 0 else float(np.quantile(values, 1.0 - target))
    n = int(foreground.shape[0])
    if rule is not None:
        notes.append(
            f"Baseline thresholds: each flags {100 * rule:g}% of the healthy foreground pixels of the {n} calibration slices, "
            f"the rule the card's anomaly threshold was calibrated with (AutoDDPM-fast flags {100 * flagged_fast:.2f}% of them)."
        )
    else:
        notes.append(
            f"Baseline thresholds: on the {n} healthy calibration slices AutoDDPM-fast flags {100 * flagged_fast:.2f}% of the "
            f"foreground pixels at the card's threshold {card.anomaly_threshold:g}; each baseline's threshold flags the same fraction there."
        )
    return thresholds


# ----------------------------------------------------------------------------- the harness


def _default_datasets(card) -> list[str]:
    modality = str(card.data.get("modality", "")).lower()
    if "flair" in modality:
        return ["lgg", "lgg-synth"]
    if "t1" in modality:
        return ["ixi"]
    return list(DATASETS)


DATASET_FOLDERS = {
    "lgg": lambda root: root / "lgg_flair" / "val",
    "lgg-synth": lambda root: root / "lgg_flair" / "val",
    "ixi": lambda root: root / "ixi_t1_midaxial" / "val",
    "lgg-dev": lambda root: root / "lgg_flair" / "train",
    "ixi-dev": lambda root: root / "ixi_t1_midaxial" / "train",
}


def _calibrated_on(card, folder: Path) -> Optional[str]:
    """The card's calibration source that is, contains or lies inside ``folder`` (None if none)."""
    thresholds = card.data.get("thresholds", {})
    data = thresholds.get("calibration", {}).get("data", []) if thresholds.get("calibrated") else []
    target = Path(folder).resolve()
    for source in data if isinstance(data, list) else []:
        path = Path(source).resolve()
        if path == target or target in path.parents or path in target.parents:
            return str(source)
    return None


def _load_dataset(name: str, root: Path, card, sizes: dict, seed: int) -> EvalSet:
    if name == "lgg":
        return load_lgg(root / "lgg_flair" / "val", card, sizes["max_volumes"])
    if name == "lgg-synth":
        return load_lgg_synthetic(root / "lgg_flair" / "val", card, sizes["max_images"], seed)
    if name == "ixi":
        return load_ixi(root / "ixi_t1_midaxial" / "val", card, sizes["max_images"], seed)
    if name == "lgg-dev":
        return load_lgg_dev(root / "lgg_flair" / "train", card, sizes["max_volumes"])
    if name == "ixi-dev":
        return load_ixi_dev(root / "ixi_t1_midaxial" / "train", card, sizes["max_images"], seed)
    raise AutoDDPMError(f"unknown dataset '{name}': choose from {', '.join(DATASETS)}")


def _load_with_provenance(name: str, root: Path, card, sizes: dict, seed: int) -> tuple[EvalSet, str, Optional[str]]:
    """A dataset's cases, the family of healthy slices that calibrates its baselines, and the card's overlap with it."""
    evalset = _load_dataset(name, root, card, sizes, seed)
    return evalset, _calibration_family(card, name), _calibrated_on(card, DATASET_FOLDERS[name](root))


def _inputs(model: Optional[str], data: Optional[str | Path], quick: bool, overrides: dict) -> tuple[Path, Any, Path, dict]:
    """The model folder and card, the data root (or prepared file) and the run's sizes, checked."""
    from .bundle import read_card, resolve_model

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
    for name in datasets or _default_datasets(card):
        evalsets[name], families[name], overlaps[name] = _load_with_provenance(name, root, card, sizes, seed)
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
    pick = [lesion[_spread(len(lesion), n_lesion)], free[_spread(len(free), count - n_lesion)]]
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
) -> list[dict]:
    """Run the benchmark and write results.json, results.md and figures into ``output_dir``; returns the rows.

    ``data`` is a data root (as ../shared/data) or a file from ``prepare_benchmark_data``.
    ``backend`` runs the network as ``autoddpm run --backend`` does. Finished method
    runs are kept in ``output_dir/partial`` until the report is written; ``resume``
    reuses those an earlier, stopped run of the same benchmark left there.
    """
    import torch

    from .devices import describe_device, select_device

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
    datasets = list(datasets or (prepared.datasets if prepared else _default_datasets(card)))
    try:
        load = os.getloadavg()[0]
        if load > 0.5:
            notes.append(f"Load average {load:.1f} at the start (on {os.cpu_count()} CPUs): other processes shared the machine, "
                         "so the times are pessimistic (on a busy CPU, --threads 1 avoids thread oversubscription).")
    except (OSError, AttributeError):
        pass
    if not card.data.get("thresholds", {}).get("calibrated", False):
        notes.append("The model card's thresholds are NOT calibrated (placeholders): the 'calibrated' rows use them as they are.")
    methods = build_methods(card, quick, sizes["baseline_steps"], notes)
    for schedule in sorted({m.schedule for m in methods if m.kind == "autoddpm"}):
        if not card.thresholds_for(schedule)[2]:
            notes.append(f"AutoDDPM {schedule} runs with thresholds NOT calibrated for it (the card's main ones): its "
                         f"calibrated rows are not what the schedule can do (`autoddpm calibrate --schedule {schedule}`).")
    if sizes["baseline_steps"]:
        notes.append(f"AnoDDPM reconstructions take {sizes['baseline_steps']} strided reverse steps (the reference takes all t+1 ancestral steps).")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The code that runs is the checkout as it is now: edits made while the run goes on do not count.
    commit = git_commit()
    parts = PartStore(output_dir, {
        "weights": file_digest(Path(folder) / WEIGHTS_FILE), "card": card.data, "engine": engine_digest(),
        "seed": seed, "batch_size": batch_size, "backend": backend, "device": torch_device.type,
    }, resume)
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
            evalset, family, overlap = _load_with_provenance(dataset_name, root, card, sizes, seed)
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
            for i, method in enumerate(methods):
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
        for i, method in enumerate(methods):
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
        notes.append(f"Resumed: {len(parts.resumed)} method runs were read back from an earlier, stopped run of this "
                     f"benchmark (their seconds were measured then): {'; '.join(parts.resumed)}.")
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
        "peak_rss_mb": round(peak_rss_mb, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "notes": notes,
    }
    for row in rows:
        row["peak_rss_mb"] = meta["peak_rss_mb"]
    (output_dir / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    (output_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    figure_names = []
    if figures:
        try:
            figure_names = write_figures(output_dir, rows, examples)
        except ImportError:
            meta["notes"].append("matplotlib is not installed: no figures (pip install matplotlib).")
    (output_dir / "results.md").write_text(markdown_report(rows, meta, figure_names), encoding="utf-8")
    parts.remove()
    _log(f"done in {meta['wall_seconds']:.0f} s: {output_dir / 'results.md'}")
    return rows


# ----------------------------------------------------------------------------- report


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
    )
    return 0


def add_benchmark_command(subparsers) -> None:
    """Adds ``benchmark`` and ``benchmark-speed`` to the ``autoddpm`` sub-commands (handler in ``args.handler``)."""
    from .speed import add_speed_arguments, speed_main

    bench = subparsers.add_parser("benchmark", help="detection quality, fidelity and cost against baselines on the shared data")
    add_benchmark_arguments(bench)
    bench.set_defaults(handler=benchmark_main)
    speed = subparsers.add_parser("benchmark-speed", help="network forward speed: eager, channels_last, bfloat16, torch.compile, batch sizes")
    add_speed_arguments(speed)
    speed.set_defaults(handler=speed_main)
