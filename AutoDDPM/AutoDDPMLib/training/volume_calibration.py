"""The threshold on post-processed anomaly maps, calibrated on whole volumes as they are run.

A post-processed map is filtered in 3D and its mask loses small components, so
its threshold must come from maps made exactly that way: whole volumes, not
slices. FLAIR volumes without any lesion are rare; the healthy tissue of
patients is what there is. A voxel counts as healthy when it is tissue and
either at least ``margin_mm`` from every lesion voxel (3D, in the volume's
spacing) or on a slice without lesion. The threshold flags at most
``healthy_rate`` of those voxels in the final mask, small components removed,
the same rule the slice calibration keeps for the raw map.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ..detection.map_filters import Spacing, anomaly_mask
from ..detection.postprocessing import PostProcessing

HEALTHY_MARGIN_MM = 10.0


def healthy_voxels(truth: np.ndarray, tissue: np.ndarray, spacing: Spacing,
                   margin_mm: float = HEALTHY_MARGIN_MM) -> np.ndarray:
    """Tissue voxels of a [slices, rows, columns] volume that count as healthy (see the module's docstring)."""
    if not truth.any():
        return tissue.copy()
    far = ndimage.distance_transform_edt(~truth, sampling=spacing) >= margin_mm
    lesion_free_slices = ~truth.any(axis=(1, 2))
    return tissue & (far | lesion_free_slices[:, None, None])


def flagged_rate(maps: Sequence[np.ndarray], healthy: Sequence[np.ndarray], spacings: Sequence[Spacing],
                 settings: PostProcessing, threshold: float) -> float:
    """The share of healthy voxels in the final masks at ``threshold``."""
    flagged = sum(int(anomaly_mask(m, threshold, s, settings)[h].sum()) for m, h, s in zip(maps, healthy, spacings))
    return flagged / max(1, sum(int(h.sum()) for h in healthy))


def calibrate_volume_threshold(maps: Sequence[np.ndarray], healthy: Sequence[np.ndarray], spacings: Sequence[Spacing],
                               settings: PostProcessing, healthy_rate: float = 0.01) -> tuple[float, float]:
    """(threshold, share of healthy voxels it flags): the lowest threshold whose final masks flag at most
    ``healthy_rate`` of the healthy voxels.

    Without component removal that is the (1 - rate) quantile of the healthy values. Removing
    small components only unflags voxels, and a voxel flagged at a higher threshold is flagged
    at every lower one (its component there is larger), so the rate falls with the threshold:
    a bisection over the healthy values finds it exactly.
    """
    values = np.sort(np.concatenate([m[h] for m, h in zip(maps, healthy)]).astype(np.float64))
    if values.size == 0:
        raise ValueError("no healthy voxels to calibrate on")
    # The quantile rule: flags at most the rate before any component is removed.
    high = min(values.size - 1, int(np.ceil((1 - healthy_rate) * values.size)))
    if not settings.min_component_mm3:
        return float(values[high]), flagged_rate(maps, healthy, spacings, settings, float(values[high]))
    low = 0
    while low < high:  # the smallest index whose value still keeps the rate
        middle = (low + high) // 2
        if flagged_rate(maps, healthy, spacings, settings, float(values[middle])) <= healthy_rate:
            high = middle
        else:
            low = middle + 1
    threshold = float(values[high])
    return threshold, flagged_rate(maps, healthy, spacings, settings, threshold)
