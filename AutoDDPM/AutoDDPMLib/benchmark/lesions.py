"""Seeded synthetic lesions on healthy slices, for benchmarks with a known healthy image.

:func:`add_lesion` paints one lesion into a healthy [N, N] slice in [0, 1] and
returns ``(image_with_lesion, lesion_mask)``:

* shape: an ``"ellipse"`` (random axes and rotation) or a ``"blob"`` (an ellipse
  whose radius varies smoothly with the angle, 2nd to 4th harmonics), sized by
  binary search on its scale so that the mask's pixel count falls inside the
  requested size bin;
* size bins: the reference's small (1, 71], medium (71, 570] and large > 570
  lesion pixels per 128 x 128 slice, scaled by (N / 128)^2 for an N x N grid
  (see :mod:`metrics`); large lesions are drawn up to 4x the bin's lower bound
  and at most 35% of the head;
* placement: fully inside the head foreground (pixels above 0.05, holes
  filled), at least ``0.1 N`` pixels from its edge where there is room, so
  lesions sit in the brain rather than in the scalp;
* intensity: hyper- or hypo-intense, 0.2 to 0.4 above or below the mean of the
  tissue it replaces, with smooth random texture (Gaussian-filtered noise,
  std 0.02 to 0.06) and 10 to 30 % of the underlying anatomy kept;
* edges: soft (a smoothstep ramp 1.5 to 3 pixels wide across the boundary); the
  mask is where the lesion weight is at least 0.5; beyond the ramp the slice is
  unchanged.

The same seed gives the same lesion, bit for bit.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import ndimage

from ..volumes.slices import FOREGROUND_LEVEL
from .metrics import SIZE_BIN_NAMES, size_bin, size_bin_edges

SHAPES = ("ellipse", "blob")
POLARITIES = ("hyper", "hypo")


def head_foreground(image: np.ndarray) -> np.ndarray:
    """Pixels above the foreground level, holes filled (ventricles count as inside)."""
    return ndimage.binary_fill_holes(np.asarray(image) > FOREGROUND_LEVEL)


def _target_area(rng: np.random.Generator, bin_name: str, grid: int, foreground_pixels: int) -> tuple[float, float, float]:
    """(target, lower, upper) lesion pixels for the bin; target drawn log-uniformly inside it."""
    edges = {name: (low, high) for name, low, high in size_bin_edges(grid)}
    low, high = edges[bin_name]
    if math.isinf(high):
        high = min(4.0 * low, 0.35 * foreground_pixels)
    # Keep a margin from both bounds so the discrete pixel count stays inside.
    lo_t, hi_t = max(low * 1.15, low + 1.0), high * 0.9
    if hi_t <= lo_t:
        lo_t = hi_t = (low + high) / 2
    target = float(np.exp(rng.uniform(np.log(lo_t), np.log(hi_t))))
    return target, low, high


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return noise / max(float(noise.std()), 1e-8)


def add_lesion(
    image: np.ndarray,
    size_bin_name: str,
    seed: int | np.random.Generator = 0,
    shape: Optional[str] = None,
    polarity: Optional[str] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic lesion in a healthy [N, N] slice in [0, 1].

    ``size_bin_name``: ``"small"``, ``"medium"`` or ``"large"`` (scaled to the
    grid); ``shape`` (``"ellipse"``/``"blob"``) and ``polarity``
    (``"hyper"``/``"hypo"``) are drawn from the seed unless given. Returns
    (float32 image with the lesion, bool lesion mask); the mask's pixel count is
    inside the bin and the mask inside the head foreground. Raises ValueError
    when the slice has too little foreground for the bin.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2 or img.shape[0] != img.shape[1]:
        raise ValueError(f"expected a square [N, N] slice, got shape {img.shape}")
    if size_bin_name not in SIZE_BIN_NAMES:
        raise ValueError(f"unknown size bin '{size_bin_name}': use one of {', '.join(SIZE_BIN_NAMES)}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    polarity = polarity or POLARITIES[int(rng.integers(len(POLARITIES)))]
    if shape not in SHAPES or polarity not in POLARITIES:
        raise ValueError(f"shape must be one of {SHAPES}, polarity one of {POLARITIES}")
    n = img.shape[0]
    foreground = head_foreground(img)
    fg_pixels = int(foreground.sum())
    if fg_pixels < 16:
        raise ValueError("the slice has (almost) no foreground to place a lesion in")
    target, low, high = _target_area(rng, size_bin_name, n, fg_pixels)

    # Shape parameters, in units of a nominal radius 1.
    aspect = rng.uniform(0.55, 1.0)
    angle = rng.uniform(0, np.pi)
    harmonics = []
    if shape == "blob":
        harmonics = [(k, rng.uniform(0.04, 0.16), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    softness = rng.uniform(0.75, 1.5)

    # Centre: deep enough inside the head for the whole lesion (with a margin from the edge).
    nominal_radius = math.sqrt(target / (math.pi * aspect))
    depth = ndimage.distance_transform_edt(foreground)
    needed = nominal_radius / math.sqrt(aspect) * 1.25 + 0.1 * n
    candidates = np.argwhere(depth >= needed)
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= 0.9 * depth.max())
    cy, cx = candidates[int(rng.integers(len(candidates)))].astype(np.float64) + rng.uniform(-0.5, 0.5, 2)

    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(v, u)
    modulation = 1.0 + sum(c * np.cos(k * theta + phase) for k, c, phase in harmonics)
    unit_radius = np.sqrt(u**2 + (v / aspect) ** 2) / modulation  # 1 on the boundary of a radius-1 lesion

    def mask_for(scale: float) -> np.ndarray:
        return (unit_radius <= scale) & foreground

    # Binary search the scale so that the area hits the target (area grows with the scale).
    lo_s, hi_s = 0.0, float(n)
    for _ in range(40):
        mid = (lo_s + hi_s) / 2
        if mask_for(mid).sum() < target:
            lo_s = mid
        else:
            hi_s = mid
    # Areas jump in whole pixels: take the scale just above or just below the target, whichever is in the bin.
    scale = hi_s
    for candidate in (hi_s, lo_s):
        if size_bin(int(mask_for(candidate).sum()), n) == size_bin_name:
            scale = candidate
            break
    mask = mask_for(scale)
    area = int(mask.sum())
    if size_bin(area, n) != size_bin_name:
        raise ValueError(
            f"could not fit a {size_bin_name} lesion ({low:.1f} < pixels <= {high:.1f}) in this slice (got {area} pixels)"
        )

    # Soft weight: a smoothstep ramp across the boundary, 2 x softness pixels wide (unit_radius is in
    # pixels along the major axis, so scale - unit_radius approximates the signed distance to the edge).
    ramp = np.clip(0.5 + (scale - unit_radius) / (2.0 * softness), 0.0, 1.0)
    weight = ramp * ramp * (3.0 - 2.0 * ramp)
    weight = np.where(foreground, weight, 0.0)
    weight[mask] = np.maximum(weight[mask], 0.5)

    # Intensity: a clear step from the replaced tissue, textured, keeping a little anatomy.
    tissue_mean = float(img[mask].mean())
    contrast = rng.uniform(0.2, 0.4)
    level = tissue_mean + contrast if polarity == "hyper" else tissue_mean - contrast
    level = float(np.clip(level, 0.08, 0.97))
    texture = rng.uniform(0.02, 0.06) * _smooth_noise(rng, img.shape, rng.uniform(1.0, 2.0))
    keep = rng.uniform(0.1, 0.3)
    lesion = level + texture + keep * (img - tissue_mean)
    out = (1.0 - weight) * img + weight * lesion
    return np.clip(out, 0.0, 1.0).astype(np.float32), mask
