"""Shared fixtures: a tiny but real model bundle, and small synthetic volumes.

The tiny model is an untrained UNet of the real architecture written as a real
bundle (safetensors + card): every code path runs for real, in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

# The test models are tiny: one thread is as fast as two, and it keeps the
# suite from fighting a training job (or the CLI subprocesses) for the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from AutoDDPMLib.diffusion.unet import UNet, UNetConfig  # noqa: E402
from AutoDDPMLib.models.bundle import new_card, save_unet, write_card  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32x32 model bundle with a few thousand parameters, seeded, uncalibrated thresholds."""
    torch.manual_seed(0)
    config = UNetConfig(image_size=32, channels=(8, 16), attention_levels=(False, True))
    network = UNet(config)
    # Zero-initialised output layers would predict no noise at all; small random
    # weights make the reverse process do real work.
    for parameter in network.parameters():
        parameter.data.add_(0.01 * torch.randn_like(parameter))
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_unet(network, folder)
    card = new_card("tiny", "FLAIR", config, description="untrained test model")
    card["thresholds"].update(mask_tau=0.05, anomaly=0.05)
    write_card(folder, card)
    return folder


@pytest.fixture
def tiny_model_with(tiny_model: Path, tmp_path: Path) -> Callable[..., Path]:
    """A copy of the tiny model whose card has the given top-level fields replaced, e.g. modality="T1"."""

    def copy(name: str, **card_changes: Any) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_model, folder)
        card = json.loads((folder / "model.json").read_text())
        card.update(card_changes)
        (folder / "model.json").write_text(json.dumps(card))
        return folder

    return copy


def make_head_volume(shape=(6, 40, 48), spacing=(1.0, 1.0, 2.0), lesion: bool = True, seed: int = 0) -> sitk.Image:
    """A synthetic 'head': an ellipse of tissue with texture, and optionally a bright blob."""
    rng = np.random.default_rng(seed)
    slices, rows, cols = shape
    yy, xx = np.mgrid[:rows, :cols]
    head = ((yy - rows / 2) / (rows * 0.42)) ** 2 + ((xx - cols / 2) / (cols * 0.42)) ** 2 < 1
    array = np.zeros(shape, np.float32)
    for z in range(slices):
        array[z][head] = 300 + 40 * rng.standard_normal(head.sum())
    if lesion:
        blob = (yy - rows * 0.4) ** 2 + (xx - cols * 0.55) ** 2 < (rows * 0.12) ** 2
        array[slices // 2][blob] = 900
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


@pytest.fixture()
def head_volume(tmp_path: Path) -> Path:
    path = tmp_path / "head.nii.gz"
    sitk.WriteImage(make_head_volume(), str(path))
    return path


def run_cli_without_simpleitk(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``autoddpm ARGS`` in a process where SimpleITK cannot be imported: a GPU node without the data stack."""
    code = "import sys; sys.modules['SimpleITK'] = None; from AutoDDPMLib.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "--threads", "1", *args], capture_output=True, text=True, encoding="utf-8", timeout=timeout)
