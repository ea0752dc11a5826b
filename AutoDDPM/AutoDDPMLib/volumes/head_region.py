"""The head and the brain region of axial slices: where tissue is, and where the brain must be.

The head region is each slice's largest region of tissue with its holes filled;
the brain region is that head region eroded in-plane by a distance in mm, which
leaves out scalp, skull and the edge of the field of view. The detection's
post-processing limits the anomaly map to the brain region
(``detection.map_filters``); training strips slices to it (skull-stripping
augmentation), the benchmark builds its skull-stripped development set with it
(``skull_stripped``),
and the fit checks use the head region to tell a skull-stripped input. It lives
here, below all of them, so each computes the very same region.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .slices import FOREGROUND_LEVEL, intensity_window, normalize

Spacing = Sequence[float]  # (slice, row, column) in mm

# Where a model card post-processes without a brain region, volumes are stripped as flair-lgg's region (12 mm).
DEFAULT_STRIP_EROSION_MM = 12.0


def head_region(slices01: np.ndarray) -> np.ndarray:
    """The head in each slice: its largest region of tissue with the holes (ventricles, dark lesions) filled."""
    head = np.zeros(slices01.shape, dtype=bool)
    for z, tissue in enumerate(slices01 > FOREGROUND_LEVEL):
        labels, count = ndimage.label(tissue)
        if count:
            largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
            head[z] = ndimage.binary_fill_holes(labels == largest)
    return head


def brain_region(slices01: np.ndarray, spacing: Spacing, erosion_mm: float) -> np.ndarray:
    """The head region of each slice eroded in-plane by ``erosion_mm`` (an exact Euclidean distance in mm)."""
    return erode_in_plane(head_region(slices01), spacing, erosion_mm)


def erode_in_plane(region: np.ndarray, spacing: Spacing, erosion_mm: float) -> np.ndarray:
    """Each slice of ``region`` eroded by ``erosion_mm`` (an exact Euclidean distance in mm; 0: unchanged)."""
    if erosion_mm <= 0:
        return region
    eroded = np.zeros_like(region)
    for z in range(len(region)):
        if region[z].any():
            # Distance to the nearest voxel outside; the padding makes the image border count as outside.
            inside = np.pad(region[z], 1)
            eroded[z] = ndimage.distance_transform_edt(inside, sampling=spacing[1:])[1:-1, 1:-1] > erosion_mm
    return eroded


def strip_erosion_mm(postprocessing: dict) -> float:
    """How far the head is eroded where a volume is skull-stripped for a model card with these post-processing
    settings: the card's brain region, so that what is stripped away is never searched anyway."""
    erosion = postprocessing.get("brain_erosion_mm")
    return DEFAULT_STRIP_EROSION_MM if erosion is None else float(erosion)


def skull_stripped(array: np.ndarray, spacing: Spacing, percentiles: Sequence[float], erosion_mm: float) -> np.ndarray:
    """A volume [S, H, W] as a skull-stripping pipeline leaves it: 0 outside the brain region the engine
    computes (the head eroded ``erosion_mm``, on the volume normalised with ``percentiles``)."""
    brain = brain_region(normalize(array, intensity_window(array, tuple(percentiles))), spacing, erosion_mm)
    return np.where(brain, array, 0).astype(array.dtype)
