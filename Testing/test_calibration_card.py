"""What `autoddpm calibrate` writes into a model card beside the thresholds: the settings they were measured with."""

import json
import shutil
import sys

import pytest
import SimpleITK as sitk
from conftest import make_head_volume

from AutoDDPMLib.cli import main
from AutoDDPMLib.detection.inference import AutoDDPM
from AutoDDPMLib.errors import AutoDDPMError
from AutoDDPMLib.models.bundle import read_card


@pytest.fixture
def model_and_healthy_volume(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    data = tmp_path / "healthy"
    data.mkdir()
    sitk.WriteImage(make_head_volume(lesion=False), str(data / "h0_flair.nii.gz"))
    return model, data


def test_calibrate_can_set_a_schedules_mask_dilation(model_and_healthy_volume, capsys):
    model, data = model_and_healthy_volume
    assert AutoDDPM(model).pipeline.schedule.mask_dilation == 3  # a card without it: the paper's 3 x 3
    before = (model / "model.json").read_text()
    assert main(["calibrate", str(model), "--data", str(data), "--mask-dilation", "4"]) == 2
    assert "--mask-dilation must be an odd number of pixels" in capsys.readouterr().err
    assert (model / "model.json").read_text() == before

    for schedule in ("fast", "reference"):
        assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "3", "--schedule", schedule]) == 0
    paper = read_card(model).thresholds_for("fast")
    reference = read_card(model).thresholds_for("reference")
    assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "3", "--mask-dilation", "7"]) == 0
    card = read_card(model)
    assert card.schedule("fast").mask_dilation == 7
    # tau is measured before the dilation, the anomaly threshold after it.
    assert card.thresholds_for("fast")[2] and card.thresholds_for("fast")[0] == paper[0]
    assert card.thresholds_for("fast")[1] != paper[1]
    # The reference schedule keeps the paper's dilation and the thresholds calibrated with it.
    assert card.schedule("reference").mask_dilation == 3 and card.thresholds_for("reference") == reference
    assert AutoDDPM(model).pipeline.schedule.mask_dilation == 7  # what `autoddpm run` now does
    assert AutoDDPM(model, schedule="reference").pipeline.schedule.mask_dilation == 3


def test_a_card_with_an_even_dilation_is_refused(model_and_healthy_volume):
    model, _ = model_and_healthy_volume
    card = json.loads((model / "model.json").read_text())
    card["schedules"] = {"fast": dict(card["schedules"].get("fast", {}), mask_dilation=2)}
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(AutoDDPMError, match="invalid 'fast' schedule .*mask_dilation must be an odd number"):
        AutoDDPM(model)


def test_a_card_that_leaves_a_post_processing_step_out_finds_its_calibrated_threshold(model_and_healthy_volume):
    model, data = model_and_healthy_volume
    card = json.loads((model / "model.json").read_text())
    card["postprocessing"] = {"polarity": "bright", "median_mm": 3.0}
    (model / "model.json").write_text(json.dumps(card))
    assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "3"]) == 0
    calibrated = read_card(model)
    threshold = calibrated.postprocessed_threshold("fast")
    assert threshold is not None and AutoDDPM(model).threshold == threshold


def test_the_card_records_the_calibration_command(model_and_healthy_volume, monkeypatch):
    model, data = model_and_healthy_volume
    argv = ["calibrate", str(model), "--data", str(data), "--max-slices", "3"]
    monkeypatch.setattr(sys, "argv", ["autoddpm", *argv])
    assert main(argv) == 0
    assert read_card(model).data["thresholds"]["calibration"]["command"] == "autoddpm " + " ".join(argv)
