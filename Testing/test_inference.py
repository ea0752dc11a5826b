"""Whole volumes through the engine: geometry, untouched input, thresholds, determinism."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_head_volume

from AutoDDPMLib.detection.inference import REPEAT_SEED_STRIDE, AutoDDPM
from AutoDDPMLib.errors import AutoDDPMError


def rotation(axis_angle_deg: float) -> tuple:
    a = np.deg2rad(axis_angle_deg)
    return tuple(np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]).ravel())


GEOMETRIES = {
    "identity-anisotropic": dict(spacing=(0.9, 0.9, 3.0), direction=tuple(np.eye(3).ravel())),
    "RAS": dict(spacing=(1.0, 1.0, 1.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)),
    "oblique": dict(spacing=(0.5, 0.9, 2.0), direction=rotation(20)),
    "sagittal": dict(spacing=(1.0, 1.2, 1.2), direction=(0, 0, 1, 1, 0, 0, 0, 1, 0)),
}


@pytest.fixture(scope="module")
def engine(tiny_model):
    return AutoDDPM(tiny_model, seed=0, batch_size=4)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_outputs_have_the_input_geometry(engine, name):
    image = make_head_volume(shape=(5, 36, 44))
    image.SetSpacing(GEOMETRIES[name]["spacing"])
    image.SetDirection(GEOMETRIES[name]["direction"])
    image.SetOrigin((10.0, -20.0, 5.0))
    before = sitk.GetArrayFromImage(image).copy()
    result = engine.process_volume(image)
    for out in (result.pseudo_healthy, result.anomaly_map, result.mask):
        assert out.GetSize() == image.GetSize()
        assert out.GetSpacing() == image.GetSpacing()
        assert out.GetOrigin() == image.GetOrigin()
        assert np.allclose(out.GetDirection(), image.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(image), before), "the input must not change"
    assert result.mask.GetPixelID() == sitk.sitkUInt8
    assert result.anomaly_map.GetPixelID() == sitk.sitkFloat32


def test_mask_is_the_thresholded_anomaly_map_and_pseudo_healthy_keeps_the_input(engine):
    image = make_head_volume()
    result = engine.process_volume(image)
    anomaly = sitk.GetArrayFromImage(result.anomaly_map)
    mask = sitk.GetArrayFromImage(result.mask)
    assert np.array_equal(mask, (anomaly > engine.threshold).astype(np.uint8))
    assert result.anomalous_voxels == int(mask.sum())
    assert result.anomalous_volume_ml == pytest.approx(mask.sum() * np.prod(image.GetSpacing()) / 1000)
    # Wherever nothing was re-sampled (anomaly exactly 0 there) the input voxel is returned as it was.
    original = sitk.GetArrayFromImage(image)
    changed = sitk.GetArrayFromImage(result.pseudo_healthy) != original
    assert np.all(anomaly[changed] >= 0)
    assert changed.mean() < 1.0


def test_slices_without_signal_are_skipped_and_kept(engine):
    image = make_head_volume(shape=(6, 40, 48))
    array = sitk.GetArrayFromImage(image)
    array[0] = 0  # an empty slice above the head
    empty = sitk.GetImageFromArray(array)
    empty.CopyInformation(image)
    result = engine.process_volume(empty)
    assert result.slices == 6 and result.slices_with_signal == 5
    assert np.all(sitk.GetArrayFromImage(result.anomaly_map)[0] == 0)
    assert np.array_equal(sitk.GetArrayFromImage(result.pseudo_healthy)[0], array[0])


def test_same_seed_same_volume(tiny_model):
    image = make_head_volume()
    a = AutoDDPM(tiny_model, seed=3, batch_size=4).process_volume(image)
    b = AutoDDPM(tiny_model, seed=3, batch_size=4).process_volume(image)
    assert np.array_equal(sitk.GetArrayFromImage(a.anomaly_map), sitk.GetArrayFromImage(b.anomaly_map))
    assert np.array_equal(sitk.GetArrayFromImage(a.pseudo_healthy), sitk.GetArrayFromImage(b.pseudo_healthy))


def test_repeats_average_the_runs_and_add_their_spread(tiny_model):
    image = make_head_volume()
    engine = AutoDDPM(tiny_model, seed=3, batch_size=4)
    single = engine.process_volume(image)
    seen = []
    repeated = AutoDDPM(tiny_model, seed=3, batch_size=4).process_volume(image, lambda f, stage: seen.append(f), repeats=3)
    # The outputs are the mean of the runs with seeds seed + r * REPEAT_SEED_STRIDE; the first is the single run.
    runs = [AutoDDPM(tiny_model, seed=3 + r * REPEAT_SEED_STRIDE, batch_size=4).process_volume(image) for r in range(3)]
    assert np.array_equal(sitk.GetArrayFromImage(runs[0].anomaly_map), sitk.GetArrayFromImage(single.anomaly_map))
    for key in ("anomaly_map", "pseudo_healthy"):
        mean = np.mean([sitk.GetArrayFromImage(getattr(run, key)) for run in runs], axis=0)
        np.testing.assert_allclose(sitk.GetArrayFromImage(getattr(repeated, key)), mean, rtol=1e-5, atol=1e-6)
    mean_map = sitk.GetArrayFromImage(repeated.anomaly_map)
    assert np.array_equal(sitk.GetArrayFromImage(repeated.mask), (mean_map > engine.threshold).astype(np.uint8))
    assert not np.array_equal(mean_map, sitk.GetArrayFromImage(single.anomaly_map))
    assert single.spread is None and single.repeats == 1 and repeated.repeats == 3
    spread = sitk.GetArrayFromImage(repeated.spread)
    assert repeated.spread.GetSize() == image.GetSize() and repeated.spread.GetSpacing() == image.GetSpacing()
    assert repeated.spread.GetPixelID() == sitk.sitkFloat32
    # Other seeds draw other maps: the spread is positive somewhere, and never negative.
    assert spread.min() >= 0 and spread.max() > 0
    # One progress scale over all repeats.
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and any(0.3 < f < 0.4 for f in seen)
    with pytest.raises(AutoDDPMError, match="--repeats must be at least 1"):
        AutoDDPM(tiny_model).process_volume(image, repeats=0)


def test_threshold_override(tiny_model):
    image = make_head_volume()
    low = AutoDDPM(tiny_model, threshold=0.0).process_volume(image)
    high = AutoDDPM(tiny_model, threshold=1e9).process_volume(image)
    assert high.anomalous_voxels == 0 and low.anomalous_voxels > 0
    # The tiny model's card is not calibrated: every run says so.
    uncalibrated = [w for w in low.warnings if "no thresholds calibrated for the fast schedule" in w]
    assert len(uncalibrated) == 1 and high.warnings == uncalibrated
    # Flagging (nearly) everything means the input does not fit the model: say so, with a sane share.
    (flagged,) = [w for w in low.warnings if w not in uncalibrated]
    share = float(flagged.split("%")[0])
    assert 20 < share <= 100


def test_progress_reaches_the_end_through_both_stages(engine):
    seen = []
    engine.process_volume(make_head_volume(), lambda fraction, stage: seen.append((fraction, stage)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {stage for _, stage in seen} == {"mask", "resample"}


def test_volume_smaller_than_the_model_grid_is_refused(engine):
    with pytest.raises(AutoDDPMError, match="smaller than the model grid"):
        engine.process_volume(make_head_volume(shape=(3, 20, 24)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="slow"), "unknown schedule"),
    (dict(device="tpu"), "unknown device"),
    (dict(model="no-such-model"), "unknown model"),
    (dict(batch_size=-1), "batch-size"),
    (dict(backend="tensorrt"), "unknown backend 'tensorrt'"),
])
def test_bad_options(tiny_model, kwargs, message):
    with pytest.raises(AutoDDPMError, match=message):
        AutoDDPM(kwargs.pop("model", tiny_model), **kwargs)


def test_the_noise_schedule_comes_from_the_card(tiny_model_with):
    from AutoDDPMLib.benchmark.methods import Runner
    from AutoDDPMLib.benchmark.parts import PartStore
    from AutoDDPMLib.models.bundle import read_card

    scheduler = {"num_train_timesteps": 800, "beta_start": 2e-4, "beta_end": 1e-2, "prediction": "epsilon", "max_timestep": 499}
    model = tiny_model_with("cosine-ish", scheduler=scheduler)
    card = read_card(model)
    runner = Runner(card, torch.device("cpu"), 2, 0, "torch", PartStore(model / "bench", {}, resume=False))
    for pipeline in [AutoDDPM(model).pipeline, *runner.pipelines.values()]:
        assert pipeline.scheduler.num_train_timesteps == 800
        assert float(pipeline.scheduler.betas[0]) == pytest.approx(2e-4) and float(pipeline.scheduler.betas[-1]) == pytest.approx(1e-2)


@pytest.mark.parametrize("change, message", [
    ({"num_train_timesteps": "1000"}, "num_train_timesteps missing or not an integer"),
    ({"beta_start": 0.03}, "0 < beta_start <= beta_end < 1"),
    ({"max_timestep": 1000}, "max_timestep should be an integer below num_train_timesteps"),
    ({"prediction": "v"}, "epsilon-prediction networks only"),
])
def test_a_card_with_a_bad_noise_schedule_is_refused(tiny_model_with, change, message):
    scheduler = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 2e-2, "prediction": "epsilon", "max_timestep": 499}
    with pytest.raises(AutoDDPMError, match=message):
        AutoDDPM(tiny_model_with("bad-schedule", scheduler={**scheduler, **change}))


@pytest.fixture
def without_onnx(monkeypatch):
    """onnx and onnxruntime look uninstalled (as in CI)."""
    import AutoDDPMLib.diffusion.onnx_backend as onnx_backend

    monkeypatch.setattr(onnx_backend, "missing_onnx_packages", lambda: ["onnx", "onnxruntime"])


def test_onnxruntime_backend_gives_the_torch_results(tiny_model):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")  # torch.onnx.export needs it
    from AutoDDPMLib.diffusion.onnx_backend import OnnxRuntimeUNet

    image = make_head_volume()
    ort = AutoDDPM(tiny_model, seed=3, batch_size=4, backend="onnxruntime")
    assert ort.backend_name == "onnxruntime" and ort.backend_note is None
    assert isinstance(ort.pipeline.unet, OnnxRuntimeUNet)
    auto = AutoDDPM(tiny_model, seed=3, batch_size=4)  # the CPU with the packages installed: ONNX Runtime
    assert auto.backend_name == "onnxruntime" and auto.backend_note is None
    torch_engine = AutoDDPM(tiny_model, seed=3, batch_size=4, backend="torch")
    assert torch_engine.backend_name == "torch" and torch_engine.backend_note is None
    a, b = ort.process_volume(image), torch_engine.process_volume(image)
    anomaly_a, anomaly_b = sitk.GetArrayFromImage(a.anomaly_map), sitk.GetArrayFromImage(b.anomaly_map)
    assert anomaly_b.max() > 0.01  # the maps compared are not all zero
    assert np.abs(anomaly_a - anomaly_b).max() < 1e-4
    assert np.array_equal(sitk.GetArrayFromImage(a.mask), sitk.GetArrayFromImage(b.mask))


def test_onnxruntime_backend_without_the_packages_says_what_to_install(tiny_model, without_onnx):
    with pytest.raises(AutoDDPMError, match=r"onnx and onnxruntime are not installed; pip install \"autoddpm\[onnx\]\""):
        AutoDDPM(tiny_model, backend="onnxruntime")


def test_onnxruntime_backend_is_cpu_only(tiny_model):
    import torch

    from AutoDDPMLib.models.bundle import read_card
    from AutoDDPMLib.models.networks import load_network

    with pytest.raises(AutoDDPMError, match="CPU only and the device is cuda"):
        load_network(read_card(tiny_model), torch.device("cuda"), "onnxruntime")


def test_auto_backend_without_the_packages_runs_torch(tiny_model, without_onnx):
    from AutoDDPMLib.diffusion.unet import UNet

    engine = AutoDDPM(tiny_model, batch_size=4)
    assert engine.backend_name == "torch" and "not installed" in engine.backend_note
    assert isinstance(engine.pipeline.unet, UNet)
    assert engine.process_volume(make_head_volume(shape=(2, 40, 48))).slices == 2


def test_a_failed_export_falls_back_to_torch_under_auto_only(tiny_model, monkeypatch):
    import AutoDDPMLib.diffusion.onnx_backend as onnx_backend

    def fail(network, threads=None):
        raise RuntimeError("unsupported operator\nmore details")

    monkeypatch.setattr(onnx_backend, "missing_onnx_packages", lambda: [])
    monkeypatch.setattr(onnx_backend, "OnnxRuntimeUNet", fail)
    engine = AutoDDPM(tiny_model)
    assert engine.backend_name == "torch"
    assert engine.backend_note == "exporting model tiny to ONNX Runtime failed (RuntimeError: unsupported operator)"
    with pytest.raises(AutoDDPMError, match="to ONNX Runtime failed .*; use --backend torch"):
        AutoDDPM(tiny_model, backend="onnxruntime")


class SmallGpu:
    """The engine's pipeline on a device too small for any batch: it runs out of memory until the engine is on the CPU."""

    def __init__(self, engine: AutoDDPM, error: Exception) -> None:
        self.engine, self.pipeline, self.error, self.batches = engine, engine.pipeline, error, []

    def __call__(self, batch, generator, report):
        self.batches.append((self.engine.device.type, len(batch)))
        if self.engine.device.type != "cpu":
            raise self.error
        return self.pipeline(batch, generator, report)

    def __getattr__(self, name):
        return getattr(self.pipeline, name)


# torch.OutOfMemoryError arrived in torch 2.5; the package declares torch>=2.0, where only torch.cuda.OutOfMemoryError is.
@pytest.mark.parametrize("torch_version", ["2.5 and later", "2.0 to 2.4"])
@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GB)")],
                         ids=["cuda", "mps"])
def test_out_of_memory_halves_the_batch_then_moves_to_the_cpu(tiny_model, monkeypatch, torch_version, error):
    if torch_version == "2.0 to 2.4":
        monkeypatch.delattr(torch, "OutOfMemoryError")
    engine = AutoDDPM(tiny_model, seed=0, batch_size=2, backend="torch")  # the backend that runs on GPUs
    # A device that is not the CPU and exists on every machine: the data go there before the pipeline fails.
    engine.device = torch.device("meta")
    engine.pipeline = SmallGpu(engine, error)
    slices = torch.rand(3, 1, 32, 32)
    output = engine.process_slices(slices)
    assert engine.pipeline.batches[:3] == [("meta", 2), ("meta", 1), ("cpu", 1)]
    assert engine.device.type == "cpu" and output.anomaly_map.shape == (3, 1, 32, 32)


@pytest.mark.parametrize("torch_version", ["2.5 and later", "2.0 to 2.4"])
def test_other_gpu_errors_are_not_taken_for_out_of_memory(tiny_model, monkeypatch, torch_version):
    if torch_version == "2.0 to 2.4":
        monkeypatch.delattr(torch, "OutOfMemoryError")
    engine = AutoDDPM(tiny_model, seed=0, batch_size=2, backend="torch")
    engine.device = torch.device("meta")
    engine.pipeline = SmallGpu(engine, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.process_slices(torch.rand(2, 1, 32, 32))
    assert engine.pipeline.batches == [("meta", 2)]
