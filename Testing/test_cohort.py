"""Cohort runs: the provenance sidecar and NIfTI description of every input's outputs, earlier outputs refused,
skipped (--resume) or replaced (--overwrite), the cohort's summary.csv, and sharing the inputs under torchrun."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import make_head_volume
from test_cli import files_under

import AutoDDPMLib
from AutoDDPMLib.cli import main
from AutoDDPMLib.cohort.run_record import RunSettings


def cohort(folder: Path, count: int) -> Path:
    folder.mkdir()
    for seed in range(count):
        sitk.WriteImage(make_head_volume(seed=seed), str(folder / f"p{seed + 1}.nii.gz"))
    return folder


def summary(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="") as table:
        return list(csv.DictReader(table))


def test_outputs_carry_a_sidecar_and_a_description_of_how_they_were_made(tiny_model, head_volume, tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(head_volume), "--output-dir", str(out), "--model", str(tiny_model), "--seed", "3",
                 "--progress", "none", "--backend", "torch"]) == 0
    record = json.loads((out / "head_autoddpm.json").read_text())
    settings = record["settings"]
    assert record["autoddpm"]["version"] == AutoDDPMLib.__version__ and record["autoddpm"]["commit"]
    assert record["autoddpm"]["command"] == (f"autoddpm run {head_volume} --output-dir {out} --model {tiny_model} "
                                             "--seed 3 --progress none --backend torch")
    assert settings["model"] == "tiny" and settings["schedule"] == "fast" and settings["seed"] == 3
    assert settings["model_card_sha256"] == hashlib.sha256((tiny_model / "model.json").read_bytes()).hexdigest()
    assert settings["model_weights_sha256"] == hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    # The tiny card has no post-processing: the raw map and its threshold, tau as calibrated (placeholders).
    assert settings["threshold"] == 0.05 and settings["threshold_from"] == "model card, raw map"
    assert settings["mask_tau"] == 0.05 and settings["postprocessing"]["median_mm"] is None
    assert settings["repeats"] == 1 and settings["batch_size"] is None
    run = record["run"]
    assert run["backend"] == "torch" and run["device"] == "cpu" and run["batch_size"] == 16 and run["threads"] >= 1
    assert (run["rank"], run["world_size"]) == (0, 1)
    assert set(record["timings"]) == {"model_load_seconds", "reading_seconds", "processing_seconds"}
    assert any("no thresholds calibrated" in warning for warning in record["warnings"])
    facts = record["input"]
    assert facts["path"] == str(head_volume.resolve()) and facts["size"] == [48, 40, 6] and facts["spacing"] == [1, 1, 2]
    assert facts["sha256"] == hashlib.sha256(head_volume.read_bytes()).hexdigest()
    assert record["result"]["slices"] == 6
    assert sorted(record["outputs"].values()) == ["head_anomaly.nii.gz", "head_mask.nii.gz", "head_pseudohealthy.nii.gz"]
    for name in record["outputs"].values():
        description = sitk.ReadImage(str(out / name)).GetMetaData("descrip")
        assert description == f"AutoDDPM {AutoDDPMLib.__version__} tiny fast thr=0.05 seed=3 raw map"


def test_a_long_description_fits_the_nifti_header(tiny_model_with):
    model = tiny_model_with("long")
    card = json.loads((model / "model.json").read_text())
    card["name"] = "a-model-with-a-name-far-too-long-for-the-eighty-bytes-of-a-nifti-description"
    (model / "model.json").write_text(json.dumps(card))
    settings = RunSettings.for_run(str(model), "reference", "card", 0.125, 12345, 5, None)
    description = settings.nifti_description()
    assert len(description) == 79 and description.startswith(f"AutoDDPM {AutoDDPMLib.__version__} a-model-with-a-name")


def test_earlier_outputs_are_refused_before_the_model_loads(tiny_model, head_volume, tmp_path, capfd):
    out = tmp_path / "out"
    assert main(["run", str(head_volume), "--output-dir", str(out), "--model", str(tiny_model), "--progress", "none"]) == 0
    capfd.readouterr()
    before = files_under(tmp_path)
    assert main(["run", str(head_volume), "--output-dir", str(out), "--model", "no-such-model"]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines == [(f"autoddpm: error: output folder {out} already holds outputs of head.nii.gz; give --resume to skip "
                      "the inputs done with the same settings, --overwrite to replace them, or another --output-dir")]
    assert files_under(tmp_path) == before
    # A sidecar alone counts as well: it says outputs were there.
    for path in out.iterdir():
        if path.suffix != ".json":
            path.unlink()
    assert main(["run", str(head_volume), "--output-dir", str(out), "--model", "no-such-model"]) == 2
    assert "already holds outputs of head.nii.gz" in capfd.readouterr().err
    # --resume cannot tell how outputs were made from a damaged record: they are not skipped.
    (out / "head_autoddpm.json").write_text("{ not json")
    assert main(["run", str(head_volume), "--output-dir", str(out), "--model", str(tiny_model), "--resume"]) == 2
    assert ("have no record of how they were made (head_autoddpm.json is missing or unreadable); give --overwrite"
            in capfd.readouterr().err)


def test_resume_skips_what_was_done_with_the_same_settings(tiny_model, tiny_model_with, tmp_path, capfd):
    scans, out = cohort(tmp_path / "scans", 3), tmp_path / "out"
    run = ["run", str(scans), "--output-dir", str(out), "--model", str(tiny_model), "--progress", "none"]
    # An interrupted cohort run: p1 was done.
    assert main(["run", str(scans / "p1.nii.gz"), *run[2:]]) == 0
    p1 = {path: path.stat().st_mtime_ns for path in out.glob("p1_*")}
    capfd.readouterr()
    assert main([*run, "--resume"]) == 0
    err = capfd.readouterr().err
    assert "p1.nii.gz: skipped, done before with the same settings (p1_autoddpm.json)\n" in err
    assert {path: path.stat().st_mtime_ns for path in out.glob("p1_*")} == p1
    assert (out / "p3_mask.nii.gz").is_file()
    rows = summary(out)
    assert [(row["name"], row["status"]) for row in rows] == [("p1.nii.gz", "skipped"), ("p2.nii.gz", "ok"), ("p3.nii.gz", "ok")]
    assert rows[0]["slices"] == "6" and rows[0]["anomalous_volume_ml"] != ""  # from p1's sidecar

    # Other settings: refused before the model loads (no "loading model" line), unless --overwrite.
    before = files_under(tmp_path)
    assert main([*run[:-2], "--resume", "--seed", "1"]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"autoddpm: error: the outputs of p1.nii.gz in {out} were made "
                                                   "with other settings: seed 0 (now 1) (and the outputs of p2.nii.gz, p3.nii.gz)")
    assert files_under(tmp_path) == before
    # A recalibrated model is another setting too.
    recalibrated = tiny_model_with("recalibrated", thresholds={"mask_tau": 0.05, "anomaly": 0.07, "calibrated": False})
    assert main([*run[:4], "--model", str(recalibrated), "--resume", "--progress", "none"]) == 2
    assert "were made with other settings: another model card, threshold 0.05 (now 0.07) (and" in capfd.readouterr().err
    # An incomplete set of outputs is not done.
    (out / "p2_anomaly.nii.gz").unlink()
    assert main([*run, "--resume"]) == 2
    assert f"the outputs of p2.nii.gz in {out} are incomplete (p2_anomaly.nii.gz is missing); give --overwrite" in capfd.readouterr().err

    assert main([*run, "--seed", "1", "--resume", "--overwrite"]) == 0
    assert all(json.loads((out / f"p{n}_autoddpm.json").read_text())["settings"]["seed"] == 1 for n in (1, 2, 3))
    assert [row["status"] for row in summary(out)] == ["ok"] * 3
    # Everything done: nothing to load, nothing written but the summary.
    capfd.readouterr()
    assert main([*run, "--seed", "1", "--resume", "--progress", "bar"]) == 0
    assert "loading model" not in capfd.readouterr().err
    assert [row["status"] for row in summary(out)] == ["skipped"] * 3
    assert main([*run, "--seed", "1", "--resume", "--progress", "json"]) == 0
    events = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert [(event["event"], Path(event.get("input", "")).name) for event in events] == [
        ("skipped", "p1.nii.gz"), ("skipped", "p2.nii.gz"), ("skipped", "p3.nii.gz"), ("finished", "")]


def test_summary_lists_every_input_of_a_cohort(tiny_model, tmp_path, capfd):
    scans = cohort(tmp_path / "scans", 2)
    sitk.WriteImage(sitk.Image(40, 40, 4, sitk.sitkFloat32) + 7, str(scans / "p3_flat.nii.gz"))  # no signal
    (scans / "p4_missing.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["run", str(scans), "--output-dir", str(out), "--model", str(tiny_model), "--progress", "none"]) == 2
    rows = summary(out)
    assert list(rows[0]) == ["name", "status", "reason", "anomalous_volume_ml", "slices", "seconds", "warnings", "input"]
    assert [(row["name"], row["status"]) for row in rows] == [
        ("p1.nii.gz", "ok"), ("p2.nii.gz", "ok"), ("p3_flat.nii.gz", "failed"), ("p4_missing.nii.gz", "failed")]
    assert "no signal" in rows[2]["reason"] and str(scans / "p4_missing.nii.gz") in rows[3]["reason"]
    ok = rows[0]
    assert float(ok["anomalous_volume_ml"]) >= 0 and ok["slices"] == "6" and float(ok["seconds"]) > 0
    assert "no thresholds calibrated" in ok["warnings"] and ok["input"] == str(scans / "p1.nii.gz")
    assert not list(out.glob("p3_flat*")) and not list(out.glob("p4*"))


def test_torchrun_shares_the_inputs_among_processes(tiny_model, tmp_path):
    # Two processes on the CPU (gloo), as on a node with two GPUs: each runs every other input.
    scans, out = cohort(tmp_path / "scans", 3), tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "AutoDDPMLib.cli", "--threads", "1", "run", str(scans), "--output-dir", str(out),
               "--model", str(tiny_model), "--device", "cpu", "--progress", "none"]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = {name: json.loads((out / f"{name}_autoddpm.json").read_text())["run"] for name in ("p1", "p2", "p3")}
    assert {name: (run["rank"], run["world_size"]) for name, run in ranks.items()} == {"p1": (0, 2), "p2": (1, 2), "p3": (0, 2)}
    assert [(row["name"], row["status"]) for row in summary(out)] == [(f"p{n}.nii.gz", "ok") for n in (1, 2, 3)]
    # Resumed with the same processes: every rank skips the same inputs, rank 0 lists them.
    proc = subprocess.run([*command, "--resume"], check=False, capture_output=True, text=True, encoding="utf-8",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("skipped, done before with the same settings") == 3
    assert [row["status"] for row in summary(out)] == ["skipped"] * 3


@pytest.mark.parametrize("environment, words", [
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK 2 is not below WORLD_SIZE 2"),
    ({"WORLD_SIZE": "two"}, "RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "29500"}, "WORLD_SIZE is 2 but MASTER_ADDR not set"),
])
def test_a_process_environment_torchrun_did_not_set_is_refused_first(head_volume, tmp_path, capfd, monkeypatch,
                                                                      environment, words):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    before = files_under(tmp_path)
    assert main(["run", str(head_volume), "--output-dir", str(tmp_path / "out"), "--model", "no-such-model"]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoddpm: error: ") and words in lines[0], lines
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("model, options", [
    ("flair-lgg", {}),  # post-processed, with its calibrated post-processed threshold
    ("flair-lgg", {"postprocess": "none"}),  # the raw map's threshold
    ("t1-ixi-midaxial", {"schedule": "reference"}),
    ("flair-lgg", {"threshold": 0.25}),
])
def test_run_settings_choose_the_thresholds_the_engine_runs_with(model, options):
    # Settings are read before the model loads (for --resume): they must be what the loaded engine does.
    from AutoDDPMLib.detection.inference import AutoDDPM

    options = {"schedule": "fast", "postprocess": "card", "threshold": None, **options}
    settings = RunSettings.for_run(model, options["schedule"], options["postprocess"], options["threshold"], 0, 1, None)
    engine = AutoDDPM(model, device="cpu", backend="torch", **options)
    assert (settings.threshold, settings.mask_tau) == (engine.threshold, engine.pipeline.mask_threshold)
    assert settings.postprocessing == engine.postprocessing.to_dict()


def test_overwrite_leaves_no_output_of_the_earlier_run_behind(tiny_model, head_volume, tmp_path):
    out = tmp_path / "out"
    run = ["run", str(head_volume), "--output-dir", str(out), "--model", str(tiny_model), "--progress", "none"]
    assert main([*run, "--repeats", "2"]) == 0
    assert (out / "head_spread.nii.gz").is_file()
    assert main([*run, "--overwrite"]) == 0
    # The spread came with the two repeats: beside a single run's outputs it would describe them wrongly.
    assert sorted(path.name for path in out.iterdir()) == ["head_anomaly.nii.gz", "head_autoddpm.json",
                                                           "head_mask.nii.gz", "head_pseudohealthy.nii.gz"]
    assert json.loads((out / "head_autoddpm.json").read_text())["settings"]["repeats"] == 1
