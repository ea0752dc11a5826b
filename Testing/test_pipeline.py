"""Invariants of mask / stitch / re-sample, run for real with the tiny model."""

import pytest
import torch

from AutoDDPMLib.diffusion.lpips import load_lpips
from AutoDDPMLib.diffusion.pipeline import AutoDDPMPipeline
from AutoDDPMLib.diffusion.sampling_schedules import SCHEDULES, SamplingSchedule
from AutoDDPMLib.diffusion.scheduler import DDPMScheduler
from AutoDDPMLib.models.bundle import load_unet, read_card


class CountingUNet(torch.nn.Module):
    """The real network, counting how often it is evaluated."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, 0

    def forward(self, x, t):
        self.calls += 1
        return self.unet(x, t)


@pytest.fixture(scope="module")
def unet(tiny_model):
    return load_unet(read_card(tiny_model))


def make_pipeline(unet, schedule="fast", tau=0.05):
    schedule = SCHEDULES[schedule] if isinstance(schedule, str) else schedule
    return AutoDDPMPipeline(CountingUNet(unet), DDPMScheduler(), load_lpips(), tau, schedule)


@pytest.fixture()
def slices():
    g = torch.Generator().manual_seed(3)
    x = 0.3 + 0.05 * torch.randn(3, 1, 32, 32, generator=g)
    x[:, :, 10:16, 12:18] = 0.9  # a bright "lesion"
    return x.clamp(0, 1)


@pytest.mark.parametrize("schedule, evaluations", [("fast", 25), ("reference", 451)])
def test_network_evaluations_per_schedule(unet, slices, schedule, evaluations):
    pipeline = make_pipeline(unet, schedule)
    seen = []
    out = pipeline(slices[:1], torch.Generator().manual_seed(0), lambda done, total: seen.append((done, total)))
    assert pipeline.unet.calls == evaluations == out.evaluations == SCHEDULES[schedule].evaluations
    assert seen[-1] == (evaluations, evaluations) and len(seen) == evaluations


def test_outside_the_mask_the_input_is_kept_exactly(unet, slices):
    # The untrained model's likelihood map is noise: put tau at its 80th percentile for a partial mask.
    first = make_pipeline(unet, tau=float("inf"))(slices, torch.Generator().manual_seed(0))
    tau = float(torch.quantile(first.likelihood_map.flatten(), 0.8))
    out = make_pipeline(unet, tau=tau)(slices, torch.Generator().manual_seed(0))
    assert torch.equal(out.likelihood_map, first.likelihood_map)
    outside = out.mask == 0
    assert 0 < int(out.mask.sum()) < out.mask.numel(), "the test needs a partial mask"
    assert torch.equal(out.pseudo_healthy[outside], slices[outside])
    assert torch.all(out.anomaly_map[outside] == 0)
    assert torch.equal(out.anomaly_map, (slices - out.pseudo_healthy).abs() * out.likelihood_map)
    assert out.pseudo_healthy.min() >= 0 and out.pseudo_healthy.max() <= 1


def test_mask_is_the_dilated_threshold_of_the_likelihood_map(unet, slices):
    pipeline = make_pipeline(unet, tau=0.05)
    out = pipeline(slices, torch.Generator().manual_seed(0))
    above = out.likelihood_map > 0.05
    assert torch.all(out.mask[above] == 1)
    # Every masked pixel has a pixel above tau in its 3x3 neighbourhood, and no more.
    near = torch.nn.functional.max_pool2d(above.float(), 3, stride=1, padding=1)
    assert torch.equal(out.mask, near)


def test_empty_mask_leaves_the_input_unchanged(unet, slices):
    out = make_pipeline(unet, tau=1e9)(slices, torch.Generator().manual_seed(0))
    assert out.mask.sum() == 0
    assert torch.equal(out.pseudo_healthy, slices)
    assert out.anomaly_map.abs().sum() == 0


def test_likelihood_map_is_normalised_residual_times_lpips(unet, slices):
    pipeline = make_pipeline(unet)
    rec = slices.flip(-1)
    m = pipeline.likelihood_map(slices, rec)
    residual = (slices - rec).abs()
    p95 = torch.quantile(residual.flatten(1), 0.95, dim=1)[:, None, None, None]
    expected = (residual / p95).clamp(0, 1) * pipeline.lpips(slices, rec)
    assert torch.allclose(m, expected)
    assert m.min() >= 0


def test_lpips_at_another_size_comes_back_on_the_slice_grid(unet, slices):
    pipeline = make_pipeline(unet)
    rec = slices.clone()
    rec[:, :, 10:16, 12:18] = 0.3  # the "lesion" removed
    native = pipeline.perceptual_distance(slices, rec)
    pipeline.lpips_size = 32  # the slices' own size: nothing is resized
    assert torch.equal(pipeline.perceptual_distance(slices, rec), native)
    pipeline.lpips_size = 64
    finer = pipeline.perceptual_distance(slices, rec)
    assert finer.shape == slices.shape and finer.min() >= 0
    assert torch.equal(pipeline.perceptual_distance(slices, slices), torch.zeros_like(slices))
    # At twice the pixels AlexNet's features see half the anatomy: the distance concentrates on the
    # lesion, so its share of the map inside the lesion is larger than at the native size.
    lesion = torch.zeros_like(slices, dtype=torch.bool)
    lesion[:, :, 10:16, 12:18] = True
    assert finer[lesion].sum() / finer.sum() > native[lesion].sum() / native.sum()
    # And the likelihood map uses it.
    residual = (slices - rec).abs()
    p95 = torch.quantile(residual.flatten(1), 0.95, dim=1).clamp_min(1e-8)[:, None, None, None]
    assert torch.allclose(pipeline.likelihood_map(slices, rec), (residual / p95).clamp(0, 1) * finer)


def test_same_seed_same_output_bit_for_bit(unet, slices):
    a = make_pipeline(unet)(slices, torch.Generator().manual_seed(5))
    b = make_pipeline(unet)(slices, torch.Generator().manual_seed(5))
    c = make_pipeline(unet)(slices, torch.Generator().manual_seed(6))
    assert torch.equal(a.pseudo_healthy, b.pseudo_healthy) and torch.equal(a.anomaly_map, b.anomaly_map)
    assert not torch.equal(a.reconstruction, c.reconstruction)


def test_a_given_coarse_reconstruction_is_reused(unet, slices):
    # Calibration measures tau on one coarse reconstruction, then re-samples that same one.
    pipeline = make_pipeline(unet)
    first = pipeline(slices, torch.Generator().manual_seed(0))
    pipeline.unet.calls = 0
    again = pipeline(slices, torch.Generator().manual_seed(1), reconstruction=first.reconstruction)
    s = SCHEDULES["fast"]
    assert pipeline.unet.calls == s.resample_steps * s.resample_jumps  # no coarse stage
    assert again.reconstruction is first.reconstruction
    assert torch.equal(again.likelihood_map, first.likelihood_map) and torch.equal(again.mask, first.mask)


def test_fixed_noise_baseline_reconstruction(unet, slices):
    pipeline = make_pipeline(unet)
    rec = pipeline.reconstruct(slices, 100, 4, torch.Generator().manual_seed(0))
    assert pipeline.unet.calls == 4
    assert rec.shape == slices.shape and rec.min() >= 0 and rec.max() <= 1


def test_schedule_evaluation_count():
    assert SamplingSchedule(coarse_steps=8, resample_steps=4, resample_jumps=2).evaluations == 16
