"""From the raw anomaly map to the one a reader sees: brain region, 3D median, small components.

The pipeline makes its map slice by slice; tumours are 3D and sit inside the
brain. As every method it is compared with does (pDDPM, cDDPM, Baur et al.'s
comparative study), the map is post-processed before it is thresholded:

1. **Brain region.** The map is zero outside the head region (the tissue of each
   slice, holes filled) eroded in-plane by ``brain_erosion_mm``: scalp, skull and
   the edge of the field of view never count. The erosion stays in-plane because
   axial stacks are often thick and their slice spacing is not always known.
   With ``brain_region="deepbet"`` the region is deepbet's brain mask instead
   (volumes.brain_extraction), which follows the brain's outline at the skull base.
2. **3D median.** A median over ``median_mm`` in every direction and at least
   the neighbouring voxel on each side, so a 1 mm and a 5 mm stack both get a
   3D filter: an isolated bright voxel or slice is noise, a tumour is not.
3. **Small components.** Connected regions of the thresholded mask smaller than
   ``min_component_mm3`` are dropped (26-connectivity, in the volume's spacing).

Which deviations count (``polarity``) is decided in the pipeline (see
``diffusion.polarity.deviation``); the settings travel together in the model card.
``PostProcessing.none()`` (detection.postprocessing) is the paper's raw map.

Everything works on a [slices, rows, columns] array with its spacing in mm
(slice, row, column): the volume in its own geometry at run time, the model grid
in the benchmark.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage

# The regions live in volumes.head_region (training and the fit checks use them too); imported from here as before.
from ..volumes.brain_extraction import deepbet_extractor
from ..volumes.head_region import Spacing, brain_region, erode_in_plane, head_region  # noqa: F401
from .postprocessing import PostProcessing


def median_kernel(spacing: Spacing, size_mm: float) -> tuple[int, ...]:
    """Voxels per axis of a median over ``size_mm``: odd, and at least 3 (the neighbours on each side)."""
    return tuple(max(3, 2 * int(size_mm / s // 2) + 1) for s in spacing)


def smooth(anomaly: np.ndarray, spacing: Spacing, size_mm: float, region: Optional[np.ndarray] = None) -> np.ndarray:
    """3D median filter of the map over ``size_mm``; with a ``region``, only the values inside it are filtered
    (the others come back unchanged), which is the same there and several times faster on a head."""
    kernel = median_kernel(spacing, size_mm)
    if region is None:
        return ndimage.median_filter(anomaly, size=kernel, mode="nearest")
    result = anomaly.copy()
    if not region.any():
        return result
    # The region's bounding box and a kernel's reach around it hold every value a voxel inside depends on;
    # where the box meets the volume's edge, both filters repeat the same edge voxels.
    box = tuple(slice(max(0, int(i.min()) - k // 2), int(i.max()) + k // 2 + 1) for i, k in zip(np.nonzero(region), kernel))
    filtered = ndimage.median_filter(anomaly[box], size=kernel, mode="nearest")
    result[box] = np.where(region[box], filtered, anomaly[box])
    return result


def searched_region(slices01: np.ndarray, spacing: Spacing, settings: PostProcessing,
                    volume: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Where the map is searched (None: everywhere). deepbet's region needs the ``volume``'s own intensities
    (the AxialStack array the ``slices01`` were normalised from)."""
    if settings.brain_erosion_mm is None:
        return None
    if settings.brain_region == "head":
        return brain_region(slices01, spacing, settings.brain_erosion_mm)
    if volume is None:
        raise ValueError("deepbet's brain region needs the volume's intensities")
    return erode_in_plane(deepbet_extractor()(volume), spacing, settings.brain_erosion_mm)


def postprocess_map(anomaly: np.ndarray, slices01: np.ndarray, spacing: Spacing, settings: PostProcessing,
                    volume: Optional[np.ndarray] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(The output map, the brain region or None): ``anomaly`` limited to the brain and smoothed in 3D.

    ``volume`` (the intensities ``slices01`` came from) is needed for deepbet's brain region only.
    """
    brain = searched_region(slices01, spacing, settings, volume)
    result = anomaly
    if brain is not None:
        result = np.where(brain, result, 0).astype(anomaly.dtype)
    if settings.median_mm:
        result = smooth(result, spacing, settings.median_mm, brain)
    return result, brain


def remove_small_components(mask: np.ndarray, spacing: Spacing, min_mm3: float) -> np.ndarray:
    """``mask`` without its 26-connected components smaller than ``min_mm3``."""
    if not min_mm3 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel()) * float(np.prod(spacing))
    keep = sizes >= min_mm3
    keep[0] = False
    return keep[labels]


def anomaly_mask(anomaly: np.ndarray, threshold: float, spacing: Spacing, settings: PostProcessing) -> np.ndarray:
    """The mask a reader sees: the output map above ``threshold``, without components too small to count."""
    return remove_small_components(anomaly > threshold, spacing, settings.min_component_mm3)
