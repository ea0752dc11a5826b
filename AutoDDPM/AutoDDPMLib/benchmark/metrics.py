"""Evaluation metrics for anomaly maps and pseudo-healthy reconstructions.

Detection (pixel level, pooled over all evaluated slices as the reference does):

* :func:`dice` / :func:`dice_at_threshold`: Dice of ``score > threshold`` against the truth;
* :func:`average_precision`: AUPRC as scikit-learn's ``average_precision_score``
  (step-wise precision-recall integral, no interpolation), pure numpy;
* :func:`best_dice`: the best Dice over 101 thresholds in [0, 1] chosen on the
  evaluated data itself. This is an ORACLE (it looks at the test labels); report
  it only labelled as such, next to the Dice at a threshold fixed beforehand;
* :func:`false_positive_rate`: flagged pixels among the foreground pixels of
  lesion-free slices, and the fraction of lesion-free slices with any flag.

Fidelity of a pseudo-healthy image against a reference (the known healthy
image, or the input in healthy tissue): :func:`mae`, :func:`ssim` (data range 1,
Gaussian or uniform window, pure torch) and :func:`lpips_distance` (LPIPS-alex,
optionally averaged over a region of its spatial map).

Lesion size bins (:func:`size_bin`): the reference's stroke bins, small (1, 71],
medium (71, 570] and large > 570 lesion pixels per 128 x 128 slice, scaled by
(N / 128)^2 for an N x N model grid (a 64 x 64 grid: (0.25, 17.75],
(17.75, 142.5], > 142.5), so a bin means the same fraction of the slice at every
grid size.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# (name, lower, upper] in lesion pixels of a 128 x 128 slice (Bercea et al.).
SIZE_BINS_128: tuple[tuple[str, float, float], ...] = (
    ("small", 1.0, 71.0),
    ("medium", 71.0, 570.0),
    ("large", 570.0, math.inf),
)
SIZE_BIN_NAMES = tuple(name for name, _, _ in SIZE_BINS_128)
LESION_FREE = "lesion-free"
# A lesion that is non-empty but below the smallest bin's lower bound (1 pixel at 128 x 128).
TINY = "tiny"

ORACLE_THRESHOLDS = np.linspace(0.0, 1.0, 101)


# ----------------------------------------------------------------------------- size bins


def size_bin_edges(grid_size: int) -> list[tuple[str, float, float]]:
    """The size bins for an N x N grid: the 128 x 128 bounds times (N / 128)^2."""
    scale = (float(grid_size) / 128.0) ** 2
    return [(name, low * scale, high * scale) for name, low, high in SIZE_BINS_128]


def size_bin(lesion_pixels: float, grid_size: int) -> str:
    """The bin of a slice with ``lesion_pixels`` lesion pixels on an N x N grid.

    ``"lesion-free"`` for 0 pixels, ``"tiny"`` for a lesion at or below the
    smallest bin's lower bound, else ``"small"``, ``"medium"`` or ``"large"``
    (each bin is (lower, upper]).
    """
    if lesion_pixels <= 0:
        return LESION_FREE
    for name, low, high in size_bin_edges(grid_size):
        if low < lesion_pixels <= high:
            return name
    return TINY


# ----------------------------------------------------------------------------- detection


def _flat(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a).ravel()


def dice(prediction, truth) -> float:
    """Dice = 2|P & T| / (|P| + |T|) of two binary arrays; 1.0 when both are empty."""
    p, t = _flat(prediction).astype(bool), _flat(truth).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction has {p.size} pixels, truth {t.size}")
    denominator = int(p.sum()) + int(t.sum())
    return 1.0 if denominator == 0 else 2.0 * int(np.count_nonzero(p & t)) / denominator


def dice_at_threshold(scores, truth, threshold: float) -> float:
    """Pooled Dice of ``scores > threshold`` against ``truth``."""
    return dice(_flat(scores) > threshold, truth)


def dice_curve(scores, truth, thresholds: Sequence[float] = ORACLE_THRESHOLDS) -> np.ndarray:
    """Pooled Dice of ``scores > t`` for every ``t`` in ``thresholds`` (one sort, no loop over pixels)."""
    s, t = _flat(scores).astype(np.float64), _flat(truth).astype(bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    positives, negatives = np.sort(s[t]), np.sort(s[~t])
    tp = len(positives) - np.searchsorted(positives, thresholds, side="right")
    fp = len(negatives) - np.searchsorted(negatives, thresholds, side="right")
    fn = len(positives) - tp
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator == 0, 1.0, 2.0 * tp / np.maximum(denominator, 1))


def best_dice(scores, truth, thresholds: Sequence[float] = ORACLE_THRESHOLDS) -> tuple[float, float]:
    """ORACLE: (best pooled Dice, its threshold) over ``thresholds`` (default 101 in [0, 1]).

    The threshold is chosen on the evaluated data, so this is an upper bound on
    what any fixed threshold achieves; never report it unlabelled.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    curve = dice_curve(scores, truth, thresholds)
    best = int(np.argmax(curve))  # the lowest threshold among ties
    return float(curve[best]), float(thresholds[best])


def average_precision(scores, truth) -> float:
    """AUPRC: sum over score thresholds of (R_n - R_{n-1}) P_n, as scikit-learn computes it.

    Ties are one threshold. NaN when there is no positive pixel.
    """
    s, t = _flat(scores).astype(np.float64), _flat(truth).astype(bool)
    n_positive = int(t.sum())
    if n_positive == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(t)[last_of_each_score]
    fp = (last_of_each_score + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_positive
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def false_positive_rate(prediction, foreground) -> tuple[float, float]:
    """On lesion-free slices [S, H, W]: (flagged foreground pixels / foreground pixels,
    fraction of slices with at least one flagged pixel). NaN, NaN without slices."""
    p = np.asarray(prediction, dtype=bool)
    fg = np.asarray(foreground, dtype=bool)
    if p.ndim == 2:
        p, fg = p[None], fg[None]
    if p.shape[0] == 0:
        return float("nan"), float("nan")
    n_fg = int(fg.sum())
    pixel_rate = float(np.count_nonzero(p & fg) / n_fg) if n_fg else float("nan")
    slice_rate = float(np.mean(p.reshape(len(p), -1).any(axis=1)))
    return pixel_rate, slice_rate


def per_volume_dice(prediction, truth, volume_ids: Sequence[str]) -> dict[str, float]:
    """Dice per volume (all slices of a volume pooled) for the volumes that contain a lesion."""
    p = np.asarray(prediction, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    ids = np.asarray(volume_ids)
    result = {}
    for volume in dict.fromkeys(volume_ids):
        rows = ids == volume
        if t[rows].any():
            result[str(volume)] = dice(p[rows], t[rows])
    return result


def median_iqr(values) -> tuple[float, float, float]:
    """(median, first quartile, third quartile); NaNs without values."""
    v = np.asarray([x for x in values if not np.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return float(median), float(q1), float(q3)


# ----------------------------------------------------------------------------- fidelity


def _as_batch(x) -> torch.Tensor:
    """[H, W], [B, H, W] or [B, 1, H, W] as a float32 [B, 1, H, W] tensor."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.float()
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"expected [H, W], [B, H, W] or [B, 1, H, W] images, got {tuple(t.shape)}")
    return t


def _region_mean(values: torch.Tensor, region) -> float:
    if region is None:
        return float(values.mean())
    r = _as_batch(region).to(values.device) > 0.5
    n = int(r.sum())
    return float("nan") if n == 0 else float(values[r].sum() / n)


def mae(x, y, region=None) -> float:
    """Mean absolute difference, over all pixels or over ``region`` (pooled over the batch)."""
    return _region_mean((_as_batch(x) - _as_batch(y)).abs(), region)


def _window(kind: str, size: int, sigma: float) -> torch.Tensor:
    if kind == "gaussian":
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        g = torch.exp(-(coords**2) / (2 * sigma**2))
        g = g / g.sum()
        w = g[:, None] * g[None, :]
    elif kind == "uniform":
        w = torch.full((size, size), 1.0 / size**2, dtype=torch.float64)
    else:
        raise ValueError(f"unknown SSIM window '{kind}': use 'gaussian' or 'uniform'")
    return w.float()[None, None]


def ssim_map(x, y, data_range: float = 1.0, window: str = "gaussian", win_size: int | None = None, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM [B, 1, H, W] (Wang et al. 2004; K1 = 0.01, K2 = 0.03, sample covariances).

    Gaussian window: 11 x 11, sigma 1.5 (the paper's); uniform: 7 x 7 (scikit-image's default).
    Images are reflect-padded so that the map has the images' size and can be
    averaged over any region; identical images give exactly 1 everywhere.
    """
    a, b = _as_batch(x), _as_batch(y)
    if a.shape != b.shape:
        raise ValueError(f"SSIM inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    size = win_size or (11 if window == "gaussian" else 7)
    w = _window(window, size, sigma)
    pad = size // 2
    if min(a.shape[-2:]) <= pad:
        raise ValueError(f"images of {tuple(a.shape[-2:])} pixels are too small for a {size}-pixel SSIM window")
    a64, b64, w64 = a.double(), b.double(), w.double()

    def filt(img: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(img, (pad, pad, pad, pad), mode="reflect"), w64)

    n = size * size
    # Sample (unbiased) covariances as scikit-image uses by default.
    cov_norm = n / (n - 1) if window == "uniform" else 1.0
    mu_a, mu_b = filt(a64), filt(b64)
    var_a = cov_norm * (filt(a64 * a64) - mu_a**2)
    var_b = cov_norm * (filt(b64 * b64) - mu_b**2)
    cov = cov_norm * (filt(a64 * b64) - mu_a * mu_b)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.float()


def ssim(x, y, region=None, data_range: float = 1.0, window: str = "gaussian") -> float:
    """Mean SSIM over all pixels or over ``region`` (pooled over the batch); data range 1 by default."""
    return _region_mean(ssim_map(x, y, data_range=data_range, window=window), region)


def lpips_distance(x, y, region=None, lpips=None, batch_size: int = 64) -> float:
    """LPIPS-alex between images in [0, 1]: the mean of the spatial map, over ``region`` if given.

    Without a region this is the usual scalar LPIPS averaged over the batch
    (within ~1e-4 of :meth:`LPIPS.distance`).
    """
    if lpips is None:
        from ..diffusion.lpips import load_lpips

        lpips = load_lpips("cpu")
    device = lpips.shift.device
    a, b = _as_batch(x), _as_batch(y)
    maps = []
    with torch.no_grad():
        for i in range(0, len(a), batch_size):
            maps.append(lpips(a[i : i + batch_size].to(device), b[i : i + batch_size].to(device)).cpu())
    return _region_mean(torch.cat(maps), region)
