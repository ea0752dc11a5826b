"""Training augmentation for what differs between scanners and pipelines: intensities and skull stripping.

A model trained on one archive knows one scanner's contrast and heads with
skull. Other scanners differ in how tissue intensities map to the [0, 1] window
(a different gamma, the window's upper end on other tissue, a smooth receive-coil
bias field), and other pipelines strip the skull. Each augmentation here acts on
a batch of preprocessed [0, 1] slices on the model grid, on the fly in the
training loop, with the trainer's generator (so ``--resume`` draws the same
augmentation as an uninterrupted run would), and keeps the black background
black: after the engine's percentile window, air is 0 on every scanner.

All are off by default; a strength of 0 draws nothing from the generator, so a
run without them trains exactly as before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AutoDDPMError
from ..volumes.head_region import brain_region

# Control points per side of the bias field: a field smooth over a quarter of the head or more, as coil profiles are.
BIAS_FIELD_POINTS = 4


@dataclass(frozen=True)
class AcquisitionAugmentation:
    """How strongly each acquisition difference is simulated; 0 switches it off."""

    gamma: float = 0.0  # x ** exp(U(-gamma, gamma)) per slice
    contrast: float = 0.0  # x * exp(U(-contrast, contrast)) per slice, clipped at 1 (the window's upper end moved)
    bias_field: float = 0.0  # x * exp(a * f): f a smooth field in [-1, 1], a ~ U(0, bias_field) per slice
    skull_strip: float = 0.0  # probability that a slice is set to 0 outside its brain region
    strip_erosion_mm: float = 12.0  # the brain region's in-plane erosion of the head (flair-lgg's post-processing)
    field_of_view_mm: float = 256.0  # the model grid's side in mm (LGG: 256 pixels of 1 mm), to erode in mm

    def __post_init__(self) -> None:
        for name in ("gamma", "contrast", "bias_field", "strip_erosion_mm"):
            if not getattr(self, name) >= 0:
                raise AutoDDPMError(f"augmentation {name.replace('_', '-')} must be >= 0, not {getattr(self, name)}")
        if not 0 <= self.skull_strip <= 1:
            raise AutoDDPMError(f"the skull-strip augmentation is a probability in [0, 1], not {self.skull_strip}")
        if not self.field_of_view_mm > 0:
            raise AutoDDPMError(f"the field of view must be > 0 mm, not {self.field_of_view_mm}")

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(batch: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, generator=generator)


def random_gamma(x: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Each slice raised to its own gamma in [exp(-strength), exp(strength)]: 0 and 1 stay, mid-tones move."""
    gamma = torch.exp(_uniform(len(x), -strength, strength, generator)).to(x.device)
    return x.clamp(0, 1).pow(gamma.view(-1, 1, 1, 1))


def random_contrast(x: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Each slice's intensities scaled by its own factor in [exp(-strength), exp(strength)], clipped at 1:
    where a scanner's brightest tissue lands in the percentile window (brightness and contrast against air)."""
    scale = torch.exp(_uniform(len(x), -strength, strength, generator)).to(x.device)
    return (x * scale.view(-1, 1, 1, 1)).clamp(0, 1)


def smooth_field(batch: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """[batch, 1, H, W] smooth random fields, each scaled to a maximum |value| of 1."""
    points = torch.rand(batch, 1, BIAS_FIELD_POINTS, BIAS_FIELD_POINTS, generator=generator) * 2 - 1
    field = F.interpolate(points, size=size, mode="bicubic", align_corners=True)
    return field / field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def random_bias_field(x: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Each slice times exp(a * f), f a smooth field in [-1, 1] and a in [0, strength]: a coil's bias field."""
    amplitude = _uniform(len(x), 0, strength, generator).view(-1, 1, 1, 1)
    field = torch.exp(amplitude * smooth_field(len(x), tuple(x.shape[-2:]), generator))
    return (x * field.to(x.device)).clamp(0, 1)


def random_skull_strip(x: torch.Tensor, brains: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """With ``probability`` per slice, the slice set to 0 outside its brain region (``brains``, bool like ``x``)."""
    chosen = (torch.rand(len(x), generator=generator) < probability).to(x.device).view(-1, 1, 1, 1)
    return torch.where(chosen & ~brains, torch.zeros_like(x), x)


def strip_regions(slices: torch.Tensor, settings: AcquisitionAugmentation) -> torch.Tensor:
    """The brain region of each training slice [N, 1, S, S] (bool, same shape), as the engine's post-processing
    computes it, on a grid of ``field_of_view_mm``."""
    pixel_mm = settings.field_of_view_mm / slices.shape[-1]
    brains = brain_region(slices[:, 0].cpu().numpy(), (1.0, pixel_mm, pixel_mm), settings.strip_erosion_mm)
    return torch.from_numpy(np.ascontiguousarray(brains))[:, None]


def augment_acquisition(x: torch.Tensor, brains: torch.Tensor | None, generator: torch.Generator,
                        settings: AcquisitionAugmentation) -> torch.Tensor:
    """The acquisition augmentation of a batch: the skull stripped first (a pipeline strips what a scanner
    made), then the bias field, gamma and contrast. ``brains``: the batch's strip regions (with skull_strip)."""
    if settings.skull_strip:
        x = random_skull_strip(x, brains, generator, settings.skull_strip)
    if settings.bias_field:
        x = random_bias_field(x, generator, settings.bias_field)
    if settings.gamma:
        x = random_gamma(x, generator, settings.gamma)
    if settings.contrast:
        x = random_contrast(x, generator, settings.contrast)
    return x
