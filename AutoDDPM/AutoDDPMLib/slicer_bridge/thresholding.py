"""Re-thresholding an anomaly map fast enough for a slider, and the slider's range.

A tick of the threshold slider only compares the map with the threshold inside the
map's bounding box (:class:`MapBox`; the post-processed map is zero outside the
searched brain region) and writes that box into the segment: tens of ms on a
256x256x200 map. Dropping the parts smaller than the run's model keeps and counting
the parts need a 26-connected labelling, several times slower: :func:`settled_mask`
does it once the slider rests, labelling the mask once for both.

Plain numpy and scipy: no torch (the engine's post-processing module imports it), so
re-thresholding works in a Slicer where the engine has never run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from .results import AnomalySummary

# 26-connectivity, as the engine's post-processing (detection.map_filters.remove_small_components).
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
# The slider's top: this percentile of the map's positive values (its maximum is one voxel, and would leave the
# useful thresholds in a few pixels of the slider), but at least twice the calibrated threshold.
TOP_PERCENTILE = 99.9
# Significant digits the slider shows of the calibrated threshold.
SIGNIFICANT_DIGITS = 3


@dataclass(frozen=True)
class MapBox:
    """Where a threshold >= 0 can select voxels of a map: the bounding box of its positive voxels.

    box: (k, j, i) slices of the map's [k, j, i] array; values: the map inside it (a view, not a copy).
    """

    box: tuple[slice, slice, slice]
    values: np.ndarray

    @property
    def start(self) -> tuple[int, int, int]:
        """The box's first voxel (k, j, i)."""
        return tuple(axis.start for axis in self.box)


def map_box(anomaly: np.ndarray) -> MapBox:
    """The bounding box of the map's positive voxels (an empty box for a map without any)."""
    positive = anomaly > 0
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        indices = np.flatnonzero(positive.any(axis=other))
        box.append(slice(int(indices[0]), int(indices[-1]) + 1) if indices.size else slice(0, 0))
    box = tuple(box)
    return MapBox(box, anomaly[box])


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float; ValueError for a negative or non-finite one (the command line refuses them too)."""
    value = float(threshold)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"the threshold must be a finite number >= 0, not {threshold}")
    return value


def preview_mask(region: MapBox, threshold: float) -> np.ndarray:
    """The box's voxels above ``threshold``, small parts included: what a slider tick shows."""
    return region.values > check_threshold(threshold)


def settled_mask(region: MapBox, spacing: Iterable[float], threshold: float,
                 min_component_mm3: float) -> tuple[np.ndarray, AnomalySummary]:
    """The box's part of the engine's mask (above ``threshold``, 26-connected parts smaller than
    ``min_component_mm3`` dropped, as ``detection.map_filters.anomaly_mask``) and its summary.

    One labelling gives both: dropping whole parts leaves the others as they are, so the kept parts are the
    components of the result.
    """
    from scipy import ndimage

    threshold = check_threshold(threshold)
    voxel_mm3 = float(np.prod(list(spacing)))
    voxel_ml = voxel_mm3 / 1000.0  # as results.summarize computes it, so both give the same millilitres
    mask = region.values > threshold
    if not mask.any():
        return mask, AnomalySummary(threshold, 0, 0.0, 0, 0.0)
    labels, _ = ndimage.label(mask, structure=_CONNECTIVITY)
    sizes = np.bincount(labels.ravel())
    keep = sizes * voxel_mm3 >= min_component_mm3 if min_component_mm3 else sizes > 0
    keep[0] = False
    kept = sizes[keep]
    voxels, largest = int(kept.sum()), int(kept.max()) if kept.size else 0
    return keep[labels], AnomalySummary(threshold, voxels, voxels * voxel_ml, int(kept.size), largest * voxel_ml)


@dataclass(frozen=True)
class SliderSettings:
    """Range and steps of the threshold slider."""

    minimum: float
    maximum: float
    decimals: int
    single_step: float
    page_step: float


def slider_decimals(reference: float) -> int:
    """The decimals that show ``reference`` (> 0) with :data:`SIGNIFICANT_DIGITS` significant digits."""
    return max(0, SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(reference)))


def threshold_for_run(chosen: float, calibrated: Iterable[float]) -> Optional[float]:
    """The threshold a run is given when the slider holds ``chosen``: None, so that the engine picks the model
    card's own, while ``chosen`` is one of the ``calibrated`` thresholds the engine may pick for the run (that
    of inputs with skull, that of skull-stripped inputs); else ``chosen``, the user's.

    A threshold given to the engine is used for every input, so passing the calibrated one would keep the engine
    from picking the stripped inputs' threshold for a stripped input. The slider shows a threshold with
    :data:`SIGNIFICANT_DIGITS` digits: moved away and back, it holds the calibrated value as shown, which is
    still the calibrated one.
    """
    chosen = check_threshold(chosen)
    for value in calibrated:
        if value == chosen or value > 0 and round(chosen, slider_decimals(value)) == round(value, slider_decimals(value)):
            return None
    return chosen


def slider_settings(region: Optional[MapBox], calibrated: float, current: float) -> SliderSettings:
    """A slider over the map's useful values that shows ``calibrated`` with :data:`SIGNIFICANT_DIGITS` digits.

    The range is [0, top]: top is :data:`TOP_PERCENTILE` of the map's positive values, at least twice
    ``calibrated``, never above the map's maximum (nothing is segmented beyond it) unless ``calibrated`` or
    ``current`` are: the slider must hold them, or setting the range would move its value. Without a map,
    [0, 10 x calibrated].
    """
    top = 10.0 * calibrated
    if region is not None:
        positive = region.values[region.values > 0]
        if positive.size:
            # A million values give the percentile closely enough for a slider, in a fraction of the time.
            sample = positive[::max(1, positive.size // 1_000_000)]
            top = min(max(float(np.percentile(sample, TOP_PERCENTILE)), 2.0 * calibrated), float(positive.max()))
    top = max(top, calibrated, current)
    if top <= 0:
        top = 1.0
    decimals = slider_decimals(calibrated if calibrated > 0 else top)
    step = 10.0 ** -decimals
    return SliderSettings(0.0, round(top + step, decimals), decimals, step, max(step, round(top / 20.0, decimals)))
