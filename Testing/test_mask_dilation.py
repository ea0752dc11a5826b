"""The dilation of step 1's mask: a card setting, calibrated with the thresholds it changes."""

import json
import shutil

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


def test_calibrate_can_set_the_mask_dilation(model_and_healthy_volume, capsys):
    model, data = model_and_healthy_volume
    assert AutoDDPM(model).pipeline.mask_dilation == 3  # a card without the field: the paper's 3 x 3
    before = (model / "model.json").read_text()
    assert main(["calibrate", str(model), "--data", str(data), "--mask-dilation", "4"]) == 2
    assert "--mask-dilation must be an odd number of pixels" in capsys.readouterr().err
    assert (model / "model.json").read_text() == before

    for schedule in ("fast", "reference"):
        assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "3", "--schedule", schedule]) == 0
    paper = read_card(model).thresholds_for("fast")
    assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "3", "--mask-dilation", "7"]) == 0
    card = read_card(model)
    assert card.mask_dilation == 7 and card.data["thresholds"]["calibration"]["mask_dilation"] == 7
    # tau is measured before the dilation, the anomaly threshold after it.
    assert card.thresholds_for("fast")[2] and card.thresholds_for("fast")[0] == paper[0]
    assert card.thresholds_for("fast")[1] != paper[1]
    # The reference schedule's thresholds were measured with the 3-pixel dilation: no longer what its card promises.
    assert not card.thresholds_for("reference")[2]
    assert AutoDDPM(model, schedule="reference").threshold_warning is not None
    assert AutoDDPM(model).pipeline.mask_dilation == 7  # what `autoddpm run` now does


def test_a_dilation_the_thresholds_were_not_calibrated_with_is_not_trusted(model_and_healthy_volume):
    model, data = model_and_healthy_volume
    card = json.loads((model / "model.json").read_text())
    card["postprocessing"] = {"polarity": "bright", "median_mm": 3.0}
    (model / "model.json").write_text(json.dumps(card))
    assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "3"]) == 0
    calibrated = read_card(model)
    assert calibrated.thresholds_for("fast")[2] and calibrated.postprocessed_threshold("fast") is not None

    card = json.loads((model / "model.json").read_text())
    card["mask_dilation"] = 5  # changed by hand, not calibrated
    (model / "model.json").write_text(json.dumps(card))
    changed = read_card(model)
    assert not changed.thresholds_for("fast")[2] and changed.postprocessed_threshold("fast") is None

    card["mask_dilation"] = 2
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(AutoDDPMError, match="mask_dilation should be an odd number of pixels"):
        read_card(model)
