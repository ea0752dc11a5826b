"""The noise schedule against the closed-form DDPM maths."""

import math

import pytest
import torch

from AutoDDPMLib.diffusion.scheduler import DDPMScheduler, strided_levels


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler()


def test_reference_values(scheduler):
    # ALGORITHM.md: timesteps are 0-indexed; alpha_bar[200] = 0.656, alpha_bar[50] = 0.970.
    assert scheduler.alpha_bar(200) == pytest.approx(0.656, abs=5e-4)
    assert scheduler.alpha_bar(50) == pytest.approx(0.970, abs=5e-4)
    assert math.sqrt(1 - scheduler.alpha_bar(200)) == pytest.approx(0.586, abs=5e-4)
    assert scheduler.alpha_bar(-1) == 1.0
    assert float(scheduler.betas[0]) == pytest.approx(1e-4)
    assert float(scheduler.betas[-1]) == pytest.approx(2e-2)


def test_closed_form_equals_chained_single_steps(scheduler):
    """q(x_t | x_0) in closed form has the mean and variance of t+1 chained single steps."""
    x0 = torch.linspace(0, 1, 16, dtype=torch.float64)
    mean, var = x0.clone(), torch.zeros_like(x0)
    for t in range(0, 201):
        beta = float(scheduler.betas[t])
        mean, var = math.sqrt(1 - beta) * mean, (1 - beta) * var + beta
    zero = torch.zeros_like(x0)
    assert torch.allclose(scheduler.add_noise(x0, zero, 200).double(), mean, atol=1e-6)
    assert torch.allclose(scheduler.add_noise(zero, torch.ones_like(x0), 200).double() ** 2, var, atol=1e-6)


def test_renoise_composes_with_add_noise(scheduler):
    """Jumping from level s to t with q(x_t | x_s) gives the closed-form marginal at t."""
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x_s = scheduler.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), 40)
    x_t = scheduler.renoise(x_s, 40, 50, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    ab = scheduler.alpha_bar(50)
    assert float(x_t.mean()) == pytest.approx(math.sqrt(ab) * 0.7, abs=3e-3)
    assert float(x_t.var()) == pytest.approx(1 - ab, rel=2e-2)


def test_single_step_is_the_ddpm_posterior(scheduler):
    """With s = t - 1 and eta = 1 the step is the posterior q(x_{t-1} | x_t, x0) with fixed-small variance."""
    t = 120
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 0.5
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = scheduler.add_noise(x0, eps, t)
    beta, ab_t, ab_prev = float(scheduler.betas[t]), scheduler.alpha_bar(t), scheduler.alpha_bar(t - 1)
    mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x_t
    std = math.sqrt((1 - ab_prev) / (1 - ab_t) * beta)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x_prev = scheduler.step(eps, t, x_t, t - 1, torch.Generator().manual_seed(7))
    assert torch.allclose(x_prev, mean + std * z, atol=1e-10)


def test_last_step_returns_the_predicted_clean_image(scheduler):
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x_t = scheduler.add_noise(x0, eps, 0)
    assert torch.allclose(scheduler.step(eps, 0, x_t, -1), x0, atol=1e-10)


def test_strided_step_with_exact_noise_recovers_x0_deterministically(scheduler):
    """eta = 0 (DDIM) from level 200 straight to the clean image, given the true noise, is exact."""
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 0.9
    eps = torch.randn_like(x0)
    x_t = scheduler.add_noise(x0, eps, 200)
    assert torch.allclose(scheduler.step(eps, 200, x_t, -1, eta=0.0), x0, atol=1e-10)


def test_predicted_x0_is_clipped(scheduler):
    x_t = torch.full((1, 1, 4, 4), 50.0, dtype=torch.float64)
    out = scheduler.step(torch.zeros_like(x_t), 0, x_t, -1)
    assert float(out.max()) == pytest.approx(1.0)


def test_strided_levels():
    assert strided_levels(200, 201) == list(range(200, -2, -1))
    assert strided_levels(50, 5, end=0) == [50, 40, 30, 20, 10, 0]
    assert strided_levels(200, 10)[0] == 200 and strided_levels(200, 10)[-1] == -1
    assert len(strided_levels(200, 10)) == 11
    with pytest.raises(ValueError):
        strided_levels(10, 20)
    with pytest.raises(ValueError):
        DDPMScheduler().step(torch.zeros(1), 10, torch.zeros(1), 10)
