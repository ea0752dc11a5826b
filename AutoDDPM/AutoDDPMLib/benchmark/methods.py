"""The benchmark's methods and the runner that runs them on slices.

AutoDDPM with the card's ``fast`` and ``reference`` schedules (the final map A;
a full run adds ``mid``, fast's start with 100 evaluations), fixed-noise DDPM
reconstruction ("AnoDDPM", map |x - x_rec|) from t = 50, 100, 200, 300, 500,
the plain residual |x - x_rec| of AutoDDPM's own coarse reconstruction (no extra
network evaluations), and, as a reference point for how hard a dataset is, the
input intensity itself (no model: a bright lesion on a dark background is found
by a threshold alone; a dark one is not).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .parts import PartStore, array_digest

ANODDPM_LEVELS = (50, 100, 200, 300, 500)
# Batches per stored chunk of a method run (see Runner._in_chunks): minutes each on a laptop CPU.
CHUNK_BATCHES = 4
# The per-case outputs of a method run; its other arrays are per group (seconds) or per run (memory).
PER_CASE = ("anomaly", "ph", "rec")
INTENSITY_METHOD = "Input intensity (no model)"


@dataclass
class Method:
    name: str
    kind: str  # "autoddpm" | "anoddpm" | "residual" | "intensity"
    schedule: str = "fast"  # AutoDDPM schedule (autoddpm, residual)
    level: int = 0  # AnoDDPM start level
    steps: int = 0  # AnoDDPM reverse steps
    evaluations: int = 0
    subset_only: bool = False

    @property
    def key(self) -> str:
        """Short name for ``autoddpm benchmark --methods``: fast, reference, residual-fast, anoddpm-100, intensity, ..."""
        if self.kind == "autoddpm":
            return self.schedule
        if self.kind == "residual":
            return f"residual-{self.schedule}"
        return f"anoddpm-{self.level}" if self.kind == "anoddpm" else self.kind


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

        from ..diffusion.lpips import load_lpips
        from ..diffusion.pipeline import AutoDDPMPipeline
        from ..models.networks import load_network

        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        self.card = card
        self.parts = parts
        unet, self.backend, self.backend_note = load_network(card, device, backend)
        self.lpips = load_lpips(device)
        self.pipelines = {
            name: AutoDDPMPipeline(unet, card.noise_scheduler(), self.lpips, card.thresholds_for(name)[0], schedule=schedule,
                                   lpips_size=card.lpips_image_size)
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
                     coarse_only: bool = False, first_batch: int = 0) -> dict[str, np.ndarray]:
        """AutoDDPM on x's cases: anomaly, ph and the coarse reconstruction rec, with the seconds per group
        in total and for the coarse stage alone (the residual method's time).

        ``coarse_only`` stops after step 1 (anomaly and ph stay NaN): the same rec, drawn
        from the same noise, for a residual whose AutoDDPM run is not needed.
        """
        torch = self.torch
        pipeline = self.pipelines[schedule]
        coarse_steps = pipeline.schedule.coarse_steps
        n = x.shape[-1]
        out = {k: np.full((len(x), n, n), np.nan, np.float32) for k in PER_CASE}
        times = {"total": [], "coarse": []}
        batch_index = first_batch
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

    def run_anoddpm(self, level: int, steps: int, x, groups: list[np.ndarray], method_index: int,
                    first_batch: int = 0) -> dict[str, np.ndarray]:
        """AnoDDPM's reconstruction rec from noise level ``level`` in ``steps`` reverse steps, with the seconds per group."""
        torch = self.torch
        pipeline = self.pipelines["fast"]
        n = x.shape[-1]
        rec = np.full((len(x), n, n), np.nan, np.float32)
        group_seconds = []
        batch_index = first_batch
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

    def _in_chunks(self, label: str, fields: dict, cases: int, groups: list[np.ndarray],
                   compute: Callable[[np.ndarray, int], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """A method's outputs on ``groups``, computed and stored CHUNK_BATCHES batches at a time.

        A stopped run then loses at most one chunk (minutes) rather than a whole method
        (hours for the slowest baselines). ``compute(chunk, first_batch)`` runs the rows
        of one chunk as the batches numbered from ``first_batch``: the same batches, and so
        the same noise, as one pass over all groups. Seconds are summed back per group.
        """
        out = {key: None for key in PER_CASE}
        seconds: dict[str, list[float]] = {}
        peak = np.array([np.nan])
        first_batch = 0
        for group_index, group in enumerate(groups):
            group_seconds: dict[str, float] = {}
            rows_per_chunk = CHUNK_BATCHES * self.batch_size
            for start in range(0, len(group), rows_per_chunk):
                chunk = group[start : start + rows_per_chunk]
                part = self.parts.get_or_compute(
                    f"{label} [group {group_index + 1}/{len(groups)}, rows {start}-{start + len(chunk) - 1}]",
                    {**fields, "chunk": [group_index, start, len(chunk)], "first_batch": first_batch},
                    lambda: self._rows_of(compute(chunk, first_batch), chunk))
                for key, values in part.items():
                    if key in PER_CASE:
                        if out[key] is None:
                            out[key] = np.full((cases,) + values.shape[1:], np.nan, np.float32)
                        out[key][chunk] = values
                    elif key == "cuda_peak_mb":
                        peak = np.fmax(peak, values)
                    else:
                        group_seconds[key] = group_seconds.get(key, 0.0) + float(values.sum())
                first_batch += math.ceil(len(chunk) / self.batch_size)
            for key, value in group_seconds.items():
                seconds.setdefault(key, []).append(value)
        arrays = {key: value for key, value in out.items() if value is not None}
        return {**arrays, **{key: np.array(values) for key, values in seconds.items()}, "cuda_peak_mb": peak}

    @staticmethod
    def _rows_of(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Only the rows a chunk computed of its per-case arrays (the rest are NaN)."""
        return {key: (value[rows] if key in PER_CASE else value) for key, value in arrays.items()}

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
                self._cache[key] = self._in_chunks(
                    f"{evalset_name}: AutoDDPM {method.schedule}{' (coarse stage)' if coarse_only else ''}",
                    {**cases, "autoddpm": method.schedule, "coarse_only": coarse_only}, len(x), groups,
                    lambda chunk, first: self.run_autoddpm(method.schedule, x, [chunk], index, coarse_only, first))
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
            out = self._in_chunks(
                f"{evalset_name}: {method.name}", {**cases, "anoddpm": [method.level, method.steps, method_index]}, len(x), groups,
                lambda chunk, first: self.run_anoddpm(method.level, method.steps, x, [chunk], method_index, first))
            scores, ph, group_seconds, cuda_peak = np.abs(x_np - out["rec"]), out["rec"], out["seconds"], out["cuda_peak_mb"]
        peak = float(cuda_peak[0])
        return MethodRun(method, indices, scores.astype(np.float32), ph, float(np.sum(group_seconds)),
                         [float(s) for s in group_seconds], None if math.isnan(peak) else peak)
