"""Scoring one method's maps: detection rows at calibrated and oracle thresholds, fidelity, the baselines' thresholds.

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
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .datasets import EvalSet
from .methods import MethodRun

BIN_ORDER = ("all", "small", "medium", "large")


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
