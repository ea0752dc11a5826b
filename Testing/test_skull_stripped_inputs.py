"""Skull-stripped inputs: a threshold of their own, calibrated on validation volumes stripped the same way
(`autoddpm calibrate --with-stripped`), used by `autoddpm run` for an input that looks stripped or is said to be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoDDPMLib.cli import main
from AutoDDPMLib.detection.inference import AutoDDPM
from AutoDDPMLib.detection.postprocessing import PostProcessing, for_skull_stripped_input
from AutoDDPMLib.errors import AutoDDPMError
from AutoDDPMLib.models.bundle import read_card
from AutoDDPMLib.resources import resources_dir
from AutoDDPMLib.volumes.head_region import skull_stripped, strip_erosion_mm
from AutoDDPMLib.volumes.slices import AxialStack

SAMPLE = resources_dir() / "SampleData" / "TCGA_LGG_FLAIR.nii.gz"
SAMPLE_MASK = resources_dir() / "SampleData" / "TCGA_LGG_FLAIR_mask.nii.gz"
FLAIR_LIKE = {"polarity": "bright", "brain_erosion_mm": 2.0, "median_mm": 3.0, "min_component_mm3": 20.0}


def write_stripped_sample(target: Path) -> Path:
    """The sample set to 0 outside the head eroded 12 mm, as tools/dev_volumes.py strips the development patients."""
    image = sitk.ReadImage(str(SAMPLE))
    stack = AxialStack.from_image(image)
    sitk.WriteImage(stack.to_image(skull_stripped(stack.array, stack.spacing, (0.5, 99.5), 12.0)), str(target))
    return target


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with post-processing and a card that does not cover stripped scans, calibrated on the sample
    with and without its skull."""
    folder = tmp_path_factory.mktemp("stripped") / "model"
    shutil.copytree(tiny_model, folder)
    card = json.loads((folder / "model.json").read_text())
    card.update(postprocessing=FLAIR_LIKE, covers={"skull_stripped": False})
    (folder / "model.json").write_text(json.dumps(card))
    data = folder.parent / "data"
    data.mkdir()
    shutil.copy(SAMPLE, data / "p0_flair.nii.gz")
    shutil.copy(SAMPLE_MASK, data / "p0_mask.nii.gz")
    assert main(["calibrate", str(folder), "--data", str(data), "--max-slices", "4", "--with-stripped"]) == 0
    return folder


def thresholds(model: Path) -> tuple[float, float]:
    """(the card's threshold for inputs with skull, its threshold for skull-stripped inputs)."""
    card = read_card(model)
    return card.postprocessed_threshold("fast"), card.postprocessed_threshold("fast", for_skull_stripped_input(FLAIR_LIKE))


def test_calibration_writes_a_threshold_for_stripped_inputs(calibrated_model) -> None:
    with_skull, stripped = thresholds(calibrated_model)
    assert with_skull is not None and stripped is not None and with_skull != stripped
    (entry,) = read_card(calibrated_model).data["thresholds"]["postprocessed_alternatives"]
    assert entry["settings"] == {**FLAIR_LIKE, "skull_stripped_input": True}
    assert entry["calibration"]["skull_stripped"] == "0 outside the head eroded 2 mm"


def test_a_stripped_input_is_thresholded_with_its_own_threshold(calibrated_model, tmp_path) -> None:
    with_skull, stripped = thresholds(calibrated_model)
    stripped_input = write_stripped_sample(tmp_path / "stripped_flair.nii.gz")

    def run(path: Path, *options: str) -> dict:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        assert main(["run", str(path), "--model", str(calibrated_model), "--output-dir", str(out), "--backend", "torch",
                     "--progress", "none", *options]) == 0
        (sidecar,) = out.glob("*_autoddpm.json")
        record = json.loads(sidecar.read_text())
        mask = sitk.ReadImage(str(next(out.glob("*_mask.nii.gz"))))
        assert f"thr={record['result']['threshold']:.3g}" in mask.GetMetaData("descrip")
        return record

    record = run(stripped_input)
    assert record["result"]["skull_stripped"] and record["result"]["threshold"] == stripped
    assert record["settings"]["skull_stripped"] is None  # looked at, not told
    assert record["run"]["postprocessing"].endswith("threshold for skull-stripped inputs")
    assert any("looks skull-stripped" in w and "its threshold for skull-stripped inputs was used" in w
               for w in record["warnings"])
    record = run(SAMPLE)
    assert not record["result"]["skull_stripped"] and record["result"]["threshold"] == with_skull
    assert not any("skull-stripped" in w for w in record["warnings"])
    # Told otherwise, the engine believes the user; a threshold given is used as given.
    assert run(stripped_input, "--skull-stripped", "no")["result"]["threshold"] == with_skull
    assert run(SAMPLE, "--skull-stripped", "yes")["result"]["threshold"] == stripped
    assert run(stripped_input, "--threshold", "0.5")["result"]["threshold"] == 0.5


def test_the_stripped_threshold_is_the_one_the_engine_reports(calibrated_model, tmp_path) -> None:
    _, stripped = thresholds(calibrated_model)
    result = AutoDDPM(calibrated_model, backend="torch").process_volume(
        sitk.ReadImage(str(write_stripped_sample(tmp_path / "s.nii.gz"))))
    assert result.skull_stripped and result.threshold == stripped
    assert result.postprocessing_settings == {**PostProcessing.from_dict(FLAIR_LIKE).to_dict(), "skull_stripped_input": True}
    anomaly = AxialStack.from_image(result.anomaly_map).array
    mask = AxialStack.from_image(result.mask).array > 0
    assert not mask[anomaly <= stripped].any()


def test_told_stripped_without_a_calibrated_threshold_is_a_clear_error(tiny_model_with, tmp_path, capsys) -> None:
    model = tiny_model_with("uncalibrated", postprocessing=FLAIR_LIKE)
    with pytest.raises(AutoDDPMError, match="no threshold calibrated for skull-stripped inputs.*--with-stripped"):
        AutoDDPM(model, backend="torch", skull_stripped=True)
    out = tmp_path / "out"
    assert main(["run", str(SAMPLE), "--model", str(model), "--output-dir", str(out), "--skull-stripped", "yes",
                 "--progress", "none"]) == 2
    assert "--with-stripped" in capsys.readouterr().err and not out.exists()
    # Without a stripped threshold an input that looks stripped is thresholded as any other.
    engine = AutoDDPM(model, backend="torch")
    assert engine.stripped_input is None


def test_calibrating_stripped_thresholds_needs_post_processing(tiny_model, tmp_path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE, data / "p0_flair.nii.gz")
    before = (Path(tiny_model) / "model.json").read_text()
    assert main(["calibrate", str(tiny_model), "--data", str(data), "--with-stripped"]) == 2
    assert "has no post-processing" in capsys.readouterr().err
    assert (Path(tiny_model) / "model.json").read_text() == before


def test_stripped_settings_are_the_same_steps_marked() -> None:
    settings = PostProcessing.from_dict(for_skull_stripped_input(FLAIR_LIKE))
    assert settings.skull_stripped_input and settings.describe().endswith("threshold for skull-stripped inputs")
    assert "skull_stripped_input" not in PostProcessing.from_dict(FLAIR_LIKE).to_dict()  # as cards stated it before
    assert for_skull_stripped_input({}) == {}  # the raw map has no threshold of its own for them
    with pytest.raises(AutoDDPMError, match="skull_stripped_input must be true or false"):
        PostProcessing.from_dict({**FLAIR_LIKE, "skull_stripped_input": "yes"})
    assert strip_erosion_mm(FLAIR_LIKE) == 2.0 and strip_erosion_mm({}) == 12.0


def test_stripping_leaves_only_the_brain_region() -> None:
    stack = AxialStack.from_image(sitk.ReadImage(str(SAMPLE)))
    stripped = skull_stripped(stack.array, stack.spacing, (0.5, 99.5), 12.0)
    assert (stripped == 0).mean() > (stack.array == 0).mean()
    kept = stripped != 0
    assert np.array_equal(stripped[kept], stack.array[kept])


def test_the_whole_volume_benchmark_thresholds_stripped_volumes_as_run_does(calibrated_model, tmp_path) -> None:
    from AutoDDPMLib.benchmark.validation_record import record_volume_validation
    from AutoDDPMLib.models.validation import validation_headline

    _, stripped = thresholds(calibrated_model)
    data = tmp_path / "data"
    data.mkdir()
    write_stripped_sample(data / "p0_flair.nii.gz")
    shutil.copy(SAMPLE_MASK, data / "p0_mask.nii.gz")
    model = tmp_path / "model"
    shutil.copytree(calibrated_model, model)  # the card gets the record written into it
    bench = tmp_path / "bench"
    assert main(["benchmark-volumes", "--model", str(model), "--data", str(data), "--output-dir", str(bench),
                 "--backend", "torch"]) == 0
    rows = json.loads((bench / "results.json").read_text())
    meta = json.loads((bench / "meta.json").read_text())
    assert rows[0]["threshold"] == stripped and meta["skull_stripped_inputs"] == 1
    assert "threshold for skull-stripped inputs" in (bench / "results.md").read_text()
    recorded = record_volume_validation(bench, model)
    assert recorded.data["validation_volumes_stripped"]["dice"] == rows[0]["dice"]
    assert "validation_volumes" not in recorded.data
    assert validation_headline(recorded, "card", skull_stripped=True).startswith("1 whole volumes: Dice")
    assert validation_headline(recorded, "card") != validation_headline(recorded, "card", skull_stripped=True)

    # Told they are not stripped, the same volumes get the card's threshold: a run of another kind.
    told = tmp_path / "told"
    assert main(["benchmark-volumes", "--model", str(model), "--data", str(data), "--output-dir", str(told),
                 "--backend", "torch", "--skull-stripped", "no"]) == 0
    assert json.loads((told / "results.json").read_text())[0]["threshold"] == thresholds(model)[0]
    assert json.loads((told / "meta.json").read_text())["skull_stripped_inputs"] == 0


def test_a_volume_stripped_for_calibration_is_the_stripped_file_read(tiny_model_with, tmp_path) -> None:
    from AutoDDPMLib.training.volume_calibration import LabelledVolume

    card = read_card(tiny_model_with("twelve", postprocessing={**FLAIR_LIKE, "brain_erosion_mm": 12.0}))
    in_memory = LabelledVolume(SAMPLE, SAMPLE_MASK, card, skull_stripped=True)
    from_file = LabelledVolume(write_stripped_sample(tmp_path / "s_flair.nii.gz"), SAMPLE_MASK, card)
    for name in ("array", "slices01", "healthy", "truth"):
        assert np.array_equal(getattr(in_memory, name), getattr(from_file, name)), name
    assert np.array_equal(AxialStack.from_image(in_memory.image).array, from_file.array)
