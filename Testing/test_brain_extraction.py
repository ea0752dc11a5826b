"""deepbet's brain region: found in the installed wheel and checked, run by the engine as deepbet runs it, and used
by `autoddpm run/calibrate --postprocess deepbet` with its own calibrated threshold."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoDDPMLib.benchmark.validation_record import record_volume_validation
from AutoDDPMLib.cli import main
from AutoDDPMLib.detection.inference import AutoDDPM
from AutoDDPMLib.detection.postprocessing import option_settings
from AutoDDPMLib.errors import AutoDDPMError
from AutoDDPMLib.models.bundle import read_card
from AutoDDPMLib.models.validation import validation_headline
from AutoDDPMLib.resources import resources_dir
from AutoDDPMLib.volumes.brain_extraction import DEEPBET_NETWORKS, deepbet_available, deepbet_extractor, deepbet_network_files
from AutoDDPMLib.volumes.slices import AxialStack

SAMPLE = resources_dir() / "SampleData" / "TCGA_LGG_FLAIR.nii.gz"
SAMPLE_MASK = resources_dir() / "SampleData" / "TCGA_LGG_FLAIR_mask.nii.gz"
needs_deepbet = pytest.mark.skipif(not deepbet_available(), reason='needs deepbet\'s networks: pip install --no-deps "deepbet==1.0.2"')
FLAIR_LIKE = {"polarity": "bright", "brain_erosion_mm": 2.0, "median_mm": 3.0, "min_component_mm3": 20.0}


def sample_stack() -> AxialStack:
    return AxialStack.from_image(sitk.ReadImage(str(SAMPLE)))


def test_without_deepbet_the_region_says_how_to_install_it(monkeypatch, tiny_model_with) -> None:
    model = tiny_model_with("pp", postprocessing=FLAIR_LIKE)
    monkeypatch.setattr(sys, "path", [])  # no installed distribution can be found
    with pytest.raises(AutoDDPMError, match=r'needs deepbet\'s networks: pip install --no-deps "deepbet==1.0.2"'):
        deepbet_network_files()
    # The engine refuses before it loads the network, and the card's own region needs nothing.
    with pytest.raises(AutoDDPMError, match="pip install --no-deps"):
        AutoDDPM(model, device="cpu", backend="torch", postprocess="deepbet")
    assert AutoDDPM(model, device="cpu", backend="torch").postprocessing.brain_region == "head"


def test_networks_other_than_the_checked_ones_are_refused(monkeypatch, tmp_path) -> None:
    site = tmp_path / "site"
    info = site / "deepbet-1.0.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: deepbet\nVersion: 1.0.2\n")
    for relative, _ in DEEPBET_NETWORKS.values():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_bytes(b"not deepbet's network")
    monkeypatch.setattr(sys, "path", [str(site)])
    with pytest.raises(AutoDDPMError, match="is not the network of deepbet 1.0.2"):
        deepbet_network_files()
    (site / DEEPBET_NETWORKS["bbox_model"][0]).unlink()
    with pytest.raises(AutoDDPMError, match="has no data/models/bbox_model.pt"):
        deepbet_network_files()


@needs_deepbet
def test_the_mask_is_deepbets_own_on_the_sample() -> None:
    stack = sample_stack()
    brain = deepbet_extractor()(stack.array)
    # deepbet 1.0.2's BrainExtraction.run on the same file (its own code, in a venv with its dependencies) flags
    # these 320,240 voxels; the digest is of that mask in the AxialStack's voxel order.
    assert brain.shape == stack.array.shape and int(brain.sum()) == 320240
    assert hashlib.sha256(np.packbits(brain).tobytes()).hexdigest() == (
        "548116f9fc3752f5a4b7572a35867ad1ff768165bdf24f41d17f6264affb26fc")
    truth = AxialStack.from_image(sitk.ReadImage(str(SAMPLE_MASK))).array > 0
    assert truth[brain].sum() / truth.sum() > 0.999  # the tumour is inside the brain it finds


@needs_deepbet
def test_an_empty_volume_is_a_clear_error() -> None:
    with pytest.raises(AutoDDPMError, match="deepbet found no brain"):
        deepbet_extractor()(np.zeros((20, 64, 64), dtype=np.float32))


@needs_deepbet
def test_calibrate_and_run_with_deepbets_region(tiny_model_with, tmp_path) -> None:
    model = tiny_model_with("pp", postprocessing=FLAIR_LIKE)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE, data / "p0_flair.nii.gz")
    shutil.copy(SAMPLE_MASK, data / "p0_mask.nii.gz")
    assert main(["calibrate", str(model), "--data", str(data), "--max-slices", "4", "--with-deepbet"]) == 0
    card = read_card(model)
    deepbet = option_settings("deepbet", FLAIR_LIKE)
    head_threshold, deepbet_threshold = card.postprocessed_threshold("fast"), card.postprocessed_threshold("fast", deepbet)
    assert head_threshold is not None and deepbet_threshold is not None and head_threshold != deepbet_threshold

    out = tmp_path / "out"
    assert main(["run", str(SAMPLE), "--model", str(model), "--output-dir", str(out), "--postprocess", "deepbet",
                 "--backend", "torch", "--progress", "none"]) == 0
    written = AxialStack.from_image(sitk.ReadImage(str(out / "TCGA_LGG_FLAIR_brain.nii.gz"))).array > 0
    assert np.array_equal(written, deepbet_extractor()(sample_stack().array))
    record = json.loads((out / "TCGA_LGG_FLAIR_autoddpm.json").read_text())
    assert record["settings"]["postprocessing"]["brain_region"] == "deepbet"
    assert record["settings"]["threshold"] == deepbet_threshold
    assert record["settings"]["threshold_from"] == "model card, post-processed map"
    anomaly = AxialStack.from_image(sitk.ReadImage(str(out / "TCGA_LGG_FLAIR_anomaly.nii.gz"))).array
    assert (anomaly[~written] == 0).all()

    # The whole-volume benchmark searches deepbet's region in every post-processed method, and its run is
    # recorded in the card beside the card's own post-processing's.
    bench = tmp_path / "bench"
    assert main(["benchmark-volumes", "--model", str(model), "--data", str(data), "--output-dir", str(bench),
                 "--backend", "torch", "--postprocess", "deepbet"]) == 0
    meta = json.loads((bench / "meta.json").read_text())
    assert meta["postprocessing"]["brain_region"] == "deepbet" and "deepbet brain mask" in (bench / "results.md").read_text()
    rows = json.loads((bench / "results.json").read_text())
    assert rows[0]["threshold"] == deepbet_threshold
    recorded = record_volume_validation(bench, model)
    assert recorded.data["validation_volumes_deepbet"]["dice"] == rows[0]["dice"]
    assert "validation_volumes" not in recorded.data
    assert validation_headline(recorded, "deepbet").startswith("1 whole volumes: Dice")


@needs_deepbet
def test_calibrating_with_deepbet_needs_a_card_with_post_processing(tiny_model, tmp_path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE, data / "p0_flair.nii.gz")
    before = (Path(tiny_model) / "model.json").read_text()
    assert main(["calibrate", str(tiny_model), "--data", str(data), "--with-deepbet"]) == 2
    assert "this model's card has none" in capsys.readouterr().err
    assert (Path(tiny_model) / "model.json").read_text() == before
