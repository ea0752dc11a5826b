"""Training augmentation for other scanners and skull-stripped inputs: each transform on its own, and in a run."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_cli import _healthy_cohort

from AutoDDPMLib.cli import main
from AutoDDPMLib.errors import AutoDDPMError
from AutoDDPMLib.training.acquisition_augmentation import (
    AcquisitionAugmentation,
    augment_acquisition,
    random_bias_field,
    random_contrast,
    random_gamma,
    random_skull_strip,
    strip_regions,
)
from AutoDDPMLib.volumes.head_region import brain_region


def heads(count: int = 6, size: int = 32) -> torch.Tensor:
    """[count, 1, size, size] ellipses of textured tissue on black air, in [0, 1]."""
    generator = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    head = ((yy - size / 2) / (size * 0.4)) ** 2 + ((xx - size / 2) / (size * 0.35)) ** 2 < 1
    tissue = 0.3 + 0.6 * torch.rand(count, 1, size, size, generator=generator)
    return torch.where(head, tissue, torch.zeros(()))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("transform", [
    lambda x, g: random_gamma(x, g, 0.4),
    lambda x, g: random_contrast(x, g, 0.3),
    lambda x, g: random_bias_field(x, g, 0.4),
    lambda x, g: random_skull_strip(x, strip_regions(x, AcquisitionAugmentation()), g, 0.5),
])
def test_each_transform_keeps_shape_range_and_black_air_and_repeats_under_a_seed(transform):
    x = heads()
    out = transform(x, seeded())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out[x == 0] == 0).all()  # air stays black, as the percentile window leaves it on any scanner
    assert not torch.equal(out, x)
    assert torch.equal(out, transform(x, seeded()))
    assert not torch.equal(out, transform(x, seeded(1)))


def test_skull_strip_zeroes_exactly_outside_the_brain_region():
    x = heads()
    settings = AcquisitionAugmentation(skull_strip=1.0)
    brains = strip_regions(x, settings)
    # The engine's region on the model grid: the head eroded by 12 mm of a 256 mm field of view (8 mm pixels here).
    expected = torch.from_numpy(brain_region(x[:, 0].numpy(), (1.0, 8.0, 8.0), 12.0))[:, None]
    assert torch.equal(brains, expected) and 0 < brains.sum() < (x > 0).sum()
    out = random_skull_strip(x, brains, seeded(), 1.0)
    assert (out[~brains] == 0).all() and torch.equal(out[brains], x[brains])
    none = random_skull_strip(x, brains, seeded(), 0.0)
    assert torch.equal(none, x)


def test_bias_field_is_smooth_and_within_its_strength():
    x = torch.full((4, 1, 32, 32), 0.5)
    out = random_bias_field(x, seeded(), 0.3)
    ratio = out / x
    assert ratio.min() >= torch.exp(torch.tensor(-0.3)) - 1e-6 and ratio.max() <= torch.exp(torch.tensor(0.3)) + 1e-6
    # Smooth: between neighbouring pixels it changes by less than an eighth of its whole range (0.74 to 1.35).
    assert ratio.diff(dim=-1).abs().max() < 0.6 / 8


def test_no_augmentation_draws_nothing_so_runs_without_it_train_as_before():
    generator = seeded()
    state = generator.get_state()
    x = heads()
    assert torch.equal(augment_acquisition(x, None, generator, AcquisitionAugmentation()), x)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("settings", [dict(gamma=-0.1), dict(skull_strip=1.5), dict(field_of_view_mm=0.0)])
def test_bad_settings_are_refused(settings):
    with pytest.raises(AutoDDPMError):
        AcquisitionAugmentation(**settings)


def test_train_with_augmentation_records_it_and_resumes_the_same_way(tmp_path):
    data = _healthy_cohort(tmp_path / "train")
    bundle = tmp_path / "bundle"
    assert main(["train", "--data", str(data), "--output", str(bundle), "--image-size", "32", "--channels", "8", "16",
                 "--batch-size", "4", "--checkpoint-minutes", "0", "--steps", "2", "--augment-gamma", "0.3",
                 "--augment-contrast", "0.15", "--augment-bias-field", "0.3", "--augment-skull-strip", "0.5"]) == 0
    card = json.loads((bundle / "model.json").read_text())
    assert card["training"]["config"]["augmentation"] == {
        "gamma": 0.3, "contrast": 0.15, "bias_field": 0.3, "skull_strip": 0.5,
        "strip_erosion_mm": 12.0, "field_of_view_mm": 256.0}
    assert card["covers"] == {"skull_stripped": True}
    # Resumed twice from the same checkpoint: the same augmentation is drawn, the same weights come out.
    again = tmp_path / "again"
    shutil.copytree(bundle, again)
    for folder in (bundle, again):
        assert main(["train", "--output", str(folder), "--resume", "--steps", "4"]) == 0
    weights = [load_file(str(folder / "checkpoint" / "state.safetensors")) for folder in (bundle, again)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    state = json.loads((bundle / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["config"]["augmentation"]["skull_strip"] == 0.5


def test_covers_can_be_stated_for_data_without_augmentation(tmp_path):
    data = _healthy_cohort(tmp_path / "train")
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "b"), "--image-size", "32", "--channels", "8",
                 "16", "--batch-size", "4", "--steps", "1", "--covers-skull-stripped", "no"]) == 0
    card = json.loads((tmp_path / "b" / "model.json").read_text())
    assert card["covers"] == {"skull_stripped": False} and card["training"]["config"]["augmentation"]["gamma"] == 0.0
    assert main(["train", "--output", str(tmp_path / "b"), "--resume", "--steps", "2", "--checkpoint-minutes", "0",
                 "--covers-skull-stripped", "yes"]) == 0
    # Like slice_levels, corrected on resume: the next card written says it.
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["config"]["covers_skull_stripped"] is True
