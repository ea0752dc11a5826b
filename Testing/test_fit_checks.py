"""Warnings for inputs a model does not fit: another contrast, other slice levels, skull-stripped scans."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_head_volume

from AutoDDPMLib.detection.inference import AutoDDPM
from AutoDDPMLib.models.bundle import read_card
from AutoDDPMLib.models.fit_checks import constant_background_share, fit_warnings, modality_from_name
from AutoDDPMLib.volumes.head_region import brain_region
from AutoDDPMLib.volumes.slices import intensity_window, normalize


@pytest.mark.parametrize("name, modality", [
    ("TCGA_CS_4941_19960909_flair.nii.gz", "FLAIR"),
    ("sub-01_T2-FLAIR.nrrd", "FLAIR"),  # "T2" too, but a FLAIR is what it is
    ("IXI002-Guys-0828-T1.nii.gz", "T1"),
    ("BraTS_00012_t1ce.nii.gz", "T1c"),
    ("patient 7 MPRAGE", "T1"),
    ("sub-02_T2w.nii.gz", "T2"),
    ("case3_adc", "DWI"),
    ("IXI002.png", None),  # names no contrast
    ("head.nii.gz", None),
    ("t1_and_t2_overlay", None),  # names two: no guess
    ("dt1x", None),  # a contrast's letters inside another word are not a contrast
])
def test_modality_from_name(name, modality):
    assert modality_from_name(name) == modality


def test_other_contrast_warns(tiny_model):
    card = read_card(tiny_model)  # a FLAIR model
    assert fit_warnings(card, "brain_flair.nii.gz", 30) == []
    assert fit_warnings(card, "scan.nii.gz", 30) == []
    (warning,) = fit_warnings(card, "IXI012-HH-1211-T1.nii.gz", 30)
    assert "looks like a T1 image" in warning and "trained on FLAIR" in warning


def test_mid_axial_model_warns_for_volumes(tiny_model_with):
    card = read_card(tiny_model_with("midaxial", modality="T1", slice_levels="mid-axial"))
    assert fit_warnings(card, "IXI002.png", 1) == []
    (warning,) = fit_warnings(card, "IXI002_T1.nii.gz", 36)
    assert "one mid-axial slice" in warning and "35 of the 36 slices" in warning


def test_engine_reports_fit_warnings_with_its_result(tiny_model):
    result = AutoDDPM(tiny_model).process_volume(make_head_volume(), name="subject_T2w.nii.gz")
    assert any("looks like a T2 image" in w for w in result.warnings)
    assert not any("looks like" in w for w in AutoDDPM(tiny_model).process_volume(make_head_volume()).warnings)


def test_cli_prints_the_warning(tiny_model, tmp_path, capsys):
    from AutoDDPMLib.cli import main

    path = tmp_path / "subject_T1w.nii.gz"
    sitk.WriteImage(make_head_volume(), str(path))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--model", str(tiny_model),
                 "--progress", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert any(e["event"] == "warning" and "looks like a T1 image" in e["message"] for e in events)


def head_with_skull(slices: int = 4, size: int = 96, seed: int = 0) -> sitk.Image:
    """A synthetic head as a scanner gives it: noisy air, bright scalp, dark skull, textured brain (1 mm pixels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot((yy - size / 2) / 0.9, xx - size / 2)
    edge = size * 0.42
    profile = np.select([radius < edge - 8, radius < edge - 4, radius < edge], [300.0, 20.0, 450.0], 0.0)
    array = np.stack([profile + 40 * rng.standard_normal(profile.shape) * (profile > 0) for _ in range(slices)])
    array = np.abs(array + 8 * rng.standard_normal(array.shape)).astype(np.float32)  # air: magnitude noise
    return sitk.GetImageFromArray(array)


def stripped(image: sitk.Image, erosion_mm: float = 12.0) -> sitk.Image:
    """``image`` with everything outside the engine's brain region set to 0, as a stripping pipeline leaves it."""
    array = sitk.GetArrayFromImage(image)
    brain = brain_region(normalize(array, intensity_window(array)), image.GetSpacing()[::-1], erosion_mm)
    return sitk.GetImageFromArray(np.where(brain, array, 0).astype(np.float32))


def test_a_skull_stripped_input_warns_where_the_card_does_not_cover_it(tiny_model_with):
    card = read_card(tiny_model_with("with-skull", covers={"skull_stripped": False}))

    def warnings_for(image: sitk.Image, card=card) -> list[str]:
        array = sitk.GetArrayFromImage(image)
        share = constant_background_share(array, normalize(array, intensity_window(array)))
        return fit_warnings(card, "scan.nii.gz", len(array), share)

    with_skull, without = head_with_skull(), stripped(head_with_skull())
    assert constant_background_share(sitk.GetArrayFromImage(with_skull), normalize(
        sitk.GetArrayFromImage(with_skull), intensity_window(sitk.GetArrayFromImage(with_skull)))) < 0.05
    assert warnings_for(with_skull) == []
    (warning,) = warnings_for(without)
    assert "looks skull-stripped" in warning and "does not cover skull-stripped scans" in warning
    covered = read_card(tiny_model_with("stripped-too", covers={"skull_stripped": True}))
    assert warnings_for(without, covered) == [] and warnings_for(without, read_card(tiny_model_with("unrecorded"))) == []


def test_engine_warns_on_a_skull_stripped_input(tiny_model_with):
    model = tiny_model_with("with-skull", covers={"skull_stripped": False})
    result = AutoDDPM(model).process_volume(stripped(head_with_skull()), name="scan.nii.gz")
    assert any("looks skull-stripped" in w for w in result.warnings)


def test_the_bundled_models_say_they_do_not_cover_skull_stripped_scans():
    # Both were trained on scans with skull: a skull-stripped input must get the warning above.
    from AutoDDPMLib.models.bundle import list_bundled_models

    assert {card.name: card.covers for card in list_bundled_models()} == {
        "flair-lgg": {"skull_stripped": False}, "t1-ixi-midaxial": {"skull_stripped": False}}
