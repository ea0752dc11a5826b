"""The DDPM noise schedule: forward noising in closed form and reverse steps.

Timesteps are 0-indexed as in the reference: ``alphas_cumprod[t]`` is the
signal fraction after noise level ``t`` (t = 0 .. T-1), and level ``-1`` means
the clean image (alpha_bar = 1). A reverse step goes from level ``t`` to any
lower level ``s``; with ``s = t - 1`` and ``eta = 1`` it is exactly the
ancestral DDPM step with the fixed-small posterior variance, with ``s < t - 1``
it is the strided (DDIM, eta = 1) step that has the same marginals with fewer
network evaluations.
"""

from __future__ import annotations

import numpy as np
import torch


class DDPMScheduler:
    """Linear-beta DDPM schedule (T = 1000, betas 1e-4 .. 2e-2 by default)."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> None:
        self.num_train_timesteps = num_train_timesteps
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
        self.betas = torch.from_numpy(betas)
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))

    def alpha_bar(self, t: int) -> float:
        """Signal fraction at level ``t``; level -1 is the clean image."""
        if t < -1 or t >= self.num_train_timesteps:
            raise ValueError(f"timestep {t} outside -1 .. {self.num_train_timesteps - 1}")
        return 1.0 if t == -1 else float(self.alphas_cumprod[t])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I), one level per batch item or a shared one."""
        # Index on the CPU in float64, then cast: Apple MPS has no float64.
        ab = self.alphas_cumprod[torch.as_tensor(t).cpu()].to(x0.dtype).to(x0.device)
        ab = ab.reshape(-1, *([1] * (x0.ndim - 1))) if ab.ndim else ab
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def renoise(self, x_s: torch.Tensor, s: int, t: int, noise: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_s) for t > s: forward from level s up to level t (RePaint's jump back)."""
        ratio = self.alpha_bar(t) / self.alpha_bar(s)
        return ratio**0.5 * x_s + (1 - ratio) ** 0.5 * noise

    def step(
        self,
        eps: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        s: int,
        generator: torch.Generator | None = None,
        eta: float = 1.0,
        clip: tuple[float, float] = (-1.0, 1.0),
    ) -> torch.Tensor:
        """One reverse step from level ``t`` to level ``s < t`` given the predicted noise.

        The predicted clean image is clipped to ``clip`` (the reference clips to
        [-1, 1] although its images live in [0, 1]; the final clamp to [0, 1]
        happens in the pipeline).
        """
        if not -1 <= s < t:
            raise ValueError(f"a reverse step needs -1 <= s < t, got t={t}, s={s}")
        ab_t, ab_s = self.alpha_bar(t), self.alpha_bar(s)
        x0 = ((x_t - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5).clamp(*clip)
        # Re-derive the noise from the clipped x0 so that both terms agree.
        eps = (x_t - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
        sigma = eta * ((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)) ** 0.5
        x_s = ab_s**0.5 * x0 + max(1 - ab_s - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x_s = x_s + sigma * gaussian_noise(x_t, generator)
        return x_s


def gaussian_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on the CPU then moved.

    Drawing on the CPU makes a seed give the same noise on every device, so a
    seeded run is reproducible bit for bit on the CPU and comparable on a GPU.
    """
    return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def strided_levels(start: int, num_steps: int, end: int = -1) -> list[int]:
    """``num_steps + 1`` noise levels from ``start`` down to ``end``, evenly spaced.

    ``strided_levels(200, 201)`` is the full ancestral chain 200, 199, .., 0, -1;
    ``strided_levels(50, 5, end=0)`` is 50, 40, 30, 20, 10, 0.
    """
    if num_steps < 1 or num_steps > start - end:
        raise ValueError(f"cannot take {num_steps} steps from level {start} down to {end}")
    levels = np.round(np.linspace(start, end, num_steps + 1)).astype(int).tolist()
    if len(set(levels)) != len(levels):
        raise ValueError(f"{num_steps} steps from {start} to {end} give repeated levels")
    return levels
