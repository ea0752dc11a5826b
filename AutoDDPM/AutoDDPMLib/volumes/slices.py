"""From a 3D volume to the model's square axial slices and back.

The 2D diffusion model was trained on axial slices of identity-direction
volumes read with ``SimpleITK.GetArrayFromImage`` (slice index first; IXI and
LGG exports), intensities in [0, 1] on a square N x N grid. This module

* reorients any volume to that canonical axial orientation and back without
  interpolation (``AxialStack``),
* maps intensities to [0, 1] and back (``intensity_window``, ``normalize``,
  ``denormalize``),
* pads slices to a square physical field of view and resamples them to the
  model grid, with the inverse (``to_model_grid``, ``GridTransform``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AutoDDPMError

if TYPE_CHECKING:  # imported where images are converted: grids and windows work without SimpleITK (a GPU node)
    import SimpleITK as sitk

# The orientation of an identity-direction image in DICOM's naming (index axes
# i, j, k point to patient Left, Posterior, Superior): the training data's.
CANONICAL_ORIENTATION = "LPS"

# A pixel counts as foreground above this level in [0, 1] units.
FOREGROUND_LEVEL = 0.05


class AxialStack:
    """A volume as a stack of axial slices in the canonical orientation.

    ``array`` is float32 [S, H, W] (slice index first, as ``GetArrayFromImage``
    orders an identity-direction volume); ``pixel_spacing`` is (row, column)
    spacing in mm, ``slice_spacing`` the distance between slices in mm. ``to_image`` maps an array of the same shape back to the
    input's exact geometry and voxel order.
    """

    def __init__(
        self,
        array: np.ndarray,
        pixel_spacing: Tuple[float, float],
        geometry: Tuple[tuple, tuple, tuple, tuple],
        axes: Tuple[int, int, int],
        flips: Tuple[int, ...],
        slice_spacing: float = 1.0,
    ):
        """Use ``from_image``; the arguments describe how ``array`` relates to the input.

        ``geometry`` is the input's (size, spacing, origin, direction);
        ``axes[a]`` is the canonical array axis that becomes the input's array
        axis ``a``, and ``flips`` the input array axes reversed on the way.
        """
        self.array = array
        self.pixel_spacing = pixel_spacing
        self.slice_spacing = slice_spacing
        self._geometry = geometry
        self._axes = axes
        self._flips = flips

    @classmethod
    def from_image(cls, image: sitk.Image) -> "AxialStack":
        """Reorients a scalar 3D image to canonical axial slices (a permutation and flips only).

        An oblique volume gets the closest canonical orientation, still without
        resampling, so the mapping stays exactly invertible. An identity-direction
        image is returned unchanged.
        """
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise ValueError(f"AxialStack needs a 3D image, got {image.GetDimension()}D")
        oriented = sitk.DICOMOrient(image, CANONICAL_ORIENTATION)
        # DICOMOrient only permutes and flips index axes, so the new direction is
        # D' = D @ P with P a signed permutation matrix; recover P to invert it
        # exactly in numpy (orienting back by name can pick a different
        # permutation for directions halfway between two axes).
        original_direction = np.array(image.GetDirection()).reshape(3, 3)
        oriented_direction = np.array(oriented.GetDirection()).reshape(3, 3)
        permutation = np.rint(np.linalg.solve(original_direction, oriented_direction)).astype(int)
        axes = [0, 0, 0]
        flips = []
        for oriented_axis in range(3):
            original_axis = int(np.flatnonzero(permutation[:, oriented_axis])[0])
            # numpy arrays list ITK's index axes (x, y, z) in reverse order.
            axes[2 - original_axis] = 2 - oriented_axis
            if permutation[original_axis, oriented_axis] < 0:
                flips.append(2 - original_axis)
        spacing = oriented.GetSpacing()
        return cls(
            array=sitk.GetArrayFromImage(oriented).astype(np.float32, copy=False),
            pixel_spacing=(float(spacing[1]), float(spacing[0])),
            geometry=(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()),
            axes=tuple(axes),
            flips=tuple(flips),
            slice_spacing=float(spacing[2]),
        )

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """(slice, row, column) spacing in mm, in the order of ``array``'s axes."""
        return (self.slice_spacing, *self.pixel_spacing)

    def to_image(self, array: np.ndarray, reference: Optional[sitk.Image] = None) -> sitk.Image:
        """An [S, H, W] array in the canonical orientation as an image in the input's geometry.

        The result has the input's size, spacing, origin, direction and voxel
        order (or ``reference``'s geometry, which must have the input's size).
        It keeps the array's dtype (uint8 masks stay uint8); bool becomes uint8
        and float16 float32, which SimpleITK cannot store.
        """
        import SimpleITK as sitk

        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the stack's {self.array.shape}")
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        elif array.dtype == np.float16:
            array = array.astype(np.float32)
        voxels = np.flip(np.transpose(array, self._axes), self._flips)
        image = sitk.GetImageFromArray(np.ascontiguousarray(voxels))
        size, spacing, origin, direction = self._geometry
        if reference is not None:
            if reference.GetSize() != size:
                raise ValueError(f"reference size {reference.GetSize()} differs from the input's {size}")
            spacing, origin, direction = reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection()
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        return image


def intensity_window(array: np.ndarray, foreground_percentiles: Tuple[float, float] = (0.5, 99.5)) -> Tuple[float, float]:
    """The (low, high) intensities that ``normalize`` maps to 0 and 1.

    Percentiles are taken over the voxels above the volume minimum, the MRI
    background, so that the amount of background does not shift the window.
    Raises AutoDDPMError for a volume without signal (all voxels equal).
    """
    array = np.asarray(array)
    minimum = array.min()
    foreground = array[array > minimum]
    if foreground.size == 0:
        raise AutoDDPMError(f"the volume has no signal (every voxel equals {float(minimum):g}); check that this is the right scan")
    low, high = (float(v) for v in np.percentile(foreground, foreground_percentiles))
    if high <= low:
        # A foreground of (nearly) one value, e.g. a binary image: span the whole range instead.
        low, high = float(minimum), float(array.max())
    return low, high


def normalize(array: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """Maps ``window`` = (low, high) linearly to [0, 1], clipping outside it; float32."""
    low, high = window
    return np.clip((np.asarray(array, dtype=np.float32) - low) / (high - low), 0.0, 1.0)


def denormalize(array01: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """The inverse of ``normalize`` (within the window): [0, 1] back to input intensities; float32."""
    low, high = window
    return np.asarray(array01, dtype=np.float32) * (high - low) + low


def has_signal(slice01: np.ndarray, min_fraction: float = 0.05) -> bool:
    """Whether at least ``min_fraction`` of the slice's pixels are foreground (above 0.05 in [0, 1])."""
    return bool(np.mean(np.asarray(slice01) > FOREGROUND_LEVEL) >= min_fraction)


@dataclass(frozen=True)
class GridTransform:
    """How slices were padded and resampled onto the model grid, to undo it."""

    height: int
    width: int
    top: int
    left: int
    padded_height: int
    padded_width: int
    size: int

    def from_model_grid(self, t: torch.Tensor) -> np.ndarray:
        """Maps [S, 1, size, size] model-grid slices back to the [S, H, W] slice grid (float32 numpy)."""
        if t.dim() != 4 or t.shape[1] != 1 or tuple(t.shape[2:]) != (self.size, self.size):
            raise ValueError(f"expected [S, 1, {self.size}, {self.size}] model-grid slices, got {list(t.shape)}")
        padded = _resize(t.detach().float().cpu(), (self.padded_height, self.padded_width))
        cropped = padded[:, 0, self.top : self.top + self.height, self.left : self.left + self.width]
        return cropped.numpy()


def _resize(t: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    # antialias filters only the axes that shrink; along growing axes it is plain bilinear.
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False, antialias=True)


def to_model_grid(slices01: np.ndarray, pixel_spacing: Tuple[float, float], size: int) -> Tuple[torch.Tensor, GridTransform]:
    """Pads [S, H, W] slices to a square physical field of view and resamples them to size x size.

    Padding is background (0), split evenly on both sides so the anatomy stays
    centred; with anisotropic pixels the field of view is square in mm, e.g.
    256 x 128 pixels of 1 x 2 mm is already a 256 mm square. Padding is whole
    pixels, so the field of view is square to within half a pixel. Returns
    float32 [S, 1, size, size] in [0, 1] and the transform that undoes it.
    """
    slices01 = np.asarray(slices01, dtype=np.float32)
    if slices01.ndim != 3:
        raise ValueError(f"expected [S, H, W] slices, got shape {slices01.shape}")
    height, width = slices01.shape[1:]
    row_mm, col_mm = pixel_spacing
    side_mm = max(height * row_mm, width * col_mm)
    padded_height = max(height, int(round(side_mm / row_mm)))
    padded_width = max(width, int(round(side_mm / col_mm)))
    top = (padded_height - height) // 2
    left = (padded_width - width) // 2
    transform = GridTransform(height, width, top, left, padded_height, padded_width, int(size))

    t = torch.from_numpy(slices01).unsqueeze(1)
    t = F.pad(t, (left, padded_width - width - left, top, padded_height - height - top), value=0.0)
    return _resize(t, (transform.size, transform.size)).clamp_(0.0, 1.0), transform
