"""Brain extraction with deepbet's networks (Fisch et al., 2024; MIT licence), run by this engine.

The weights-free brain region (volumes.head_region: the head eroded by a fixed
distance) keeps orbits, sinuses and scalp at the skull base and cuts into the
brain where the skull is thin. deepbet's two 3D LinkNets, trained on T1, follow
the brain's outline on these FLAIRs too, and the post-processed map found more
tumour with them on the development patients (docs/RESEARCH_LOG.md).

The networks come from the deepbet wheel: ``pip install --no-deps deepbet==1.0.2``
installs its two TorchScript archives (8.7 MB each) and nothing else it would
pull in (pandas, nibabel, cc3d, fill_voids, a GUI toolkit), because this file
runs them itself. It finds them through the package's metadata without importing
deepbet, checks their SHA-256 against the digests below, and loads them with
``torch.jit.load``: TorchScript's own unpickler builds tensors and TorchScript
types only, never arbitrary Python objects. No network access is needed.

The steps are deepbet 1.0.2's ``BrainExtraction.run_model`` and ``postprocess``,
on the volume in RAS+ voxel order as deepbet reads it (nibabel's closest
canonical orientation): the bounding-box network on the volume resized to 128^3,
the largest connected part of its mask boxed with a 10% margin, the box resized
to 256^3 for the segmentation network and back, thresholded at 0.5, then the
largest connected part with its holes filled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import AutoDDPMError

DEEPBET_VERSION = "1.0.2"
INSTALL_HINT = f'pip install --no-deps "deepbet=={DEEPBET_VERSION}"'
# The archives inside deepbet's wheel, and the SHA-256 of the ones this engine was checked with.
DEEPBET_NETWORKS = {
    "bbox_model": ("data/models/bbox_model.pt", "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa"),
    "model": ("data/models/model.pt", "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd"),
}
BBOX_SHAPE = (128, 128, 128)
SEGMENTATION_SHAPE = (256, 256, 256)
BBOX_MARGIN = 0.1  # of the box's size, on each side
INTENSITY_QUANTILES = (0.005, 0.995)
THRESHOLD = 0.5


def deepbet_available() -> bool:
    """Whether deepbet's wheel is installed (its networks may still fail the digest check)."""
    try:
        importlib.metadata.distribution("deepbet")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def deepbet_network_files() -> dict[str, Path]:
    """The two TorchScript archives of the installed deepbet wheel, checked against their digests."""
    try:
        distribution = importlib.metadata.distribution("deepbet")
    except importlib.metadata.PackageNotFoundError:
        raise AutoDDPMError(f"the deepbet brain region needs deepbet's networks: {INSTALL_HINT}") from None
    files = {}
    for name, (relative, digest) in DEEPBET_NETWORKS.items():
        path = Path(distribution.locate_file(relative))
        if not path.is_file():
            raise AutoDDPMError(f"deepbet {distribution.version} has no {relative}; reinstall it: {INSTALL_HINT}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise AutoDDPMError(f"{path} is not the network of deepbet {DEEPBET_VERSION} this engine was checked "
                                f"with (deepbet {distribution.version} is installed): {INSTALL_HINT}")
        files[name] = path
    return files


class DeepbetBrainExtractor:
    """deepbet's brain mask of a volume given as an AxialStack array ([slices, rows, columns], identity direction)."""

    def __init__(self, device: str = "cpu") -> None:
        import torch

        files = deepbet_network_files()
        self.device = torch.device(device)
        with warnings.catch_warnings():
            # torch 2.10+ deprecates TorchScript for new work; deepbet ships its networks in it.
            warnings.simplefilter("ignore", DeprecationWarning)
            self.bbox_model = torch.jit.load(str(files["bbox_model"]), map_location=self.device).eval()
            self.model = torch.jit.load(str(files["model"]), map_location=self.device).eval()

    def __call__(self, stack_array: np.ndarray) -> np.ndarray:
        """The brain (bool, same shape and voxel order as ``stack_array``)."""
        # The stack's axes are (S, P, L)-wards; deepbet reads (R, A, S)-wards.
        ras = np.ascontiguousarray(stack_array[:, ::-1, ::-1].transpose(2, 1, 0), dtype=np.float32)
        brain = self.extract_ras(ras)
        return np.ascontiguousarray(brain.transpose(2, 1, 0)[:, ::-1, ::-1])

    def extract_ras(self, volume: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            x = torch.nan_to_num(torch.from_numpy(volume).to(self.device))
            small = F.interpolate(x[None, None], BBOX_SHAPE, mode="nearest-exact")[0, 0]
            low, high = small.quantile(INTENSITY_QUANTILES[0]), small.quantile(INTENSITY_QUANTILES[1])
            coarse = self.bbox_model(_standardize(small, low, high)[None, None])[0, 1] > THRESHOLD
            coarse = _largest_component(coarse.cpu().numpy())
            if not coarse.any():
                raise AutoDDPMError("deepbet found no brain in this volume; check that it is a head MRI, or use "
                                    "the head region (--brain-region head)")
            box = _box_with_margin(coarse, volume.shape)
            fine = F.interpolate(x[box][None, None], SEGMENTATION_SHAPE, mode="nearest-exact")
            probability = self.model(_standardize(fine[0, 0], low, high)[None, None])[0, 1]
            in_box = F.interpolate(probability[None, None], x[box].shape, mode="nearest-exact")[0, 0]
        brain = np.zeros(volume.shape, dtype=bool)
        region = _largest_component(in_box.cpu().numpy() > THRESHOLD)
        brain[box] = ndimage.binary_fill_holes(region)
        return brain


@lru_cache(maxsize=2)
def deepbet_extractor(device: str = "cpu") -> DeepbetBrainExtractor:
    """One loaded extractor per device, for every volume of a run."""
    return DeepbetBrainExtractor(device)


def _standardize(x, low, high):
    """deepbet's intensity normalisation: the quantile window to [0, 1], then ImageNet-like mean and spread."""
    x = ((x - low) / (high - low)).clamp(min=0, max=1)
    return 0.226 * (x - x.mean()) / x.std() + 0.449


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected part of ``mask`` (empty stays empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return labels > 0
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def _box_with_margin(mask: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The box of ``mask`` (on the 128^3 grid) scaled to ``shape`` and widened by BBOX_MARGIN on each side.

    As deepbet: an index counts when over 2% of its plane is in the mask.
    """
    box = []
    for axis, size in enumerate(shape):
        others = tuple(a for a in range(3) if a != axis)
        used = np.nonzero(mask.astype(np.float32).mean(axis=others) > 0.02)[0]
        if not len(used):
            raise AutoDDPMError("deepbet found too little brain in this volume to box it; check that it is a head "
                                "MRI, or use the head region (--brain-region head)")
        # In float32 as deepbet computes it, so that the box lands on the same voxels.
        scale = np.float32(size) / np.float32(mask.shape[axis])
        center = np.round(scale * np.float32((used.max() + 1 + used.min()) / 2))
        extent = np.round(np.float32(1 + 2 * np.float32(BBOX_MARGIN)) * (scale * np.float32(used.max() + 1 - used.min())))
        box.append(slice(max(0, int(center - extent / 2)), min(size, int(center + extent / 2))))
    return tuple(box)
