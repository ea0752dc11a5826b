"""Slices: exact reorientation round trips, intensity windows, the model grid and back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AutoDDPMLib.errors import AutoDDPMError
from AutoDDPMLib.volumes.slices import AxialStack, denormalize, has_signal, intensity_window, normalize, to_model_grid

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


DIRECTIONS = {
    "identity": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "sagittal": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "coronal": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
    "oblique20": rotation(0, 20) @ rotation(2, 20),
    "oblique45": rotation(2, 45),  # halfway between two axes: the tie must still invert exactly
}


def make_image(direction: np.ndarray, spacing=(0.5, 0.9, 3.0), size=(7, 6, 5)) -> sitk.Image:
    """Distinct random voxel values, so any mix-up of voxel order shows."""
    array = np.random.default_rng(0).random(size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((12.5, -30.0, 7.25))
    image.SetDirection(tuple(direction.ravel()))
    return image


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_axial_stack_round_trip_is_exact(name):
    image = make_image(DIRECTIONS[name])
    stack = AxialStack.from_image(image)
    assert stack.array.dtype == np.float32 and stack.array.ndim == 3
    back = stack.to_image(stack.array)
    assert back.GetSize() == image.GetSize()
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin()
    assert back.GetDirection() == image.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_identity_image_is_unchanged():
    image = make_image(np.eye(3))
    stack = AxialStack.from_image(image)
    np.testing.assert_array_equal(stack.array, sitk.GetArrayFromImage(image))
    assert stack.pixel_spacing == (0.9, 0.5)  # (row = y, column = x)


def test_canonical_orientation_matches_identity_image():
    """The same anatomy stored RAS, sagittally or coronally gives the slices of its LPS storage."""
    lps = make_image(np.eye(3))
    lps_array = sitk.GetArrayFromImage(lps)
    # PermuteAxes and Flip change only how voxels are stored, not where they are.
    stored_otherwise = [
        sitk.Flip(lps, [True, True, False]),  # RAS
        sitk.Flip(sitk.PermuteAxes(lps, [1, 2, 0]), [False, True, True]),  # sagittal
        sitk.Flip(sitk.PermuteAxes(lps, [0, 2, 1]), [False, True, False]),  # coronal
    ]
    for image in stored_otherwise:
        assert image.GetDirection() != lps.GetDirection()
        stack = AxialStack.from_image(image)
        np.testing.assert_array_equal(stack.array, lps_array)
        assert stack.pixel_spacing == (0.9, 0.5)


def test_sagittal_slices_become_axial():
    image = make_image(DIRECTIONS["sagittal"], spacing=(3.0, 0.5, 0.9))
    stack = AxialStack.from_image(image)
    # Index axes point (P, I, R): the slices run along j, rows along i, columns along k.
    assert stack.array.shape == (image.GetSize()[1], image.GetSize()[0], image.GetSize()[2])
    assert stack.pixel_spacing == (3.0, 0.9)


def test_to_image_keeps_mask_dtype_and_takes_reference_geometry():
    image = make_image(DIRECTIONS["sagittal"])
    stack = AxialStack.from_image(image)
    mask = stack.array > 0.5
    back = stack.to_image(mask.astype(np.uint8))
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image) > 0.5)
    assert stack.to_image(mask).GetPixelID() == sitk.sitkUInt8

    reference = sitk.Image(image)
    reference.SetOrigin((1.0, 2.0, 3.0))
    assert stack.to_image(stack.array, reference).GetOrigin() == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError):
        stack.to_image(stack.array[1:])


def test_intensity_window_ignores_background():
    array = np.zeros((4, 50, 50), np.float32)
    array[:, 10:40, 10:40] = np.linspace(100, 200, 30)
    low, high = intensity_window(array, (0.0, 100.0))
    assert (low, high) == (100.0, 200.0)
    low, high = intensity_window(array)
    assert 100 <= low < 102 and 198 < high <= 200
    # A binary volume still gets a usable window.
    assert intensity_window((array > 0).astype(np.uint8)) == (0.0, 1.0)
    with pytest.raises(AutoDDPMError):
        intensity_window(np.full((3, 3, 3), 5.0))


def test_normalize_denormalize():
    volume = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    np.testing.assert_array_equal(normalize(volume, (0, 255)), volume.astype(np.float32) / 255)
    values = np.linspace(-50, 800, 1000).astype(np.float32)
    window = (10.0, 700.0)
    normalized = normalize(values, window)
    assert normalized.dtype == np.float32 and normalized.min() == 0.0 and normalized.max() == 1.0
    inside = (values >= 10) & (values <= 700)
    np.testing.assert_allclose(denormalize(normalized, window)[inside], values[inside], rtol=1e-5, atol=1e-3)


def test_has_signal():
    empty = np.zeros((100, 100), np.float32)
    assert not has_signal(empty)
    empty[:10, :40] = 0.5  # 4% foreground
    assert not has_signal(empty)
    empty[:10, :60] = 0.5  # 6% foreground
    assert has_signal(empty)
    assert not has_signal(np.full((10, 10), 0.04))


def blob(height: int, width: int, spacing=(1.0, 1.0), radius_mm=None, slices=2) -> np.ndarray:
    """Smooth bright disc that fades to 0 well before the edges, in physical (mm) coordinates."""
    y = (np.arange(height) - (height - 1) / 2) * spacing[0]
    x = (np.arange(width) - (width - 1) / 2) * spacing[1]
    radius_mm = radius_mm or 0.3 * min(height * spacing[0], width * spacing[1])
    r = np.hypot(*np.meshgrid(y, x, indexing="ij")) / radius_mm
    disc = np.exp(-(r**2) * 2.0).astype(np.float32)
    return np.stack([disc * (0.5 + 0.5 * k / max(slices - 1, 1)) for k in range(slices)])


@pytest.mark.parametrize(
    "shape, spacing, size",
    [
        ((64, 64), (1.0, 1.0), 64),  # already on the grid
        ((96, 96), (1.0, 1.0), 64),  # downsample
        ((40, 40), (1.0, 1.0), 64),  # upsample
        ((197, 233), (1.0, 1.0), 128),  # IXI PNG shape: wider than tall
        ((90, 60), (1.0, 1.0), 64),  # taller than wide
        ((128, 64), (0.5, 1.0), 64),  # anisotropic but physically square: no padding
        ((50, 70), (0.9, 0.5), 64),  # anisotropic and non-square
    ],
)
def test_model_grid_round_trip(shape, spacing, size):
    slices = blob(*shape, spacing=spacing)
    grid, transform = to_model_grid(slices, spacing, size)
    assert grid.shape == (2, 1, size, size) and grid.dtype == torch.float32
    assert 0.0 <= grid.min() and grid.max() <= 1.0
    back = transform.from_model_grid(grid)
    assert back.shape == slices.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, slices, atol=0.03)


def test_model_grid_constant_image_round_trip():
    slices = np.full((3, 80, 80), 0.7, np.float32)
    grid, transform = to_model_grid(slices, (1.0, 1.0), 32)
    np.testing.assert_allclose(grid.numpy(), 0.7, atol=1e-6)
    np.testing.assert_allclose(transform.from_model_grid(grid), 0.7, atol=1e-6)
    # Padded sides blend with the background only at the border.
    slices = np.full((3, 80, 60), 0.7, np.float32)
    grid, transform = to_model_grid(slices, (1.0, 1.0), 40)
    back = transform.from_model_grid(grid)
    assert back.shape == slices.shape
    np.testing.assert_allclose(back[:, :, 4:-4], 0.7, atol=1e-5)
    assert grid[0, 0, 20, 0] == 0.0 and grid[0, 0, 20, 20] == pytest.approx(0.7)


def test_model_grid_is_geometrically_square():
    """A physical disc stored in 1 x 2 mm pixels is a disc (not an ellipse) on the grid."""
    radius_mm = 80.0
    y = (np.arange(256) - 127.5) * 1.0
    x = (np.arange(128) - 63.5) * 2.0
    disc = (np.hypot(*np.meshgrid(y, x, indexing="ij")) < radius_mm).astype(np.float32)[None]
    grid, transform = to_model_grid(disc, (1.0, 2.0), 128)
    inside = grid[0, 0] > 0.5
    rows = int(inside.any(dim=1).sum())
    cols = int(inside.any(dim=0).sum())
    assert abs(rows - cols) <= 1 and abs(rows - 80) <= 1  # 160 mm of a 256 mm field on 128 pixels
    # Non-square in mm: 100 rows of 1 mm, 50 columns of 1 mm is padded to 100 x 100 mm.
    grid, transform = to_model_grid(np.ones((1, 100, 50), np.float32), (1.0, 1.0), 100)
    assert (transform.top, transform.left, transform.padded_height, transform.padded_width) == (0, 25, 100, 100)
    assert float(grid[0, 0, 50, 10]) == 0.0 and float(grid[0, 0, 50, 50]) == 1.0


def test_from_model_grid_rejects_wrong_shape():
    _, transform = to_model_grid(np.zeros((2, 10, 10), np.float32), (1.0, 1.0), 16)
    with pytest.raises(ValueError):
        transform.from_model_grid(torch.zeros(2, 1, 8, 8))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not available")
def test_real_lgg_volume_round_trip():
    from AutoDDPMLib.volumes.volume_io import read_volume

    path = sorted((SHARED_DATA / "lgg_flair" / "val").glob("*_flair.nii.gz"))[0]
    image = read_volume(path)
    stack = AxialStack.from_image(image)
    np.testing.assert_array_equal(stack.array, sitk.GetArrayFromImage(image))
    np.testing.assert_array_equal(normalize(stack.array, (0, 255)), stack.array / 255)
    grid, transform = to_model_grid(normalize(stack.array, (0, 255)), stack.pixel_spacing, 128)
    assert transform.from_model_grid(grid).shape == stack.array.shape
