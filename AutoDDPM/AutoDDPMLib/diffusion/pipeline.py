"""AutoDDPM on a batch of slices: mask, stitch, re-sample (Bercea et al., 2023).

1. Mask: reconstruct the slice from noise level 200; where the reconstruction
   differs (normalised residual x LPIPS) is likely anomalous.
2. Stitch: keep the input outside that mask, the reconstruction inside it.
3. Re-sample: denoise from level 50 while re-noising the known input at every
   level and jumping back up (RePaint), so inside and outside blend into one
   pseudo-healthy image. What had to change is the anomaly.

Slices are tensors of shape [B, 1, N, N] with intensities in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .lpips import LPIPS
from .polarity import POLARITIES, deviation
from .sampling_schedules import DEFAULT_SCHEDULE, SCHEDULES, SamplingSchedule
from .scheduler import DDPMScheduler, gaussian_noise, strided_levels
from .unet import UNet

# Called after every network evaluation with (evaluations done, evaluations in all).
ProgressCallback = Callable[[int, int], None]


@dataclass
class AutoDDPMOutput:
    """Everything AutoDDPM computes for a batch, each [B, 1, N, N]."""

    pseudo_healthy: torch.Tensor  # x_ph: the input outside the mask, re-sampled inside, in [0, 1]
    anomaly_map: torch.Tensor  # A = |x - x_ph| * M, or only its bright or dark part (see deviation)
    likelihood_map: torch.Tensor  # M = normalised residual x LPIPS, from the coarse reconstruction
    mask: torch.Tensor  # m: dilated M > tau, the region that was re-sampled (float 0/1)
    reconstruction: torch.Tensor  # x_rec: the coarse reconstruction from level 200
    evaluations: int  # network evaluations per slice


# The network as the pipeline calls it: epsilon = unet(x_t, t), t a long tensor [B] on x_t's device.
# A UNet module, or a stand-in with the same call (onnx_backend.OnnxRuntimeUNet).
NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AutoDDPMPipeline:
    """Mask, stitch and re-sample with one trained epsilon-prediction UNet (any ``NoisePredictor``)."""

    def __init__(
        self,
        unet: UNet | NoisePredictor,
        scheduler: DDPMScheduler,
        lpips: LPIPS,
        mask_threshold: float,
        schedule: SamplingSchedule = SCHEDULES[DEFAULT_SCHEDULE],
        lpips_size: int | None = None,
        polarity: str = "both",
    ) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.lpips = lpips
        self.mask_threshold = mask_threshold
        self.schedule = schedule
        self.lpips_size = lpips_size
        if polarity not in POLARITIES:
            raise ValueError(f"unknown polarity '{polarity}': choose one of {', '.join(POLARITIES)}")
        self.polarity = polarity
        self.evaluations_done = 0
        self._progress: Optional[ProgressCallback] = None

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: ProgressCallback | None = None,
        reconstruction: torch.Tensor | None = None,
    ) -> AutoDDPMOutput:
        """All three steps on a batch ``x``; a coarse ``reconstruction`` of ``x`` made before is reused."""
        s = self.schedule
        self.evaluations_done, self._progress = 0, progress
        try:
            # 1. Mask.
            if reconstruction is None:
                reconstruction = self.reconstruct(x, s.coarse_start, s.coarse_steps, generator)
            x_rec = reconstruction
            likelihood = self.likelihood_map(x, x_rec)
            mask = self.binary_mask(likelihood)
            # 2. Stitch and 3. re-sample.
            x_ph = self.stitch_and_resample(x, x_rec, mask, generator)
        finally:
            self._progress = None
        return AutoDDPMOutput(
            pseudo_healthy=x_ph,
            anomaly_map=deviation(x, x_ph, self.polarity) * likelihood,
            likelihood_map=likelihood,
            mask=mask,
            reconstruction=x_rec,
            evaluations=s.evaluations,
        )

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, start: int, steps: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Noise ``x`` to level ``start`` in closed form and denoise it in ``steps`` steps.

        This alone, with a fixed ``start``, is the fixed-noise baseline ("AnoDDPM").
        """
        x_t = self.scheduler.add_noise(x, gaussian_noise(x, generator), start)
        levels = strided_levels(start, steps)
        for t, s in zip(levels[:-1], levels[1:]):
            x_t = self.scheduler.step(self._eps(x_t, t), t, x_t, s, generator, eta=self.schedule.eta)
        return x_t.clamp(0, 1)

    @torch.no_grad()
    def likelihood_map(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """M = clip(|x - x_rec| / P95, 0, 1) * LPIPS(x, x_rec), P95 taken per image."""
        residual = (x - x_rec).abs()
        p95 = torch.quantile(residual.flatten(1), 0.95, dim=1).clamp_min(1e-8)
        normalised = (residual / p95[:, None, None, None]).clamp(0, 1)
        return normalised * self.perceptual_distance(x, x_rec)

    @torch.no_grad()
    def perceptual_distance(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """The LPIPS map L on x's grid, computed with the slices resized to ``lpips_size`` pixels.

        AlexNet's filters and strides are fixed in pixels: on a 64-pixel slice its
        deeper maps are 3 x 3 and see the whole brain at once. Resized to the
        reference's 128 pixels, each feature covers the anatomy it covers there.
        """
        size = x.shape[-1]
        if self.lpips_size is None or self.lpips_size == size:
            return self.lpips(x, x_rec)
        resized = [F.interpolate(image, size=(self.lpips_size, self.lpips_size), mode="bilinear", align_corners=False)
                   for image in (x, x_rec)]
        return F.interpolate(self.lpips(*resized), size=x.shape[-2:], mode="area")

    def binary_mask(self, likelihood: torch.Tensor) -> torch.Tensor:
        """m = dilate(M > tau) with the schedule's square kernel (the paper's 3 x 3): a margin of healthy tissue around each anomaly."""
        k = self.schedule.mask_dilation
        return F.max_pool2d((likelihood > self.mask_threshold).float(), k, stride=1, padding=k // 2)

    @torch.no_grad()
    def stitch_and_resample(
        self, x: torch.Tensor, x_rec: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """RePaint from ``resample_start``: the mask is re-generated, the input outside it is kept."""
        s = self.schedule
        levels = strided_levels(s.resample_start, s.resample_steps, end=0)
        x_t = self.scheduler.add_noise(x_rec, gaussian_noise(x, generator), levels[0])
        for t, t_next in zip(levels[:-1], levels[1:]):
            for jump in range(s.resample_jumps):
                known = self.scheduler.add_noise(x, gaussian_noise(x, generator), t_next)
                unknown = self.scheduler.step(self._eps(x_t, t), t, x_t, t_next, generator, eta=s.eta)
                x_next = mask * unknown + (1 - mask) * known
                if jump < s.resample_jumps - 1:
                    x_t = self.scheduler.renoise(x_next, t_next, t, gaussian_noise(x, generator))
            x_t = x_next
        # Outside the mask the output is the input, exactly.
        return mask * x_t.clamp(0, 1) + (1 - mask) * x

    def _eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        eps = self.unet(x_t, torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long))
        self.evaluations_done += 1
        if self._progress is not None:
            self._progress(self.evaluations_done, self.schedule.evaluations)
        return eps
