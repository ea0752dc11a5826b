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

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..detection.map_filters import Spacing, anomaly_mask
from ..detection.postprocessing import PostProcessing
from ..errors import AutoDDPMError
from ..volumes.head_region import skull_stripped as stripped
from ..volumes.head_region import strip_erosion_mm
from ..volumes.slices import FOREGROUND_LEVEL, AxialStack, intensity_window, normalize

HEALTHY_MARGIN_MM = 10.0


def healthy_voxels(truth: np.ndarray, tissue: np.ndarray, spacing: Spacing,
                   margin_mm: float = HEALTHY_MARGIN_MM) -> np.ndarray:
    """Tissue voxels of a [slices, rows, columns] volume that count as healthy (see the module's docstring)."""
    if not truth.any():
        return tissue.copy()
    far = ndimage.distance_transform_edt(~truth, sampling=spacing) >= margin_mm
    lesion_free_slices = ~truth.any(axis=(1, 2))
    return tissue & (far | lesion_free_slices[:, None, None])


class LabelledVolume:
    """A volume and its lesion mask (None: lesion-free) in canonical slices, with the voxels that count as healthy;
    ``skull_stripped``: the volume set to 0 outside the card's brain region first, as a stripping pipeline
    would deliver it (volumes.head_region)."""

    def __init__(self, image_path: str | os.PathLike, mask_path: Optional[str | os.PathLike], card,
                 skull_stripped: bool = False) -> None:
        # Imported here: SimpleITK is only needed where volumes are read, and the command line builds the
        # benchmark's parser on GPU nodes that lack it.
        from ..volumes.volume_io import read_volume

        image_path = Path(image_path)
        self.name = image_path.name.split("_flair")[0] if "_flair" in image_path.name else image_path.name.split(".")[0]
        self.image = read_volume(image_path)
        stack = AxialStack.from_image(self.image)
        self.spacing = stack.spacing
        self.array = stack.array  # the intensities, which deepbet's brain region reads
        if skull_stripped:
            self.array = stripped(stack.array, stack.spacing, card.intensity_percentiles, strip_erosion_mm(card.postprocessing))
            self.image = stack.to_image(self.array)
        self.slices01 = normalize(self.array, intensity_window(self.array, card.intensity_percentiles))
        self.truth = (np.zeros(self.slices01.shape, bool) if mask_path is None
                      else AxialStack.from_image(read_volume(mask_path)).array > 0)
        if self.truth.shape != self.slices01.shape:
            raise AutoDDPMError(f"mask {mask_path} has shape {self.truth.shape}, its image {image_path} {self.slices01.shape}")
        self.healthy = healthy_voxels(self.truth, self.slices01 > FOREGROUND_LEVEL, self.spacing)


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
