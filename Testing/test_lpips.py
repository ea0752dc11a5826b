"""Tests of the offline LPIPS-alex (AutoDDPMLib.diffusion.lpips) and its weight conversion tool."""

from __future__ import annotations

import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from AutoDDPMLib.diffusion.lpips import LPIPS, load_lpips, weights_path
from AutoDDPMLib.errors import AutoDDPMError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = Path(__file__).resolve().parent / "data" / "lpips"


def _converter():
    spec = importlib.util.spec_from_file_location("convert_lpips_weights", REPO / "tools" / "convert_lpips_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smooth_image(height: int = 64, width: int = 64, channels: int = 3) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    planes = [0.5 + 0.4 * torch.sin(6 * xx + 4 * yy * (c + 1)) for c in range(channels)]
    return torch.stack(planes)[None]


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return load_lpips()


def test_parameter_count_and_frozen(lpips: LPIPS) -> None:
    assert sum(p.numel() for p in lpips.parameters()) == 2_470_848
    assert not lpips.training
    assert not any(p.requires_grad for p in lpips.parameters())
    # LPIPS clamps its linear weights to >= 0 in training; that is what makes the map non-negative.
    assert all((getattr(lpips, f"lin{i}").weight >= 0).all() for i in range(5))


def test_weights_file_provenance() -> None:
    with safe_open(str(weights_path()), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["source_sha256"] == _converter().SOURCE_SHA256


def test_cached_per_device(lpips: LPIPS) -> None:
    assert load_lpips("cpu") is lpips
    assert load_lpips(torch.device("cpu")) is lpips


def test_identical_images_give_zero_map(lpips: LPIPS) -> None:
    x = _smooth_image()
    with torch.no_grad():
        assert torch.equal(lpips(x, x), torch.zeros(1, 1, 64, 64))


def test_map_is_non_negative_and_of_input_size(lpips: LPIPS) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 72, generator=generator)
    y = torch.rand(2, 3, 48, 72, generator=generator)
    with torch.no_grad():
        distance_map = lpips(x, y)
        distance = lpips.distance(x, y)
    assert distance_map.shape == (2, 1, 48, 72)
    assert (distance_map >= 0).all()
    assert distance.shape == (2,)
    # distance() averages each layer at its own resolution (as lpips does), so it only nearly
    # equals the mean of the upsampled map.
    torch.testing.assert_close(distance, distance_map.mean(dim=(1, 2, 3)), rtol=1e-3, atol=0)


def test_grey_image_equals_repeated_rgb(lpips: LPIPS) -> None:
    x = _smooth_image(channels=1)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    with torch.no_grad():
        grey = lpips(x, y)
        rgb = lpips(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1))
    torch.testing.assert_close(grey, rgb)
    assert grey.mean() > 0


def test_distance_grows_with_noise(lpips: LPIPS) -> None:
    x = _smooth_image()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    levels = [0.02, 0.05, 0.1, 0.2, 0.4]
    batch_x = x.repeat(len(levels), 1, 1, 1)
    batch_y = torch.stack([(x[0] + level * noise[0]).clamp(0, 1) for level in levels])
    with torch.no_grad():
        distances = lpips.distance(batch_x, batch_y)
    assert (distances[1:] > distances[:-1]).all(), distances


def test_images_too_small_are_a_user_error(lpips: LPIPS) -> None:
    x = torch.zeros(1, 1, 30, 64)
    with pytest.raises(AutoDDPMError, match="at least 31"):
        lpips(x, x)


def _load_png(path: Path) -> torch.Tensor:
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # H x W x 3, uint8 RGB
    return torch.from_numpy(array[..., :3].astype(np.float32)).permute(2, 0, 1)[None]


@pytest.mark.skipif(
    not (EXAMPLES / "ex_ref.png").is_file(), reason="LPIPS example images (ex_ref/ex_p0/ex_p1.png) not shipped"
)
def test_reference_example_distances(lpips: LPIPS) -> None:
    # lpips' own check (test_network.py) feeds im2tensor(image) = image / 127.5 - 1 in [-1, 1] and
    # prints (0.722, 0.138); our API takes [0, 1], so image / 255 is the same input.
    ref, p0, p1 = (_load_png(EXAMPLES / f"{name}.png") / 255.0 for name in ("ex_ref", "ex_p0", "ex_p1"))
    with torch.no_grad():
        d0 = lpips.distance(ref, p0).item()
        d1 = lpips.distance(ref, p1).item()
    assert d0 == pytest.approx(0.722, abs=0.005)
    assert d1 == pytest.approx(0.138, abs=0.005)


def _fake_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "Models").mkdir()
    (tmp_path / "LPIPS").mkdir()
    monkeypatch.setenv("AUTODDPM_RESOURCES", str(tmp_path))
    return tmp_path / "LPIPS" / "lpips_alex.safetensors"


def test_corrupt_weights_file_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _fake_resources(tmp_path, monkeypatch)
    target.write_bytes(b"\x00garbage, not a safetensors file" * 10)
    with pytest.raises(AutoDDPMError, match="convert_lpips_weights"):
        load_lpips()


def test_missing_weights_file_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_resources(tmp_path, monkeypatch)
    with pytest.raises(AutoDDPMError, match="missing"):
        load_lpips()


def test_wrong_tensors_are_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _fake_resources(tmp_path, monkeypatch)
    save_file({"net.conv1.weight": torch.zeros(64, 3, 3, 3)}, str(target))
    with pytest.raises(AutoDDPMError, match="does not hold LPIPS-alex"):
        load_lpips()


def test_converter_unpickler_refuses_foreign_globals() -> None:
    converter = _converter()
    payload = pickle.dumps({"kernel": np.arange(3, dtype=np.float32)})
    assert np.array_equal(converter._NumpyOnlyUnpickler(io.BytesIO(payload)).load()["kernel"], np.arange(3))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        converter._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Path("x")))).load()


def test_converter_layout_matches_flax_forward() -> None:
    # Random weights in the source's Flax HWIO layout, converted, must give the same LPIPS as the
    # converter's independent NHWC reference: guards the HWIO -> OIHW transpose without the sdist.
    converter = _converter()
    rng = np.random.default_rng(3)
    flat = {}
    for path, (_, (out_c, in_c, kh, kw)) in converter.CONVS.items():
        flat[f"{path}/kernel"] = (rng.standard_normal((kh, kw, in_c, out_c)) / np.sqrt(in_c * kh * kw)).astype(
            np.float32
        )
        if path.startswith("AlexNet_0/"):
            flat[f"{path}/bias"] = (0.1 * rng.standard_normal(out_c)).astype(np.float32)
        else:
            flat[f"{path}/kernel"] = np.abs(flat[f"{path}/kernel"])
    model = LPIPS()
    model.load_state_dict({name: torch.from_numpy(array) for name, array in converter.convert(flat).items()})
    model.double()  # float64 like the reference, so a tight tolerance separates a flip (~1e-2 off)
    # Asymmetric content so a flipped or transposed kernel would change the result.
    a = rng.uniform(0, 1, (1, 40, 36, 3))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    expected = converter._reference_lpips_nhwc(flat, 2 * a - 1, 2 * b - 1)
    with torch.no_grad():
        ours = model.distance(
            torch.from_numpy(a.transpose(0, 3, 1, 2)), torch.from_numpy(b.transpose(0, 3, 1, 2))
        )
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-7)
