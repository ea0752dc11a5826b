"""Smoke test of the benchmark on two tiny cases per dataset with the tiny model (shape and ranges, no timing)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_cli_without_simpleitk

from AutoDDPMLib.benchmark.runner import add_benchmark_command, benchmark_main, run_benchmark
from AutoDDPMLib.benchmark.speed import run_speed


def _head(shape, seed, lesion):
    rng = np.random.default_rng(seed)
    slices, rows, cols = shape
    yy, xx = np.mgrid[:rows, :cols]
    head = ((yy - rows / 2) / (rows * 0.45)) ** 2 + ((xx - cols / 2) / (cols * 0.45)) ** 2 < 1
    image = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    for z in range(slices):
        image[z][head] = 300 + 40 * rng.standard_normal(int(head.sum()))
    if lesion:
        blob = (yy - rows * 0.4) ** 2 + (xx - cols * 0.55) ** 2 < (rows * 0.12) ** 2
        image[1][blob] = 900
        mask[1][blob] = 1
    return image, mask


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """lgg_flair/{train,val} (2-slice volumes, one tumour slice) and ixi_t1_midaxial/{train,val} PNGs."""
    root = tmp_path_factory.mktemp("benchdata")
    for split, seed in (("train", 10), ("val", 0)):
        lgg = root / "lgg_flair" / split
        ixi = root / "ixi_t1_midaxial" / split
        lgg.mkdir(parents=True)
        ixi.mkdir(parents=True)
        image, mask = _head((2, 40, 40), seed, lesion=True)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(lgg / "P0_flair.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(lgg / "P0_mask.nii.gz"))
        image, _ = _head((1, 44, 38), seed + 5, lesion=False)
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(image[0] / 4, 0, 255).astype(np.uint8)), str(ixi / "IXI000.png"))
    return root


def _in_range(value, low, high):
    return value is None or low - 1e-6 <= value <= high + 1e-6


def _detection(rows):
    """Dice and AUPRC of every row, by what the row measures."""
    return {(r["method"], r["dataset"], r["size_bin"], r["threshold_kind"]): (r["dice"], r["auprc"]) for r in rows}


def test_benchmark_smoke(tiny_model, data_root, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = run_benchmark(
            model=str(tiny_model), output_dir=tmp_path / "out", data=data_root, quick=True,
            datasets=["lgg", "lgg-synth", "ixi"], device="cpu", max_images=1, reference_cases=1,
            calibration_slices_count=2, figures=False,
        )
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text()) == rows
    report = (out / "results.md").read_text()
    assert "oracle" in report and "| method |" in report and "AnoDDPM t=500 runs from level 499" in report

    methods = {r["method"] for r in rows}
    assert {"AutoDDPM fast", "AutoDDPM reference", "Residual (coarse, fast)"} <= methods
    intensity = [r for r in rows if r["method"] == "Input intensity (no model)"]
    assert intensity and all(r["evaluations_per_slice"] == 0 and r["mae_healthy"] is None for r in intensity)
    # the tiny card's max_timestep is 499: the reference's t=500 runs from there
    assert {f"AnoDDPM t={t}" for t in (50, 100, 200, 300, 499)} <= methods
    assert {r["dataset"] for r in rows} == {
        f"{d}{s}" for d in ("lgg", "lgg-synth", "ixi") for s in ("", " [reference subset]")
    }
    assert {r["threshold_kind"] for r in rows} == {"calibrated", "oracle"}
    assert {r["size_bin"] for r in rows if r["dataset"] == "ixi"} == {"all", "small", "medium", "large"}
    # the reference schedule only on its subset in --quick
    assert all(r["dataset"].endswith("[reference subset]") for r in rows if r["method"] == "AutoDDPM reference")
    for r in rows:
        assert _in_range(r["dice"], 0, 1) and _in_range(r["auprc"], 0, 1)
        assert _in_range(r["fpr_pixels"], 0, 1) and _in_range(r["fpr_slices"], 0, 1)
        assert _in_range(r["ssim_healthy"], -1, 1) and _in_range(r["mae_healthy"], 0, 1)
        assert _in_range(r["lpips_healthy"], 0, 10)
        assert (r["evaluations_per_slice"] > 0) != (r["method"] == "Input intensity (no model)") and r["seconds_per_slice"] >= 0
    for dataset in ("ixi", "lgg-synth"):
        fast = [r for r in rows if r["method"] == "AutoDDPM fast" and r["dataset"] == dataset and r["size_bin"] == "all"]
        assert fast[0]["evaluations_per_slice"] == 25
        assert fast[0]["n_slices"] == 4  # one healthy slice: clean + one lesion per size bin
        assert fast[0]["mae_lesion"] is not None  # the healthy image is known
    lgg = [r for r in rows if r["dataset"] == "lgg" and r["size_bin"] == "all"]
    assert all(r["seconds_per_volume"] is not None and r["mae_lesion"] is None for r in lgg)
    oracle = [r for r in rows if r["threshold_kind"] == "oracle" and r["dice"] is not None]
    assert all(r["threshold"] >= 0.0 for r in oracle)


def test_dev_set_is_the_unseen_tumour_slices_of_training_patients(tiny_model, data_root):
    from AutoDDPMLib.benchmark.datasets import load_dataset, load_lgg
    from AutoDDPMLib.models.bundle import read_card

    card = read_card(tiny_model)
    dev = load_dataset("lgg-dev", data_root, card, dict(max_volumes=None), seed=0)
    whole = load_lgg(data_root / "lgg_flair" / "train", card, None)
    assert dev.name == "lgg-dev" and len(whole) == 2 and len(dev) == 1  # the tumour slice only
    assert dev.truth.any(axis=(1, 2)).all() and torch.equal(dev.x[0], whole.x[1])
    assert "tumour slices" in dev.description


def test_robustness_dev_sets_are_lgg_dev_stripped_or_with_scanner_changes(tiny_model, data_root):
    from AutoDDPMLib.benchmark.datasets import DATASETS, default_datasets, load_dataset
    from AutoDDPMLib.models.bundle import read_card
    from AutoDDPMLib.volumes.head_region import brain_region

    card = read_card(tiny_model)
    sizes = dict(max_volumes=None)
    dev = load_dataset("lgg-dev", data_root, card, sizes, seed=0)
    stripped = load_dataset("lgg-dev-stripped", data_root, card, sizes, seed=0)
    scanner = load_dataset("lgg-dev-scanner", data_root, card, sizes, seed=0)
    for changed in (stripped, scanner):  # the same training patients' tumour slices, the same truth
        assert changed.volumes == dev.volumes and (changed.truth == dev.truth).all()
        assert "lgg_flair/train" in changed.description and changed.x.shape == dev.x.shape
        assert 0 <= changed.x.min() and changed.x.max() <= 1 and not torch.equal(changed.x, dev.x)
    # Stripped: black outside the brain region of the unstripped slices, tissue left inside it.
    brain = brain_region(dev.x[:, 0].numpy(), (1.0, 1.0, 1.0), 12.0 * card.image_size / 40)
    outside = dev.x[:, 0].numpy() * ~brain
    assert outside.sum() > 0 and (stripped.x[:, 0].numpy() * ~brain).sum() < 0.1 * outside.sum()
    assert (stripped.x[:, 0].numpy()[brain] > 0).mean() > 0.9
    # Scanner: black air stays black, the tissue changes; the seed decides the change.
    assert (scanner.x[dev.x == 0] == 0).all()
    assert torch.equal(scanner.x, load_dataset("lgg-dev-scanner", data_root, card, sizes, seed=0).x)
    assert not torch.equal(scanner.x, load_dataset("lgg-dev-scanner", data_root, card, sizes, seed=1).x)
    assert "skull-stripped" in stripped.description and "seed 0" in scanner.description
    assert {"lgg-dev-stripped", "lgg-dev-scanner"} <= set(DATASETS)
    assert not any("dev" in name for name in default_datasets(card))


def test_the_t1_dev_set_puts_synthetic_lesions_on_training_slices(tiny_model, data_root):
    from AutoDDPMLib.benchmark.datasets import calibration_family, load_dataset
    from AutoDDPMLib.models.bundle import read_card

    card = read_card(tiny_model)
    dev = load_dataset("ixi-dev", data_root, card, dict(max_images=None), seed=0)
    val = load_dataset("ixi", data_root, card, dict(max_images=None), seed=0)
    assert dev.name == "ixi-dev" and len(dev) == 4 and "ixi_t1_midaxial/train" in dev.description
    assert dev.bins == val.bins and not torch.equal(dev.x[0], val.x[0])  # the train slice, not the val one
    assert calibration_family(card, "ixi-dev") == "ixi"


def test_oracle_thresholds_refine_the_reference_grid():
    from AutoDDPMLib.benchmark.metrics import ORACLE_THRESHOLDS, best_dice
    from AutoDDPMLib.benchmark.scoring import oracle_thresholds

    scores = np.zeros((2, 8, 8), np.float32)
    truth = np.zeros((2, 8, 8), bool)
    truth[0, :2] = True
    scores[0, :2] = 0.004  # a map with a tiny range, like AutoDDPM's A
    scores[1, :2] = 0.002
    thresholds = oracle_thresholds(scores)
    assert set(ORACLE_THRESHOLDS) <= set(thresholds)
    assert best_dice(scores, truth)[0] < 1.0  # the 0.01 grid cannot separate 0.002 from 0.004
    assert best_dice(scores, truth, thresholds)[0] == 1.0


def test_cli_wiring(tiny_model):
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    add_benchmark_command(commands)
    args = parser.parse_args(["benchmark", "--model", str(tiny_model), "--quick", "--output-dir", "x", "--datasets", "lgg,ixi"])
    assert args.handler is benchmark_main and args.quick and args.datasets == "lgg,ixi"
    args = parser.parse_args(["benchmark-speed", "--batch-sizes", "1", "2", "--compile"])
    assert args.batch_sizes == [1, 2] and args.compile


def test_speed_table(tiny_model, tmp_path):
    rows = run_speed(str(tiny_model), "cpu", batch_sizes=(1, 2), backends=("eager", "channels_last", "half"),
                     min_seconds=0.0, max_repeats=3, output_dir=tmp_path)
    # a backend far slower than eager (bfloat16 on CPUs without bf16 units) is dropped after its first batch size
    assert {(r["backend"], r["batch_size"]) for r in rows} >= {("eager", 1), ("eager", 2), ("channels_last", 1), ("channels_last", 2), ("bfloat16", 1)}
    assert all(r["max_abs_deviation_from_eager"] < 1e-4 for r in rows if r["backend"] == "channels_last")
    assert all(r["ms_per_slice"] > 0 for r in rows)
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["meta"]["best"] in saved["rows"]
    report = (tmp_path / "speed.md").read_text()
    assert "ms / slice" in report
    assert f"- Commit: `{saved['meta']['commit']}`" in report  # provenance of the numbers


def test_speed_onnxruntime_matches_eager(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")  # torch.onnx.export needs it
    rows = run_speed(str(tiny_model), "cpu", batch_sizes=(1, 3), backends=("eager", "onnxruntime"),
                     min_seconds=0.0, max_repeats=3, output_dir=tmp_path)
    onnx_rows = [r for r in rows if r["backend"] == "onnxruntime"]
    # exported at batch 2: the dynamic batch axis runs batch 1 (and 3 unless dropped as much slower than eager)
    assert onnx_rows and onnx_rows[0]["batch_size"] == 1
    assert all(r["ms_per_slice"] > 0 and r["max_abs_deviation_from_eager"] < 1e-3 for r in onnx_rows)
    assert not any("onnxruntime" in note for note in json.loads((tmp_path / "speed.json").read_text())["meta"]["notes"])


def test_speed_onnxruntime_skipped_with_a_note_when_missing(tiny_model, tmp_path, monkeypatch):
    import AutoDDPMLib.diffusion.onnx_backend as onnx_backend

    monkeypatch.setattr(onnx_backend, "missing_onnx_packages", lambda: ["onnxruntime"])
    rows = run_speed(str(tiny_model), "cpu", batch_sizes=(1,), backends=("eager", "onnxruntime"),
                     min_seconds=0.0, max_repeats=3, output_dir=tmp_path)
    assert [r["backend"] for r in rows] == ["eager"]
    notes = json.loads((tmp_path / "speed.json").read_text())["meta"]["notes"]
    assert any(n.startswith("onnxruntime: skipped, onnxruntime is not installed") for n in notes)
    assert "autoddpm[onnx]" in (tmp_path / "speed.md").read_text()


def test_baseline_calibration_takes_enough_single_slice_files(tiny_model, tmp_path):
    from AutoDDPMLib.benchmark.datasets import calibration_slices
    from AutoDDPMLib.models.bundle import read_card

    train = tmp_path / "ixi_t1_midaxial" / "train"
    train.mkdir(parents=True)
    for i in range(14):
        image, _ = _head((1, 44, 38), 100 + i, lesion=False)
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(image[0] / 4, 0, 255).astype(np.uint8)), str(train / f"IXI{i:03d}.png"))
    # One slice per PNG: 12 slices need 12 files, not the quarter that volumes would need.
    slices, where = calibration_slices("ixi", tmp_path, read_card(tiny_model), 12)
    assert len(slices) == 12 and where.startswith("12 files of")
    slices, where = calibration_slices("ixi", tmp_path, read_card(tiny_model), 40)
    assert len(slices) == 14 and where.startswith("14 files of")


def test_baseline_calibration_follows_the_card(tiny_model, data_root):
    from AutoDDPMLib.benchmark.datasets import calibrated_on, calibration_family, calibration_slices
    from AutoDDPMLib.benchmark.scoring import card_healthy_fpr
    from AutoDDPMLib.models.bundle import read_card

    card = read_card(tiny_model)
    assert card_healthy_fpr(card) is None and calibration_family(card, "ixi") == "ixi"
    card.data = dict(card.data, thresholds={"mask_tau": 0.1, "anomaly": 0.2, "calibrated": True, "calibration": {
        "data": [str(data_root / "lgg_flair" / "val")], "healthy_fpr": 0.01}})
    assert card_healthy_fpr(card) == 0.01
    assert calibration_family(card, "lgg") == "card"
    # calibrated on the very folder the benchmark evaluates: flagged
    assert calibrated_on(card, data_root / "lgg_flair" / "val")
    assert calibrated_on(card, data_root / "ixi_t1_midaxial" / "val") is None
    slices, where = calibration_slices("card", data_root, card, 2)
    assert slices.shape == (1, 1, 32, 32) and "calibration data" in where  # the one lesion-free val slice


def test_a_prepared_file_runs_the_same_benchmark_where_simpleitk_is_missing(tiny_model, data_root, tmp_path):
    from AutoDDPMLib.benchmark.runner import prepare_benchmark_data

    settings = dict(quick=True, datasets=["lgg", "ixi"], max_images=1, calibration_slices_count=2)
    prepared = prepare_benchmark_data(tmp_path / "cases.safetensors", model=str(tiny_model), data=data_root, **settings)
    from_folder = run_benchmark(model=str(tiny_model), output_dir=tmp_path / "folder", data=data_root, device="cpu",
                                reference_cases=1, figures=False, **settings)
    # The file is all a GPU node needs: the run there cannot even import SimpleITK.
    proc = run_cli_without_simpleitk("benchmark", "--model", str(tiny_model), "--quick", "--data", str(prepared),
                                     "--output-dir", str(tmp_path / "file"), "--device", "cpu", "--reference-cases", "1",
                                     "--no-figures", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_file = json.loads((tmp_path / "file" / "results.json").read_text())

    assert _detection(from_file) == _detection(from_folder) and len(from_file) == len(from_folder)


def test_a_prepared_file_is_refused_by_another_model(tiny_model, tiny_model_with, data_root, tmp_path):
    from AutoDDPMLib.benchmark.runner import prepare_benchmark_data
    from AutoDDPMLib.errors import AutoDDPMError

    prepared = prepare_benchmark_data(tmp_path / "cases.safetensors", model=str(tiny_model), data=data_root,
                                      quick=True, datasets=["ixi"], max_images=1, calibration_slices_count=2)
    other = tiny_model_with("other", preprocessing={"orientation": "axial", "intensity_percentiles": [1.0, 99.0],
                                                     "min_foreground_fraction": 0.05})
    with pytest.raises(AutoDDPMError, match="was prepared for .* prepare it again"):
        run_benchmark(model=str(other), output_dir=tmp_path / "out", data=prepared, quick=True, figures=False)


def test_a_stopped_run_resumes_from_its_finished_parts(tiny_model, data_root, tmp_path):
    settings = dict(quick=True, datasets=["ixi"], max_images=1, reference_cases=1, calibration_slices_count=2,
                    device="cpu", backend="torch", figures=False)
    out = tmp_path / "out"
    parts = out / "partial"
    # Stopped for real, as a laptop going to sleep or a session ending would: killed after two method runs.
    proc = subprocess.Popen(
        [sys.executable, "-m", "AutoDDPMLib.cli", "--threads", "1", "benchmark", "--model", str(tiny_model), "--quick",
         "--data", str(data_root), "--datasets", "ixi", "--max-images", "1", "--reference-cases", "1",
         "--calibration-slices", "2", "--device", "cpu", "--backend", "torch", "--no-figures", "--output-dir", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and len(list(parts.glob("*.safetensors"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    stored = len(list(parts.glob("*.safetensors")))
    assert stored >= 2 and not (out / "results.json").exists()  # no report from a stopped run
    kept = tmp_path / "kept"
    shutil.copytree(parts, kept)

    resumed = run_benchmark(model=str(tiny_model), output_dir=out, data=data_root, resume=True, **settings)
    notes = json.loads((out / "meta.json").read_text())["notes"]
    assert any(n.startswith(f"Resumed: {stored} stored parts") and "[" not in n for n in notes)
    assert not parts.exists()  # the report is written: the parts are gone

    fresh = run_benchmark(model=str(tiny_model), output_dir=tmp_path / "fresh", data=data_root, **settings)
    assert _detection(resumed) == _detection(fresh) and len(resumed) == len(fresh)

    # Without --resume an earlier run's parts are dropped, never mixed in.
    shutil.copytree(kept, tmp_path / "again" / "partial")
    run_benchmark(model=str(tiny_model), output_dir=tmp_path / "again", data=data_root, **settings)
    assert not any(n.startswith("Resumed") for n in json.loads((tmp_path / "again" / "meta.json").read_text())["notes"])


def test_a_stored_part_is_reused_only_by_the_same_run(tmp_path):
    from AutoDDPMLib.benchmark.parts import PartStore

    calls = []

    def compute():
        calls.append(1)
        return {"rec": np.full((2, 3), 0.5, np.float32), "seconds": np.array([1.5])}

    PartStore(tmp_path, {"seed": 0}, resume=False).get_or_compute("lgg: AnoDDPM t=50", {"method": "a"}, compute)
    again = PartStore(tmp_path, {"seed": 0}, resume=True)
    out = again.get_or_compute("lgg: AnoDDPM t=50", {"method": "a"}, compute)
    assert len(calls) == 1 and again.resumed == ["lgg: AnoDDPM t=50"]
    assert np.array_equal(out["rec"], np.full((2, 3), 0.5)) and out["seconds"][0] == 1.5
    PartStore(tmp_path, {"seed": 1}, resume=True).get_or_compute("x", {"method": "a"}, compute)  # another run
    PartStore(tmp_path, {"seed": 0}, resume=True).get_or_compute("x", {"method": "b"}, compute)  # another method
    assert len(calls) == 3
    fresh = PartStore(tmp_path, {"seed": 0}, resume=False)
    assert fresh.discarded == 3 and not fresh.folder.exists()


def test_a_residual_without_its_autoddpm_run_reconstructs_the_same_coarse_stage(tiny_model, tmp_path):
    from safetensors import safe_open

    from AutoDDPMLib.benchmark.methods import Method, Runner
    from AutoDDPMLib.benchmark.parts import PartStore
    from AutoDDPMLib.models.bundle import read_card

    card = read_card(tiny_model)
    x = torch.rand(3, 1, card.image_size, card.image_size)
    cases = np.arange(3)
    residual = Method("Residual (coarse, reference)", "residual", "reference")

    def runner(folder):
        return Runner(card, torch.device("cpu"), 2, 0, "torch", PartStore(tmp_path / folder, {}, resume=False))

    alone = runner("alone").run(residual, 5, "calibration", x, cases, [cases])  # step 1 only
    shared = runner("shared")
    full = shared.run(Method("AutoDDPM reference", "autoddpm", "reference"), 1, "calibration", x, cases, [cases])
    after = shared.run(residual, 5, "calibration", x, cases, [cases])  # AutoDDPM's own first stage
    assert np.array_equal(alone.scores, after.scores) and np.array_equal(alone.pseudo_healthy, after.pseudo_healthy)
    assert np.isfinite(full.scores).all()
    (part,) = (tmp_path / "alone" / "partial").glob("*.safetensors")
    with safe_open(str(part), "np") as handle:
        assert handle.metadata()["label"] == "calibration: AutoDDPM reference (coarse stage) [group 1/1, rows 0-2]"
        assert np.isnan(handle.get_tensor("anomaly")).all()  # the re-sampling never ran


def test_method_runs_are_stored_in_chunks_that_give_the_one_pass_results(tiny_model, tmp_path, monkeypatch):
    import AutoDDPMLib.benchmark.methods as benchmark_methods
    from AutoDDPMLib.benchmark.methods import Method, Runner
    from AutoDDPMLib.benchmark.parts import PartStore
    from AutoDDPMLib.models.bundle import read_card

    monkeypatch.setattr(benchmark_methods, "CHUNK_BATCHES", 1)
    card = read_card(tiny_model)
    x = torch.rand(7, 1, card.image_size, card.image_size)
    groups = [np.arange(5), np.arange(5, 7)]  # two volumes: chunks of 2, 2, 1 and 2 slices
    cases = np.arange(7)
    autoddpm, anoddpm = Method("AutoDDPM fast", "autoddpm", "fast"), Method("AnoDDPM t=50", "anoddpm", level=50, steps=3)

    def runner(resume=False, folder="out"):
        return Runner(card, torch.device("cpu"), 2, 0, "torch", PartStore(tmp_path / folder, {}, resume=resume))

    first = runner()
    chunked = {name: first.run(m, i, "lgg", x, cases, groups) for i, (name, m) in enumerate([("a", autoddpm), ("b", anoddpm)])}
    one_pass = runner(folder="one pass")
    one_pass._evalset = "lgg"
    whole = one_pass.run_autoddpm("fast", x, groups, 1)
    assert np.array_equal(chunked["a"].scores, whole["anomaly"]) and np.array_equal(chunked["a"].pseudo_healthy, whole["ph"])
    assert len(chunked["a"].group_seconds) == 2
    rec = one_pass.run_anoddpm(50, 3, x, groups, 1)["rec"]
    assert np.array_equal(chunked["b"].pseudo_healthy, rec)

    parts = sorted((tmp_path / "out" / "partial").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    assert len(parts) == 8  # 4 chunks per method
    parts[-1].unlink()  # stopped during the last chunk of the baseline
    resumed = runner(resume=True)
    again = resumed.run(anoddpm, 1, "lgg", x, cases, groups)
    assert len(resumed.parts.resumed) == 3 and np.array_equal(again.pseudo_healthy, rec)


def test_the_benchmark_runs_the_schedules_of_the_card(tiny_model_with):
    from AutoDDPMLib.benchmark.methods import benchmark_schedules, build_methods
    from AutoDDPMLib.models.bundle import read_card

    card = read_card(tiny_model_with("early", schedules={
        "fast": {"coarse_start": 150, "coarse_steps": 10, "resample_start": 50, "resample_steps": 5, "resample_jumps": 3},
        "reference": {"coarse_start": 200, "coarse_steps": 201, "resample_start": 50, "resample_steps": 50, "resample_jumps": 5}}))
    schedules = benchmark_schedules(card)
    assert schedules["fast"].coarse_start == schedules["mid"].coarse_start == 150
    assert schedules["reference"].coarse_start == 200
    methods = {m.name: m for m in build_methods(card, quick=False, baseline_steps=None, notes=[])}
    assert methods["AutoDDPM fast"].evaluations == 25 and methods["AutoDDPM mid (100 evals)"].evaluations == 100


def test_a_full_run_adds_the_mid_schedule_and_the_reference_residual_on_every_case(tiny_model, data_root, tmp_path):
    rows = run_benchmark(model=str(tiny_model), output_dir=tmp_path / "out", data=data_root, datasets=["lgg"],
                         device="cpu", backend="torch", calibration_slices_count=1, baseline_steps=3, figures=False)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["quick"] is False and meta["backend"] == "torch"
    methods = {r["method"] for r in rows}
    assert {"AutoDDPM fast", "AutoDDPM mid (100 evals)", "AutoDDPM reference", "Residual (coarse, fast)",
            "Residual (coarse, reference)"} <= methods
    assert {r["dataset"] for r in rows} == {"lgg"}  # no subset: every method ran every case
    evaluations = {r["method"]: r["evaluations_per_slice"] for r in rows}
    assert evaluations["AutoDDPM reference"] == 451 and evaluations["Residual (coarse, reference)"] == 201
    assert evaluations["AnoDDPM t=300"] == 3  # --baseline-steps caps the reverse steps
    reference = [r for r in rows if r["method"] == "Residual (coarse, reference)" and r["threshold_kind"] == "calibrated"]
    assert reference[0]["threshold"] is not None and reference[0]["n_slices"] == 2


def test_a_benchmark_run_is_recorded_in_the_card_it_was_made_with(tiny_model_with, data_root, tmp_path, capsys, monkeypatch):
    from AutoDDPMLib.benchmark.validation_record import record_validation
    from AutoDDPMLib.cli import main
    from AutoDDPMLib.errors import AutoDDPMError
    from AutoDDPMLib.models.bundle import read_card

    model = tiny_model_with("tiny")
    run = tmp_path / "run"
    rows = run_benchmark(model=str(model), output_dir=run, data=data_root, quick=True, datasets=["ixi"], device="cpu",
                         max_images=1, reference_cases=1, calibration_slices_count=2, figures=False)
    card = record_validation(run, model)
    validation = card.data["validation"]
    fast = {(r["size_bin"], r["threshold_kind"]): r for r in rows if r["method"] == "AutoDDPM fast" and r["dataset"] == "ixi"}
    assert validation["benchmark"] == str(run) and validation["quick"] is True and validation["commit"]
    assert set(validation["results"]) == {"ixi"}  # no "[reference subset]" rows
    for size_bin, entry in validation["results"]["ixi"].items():
        assert entry["dice"] == fast[(size_bin, "calibrated")]["dice"]
        assert entry["dice_oracle"] == fast[(size_bin, "oracle")]["dice"]
        assert entry["auprc"] == fast[(size_bin, "calibrated")]["auprc"]
    assert read_card(model).data["validation"] == validation

    resources = tmp_path / "Resources"
    shutil.copytree(model, resources / "Models" / "tiny")
    monkeypatch.setenv("AUTODDPM_RESOURCES", str(resources))
    assert main(["models"]) == 0
    assert f"ixi: Dice {validation['results']['ixi']['all']['dice']:.3f}" in capsys.readouterr().out

    # Calibrated again since the run: the run no longer says what the model does.
    card.data["thresholds"]["anomaly"] += 0.01
    (model / "model.json").write_text(json.dumps(card.data))
    with pytest.raises(AutoDDPMError, match="other thresholds"):
        record_validation(run, model)
    other = tiny_model_with("other")
    (other / "model.json").write_text(json.dumps(dict(json.loads((other / "model.json").read_text()), name="other")))
    with pytest.raises(AutoDDPMError, match="benchmarks model 'tiny', not 'other'"):
        record_validation(run, other)
    with pytest.raises(AutoDDPMError, match="not a finished benchmark run"):
        record_validation(tmp_path, model)


def _measured(rows):
    """Rows without what a run measures of itself (time, memory): what the maps and thresholds decide."""
    return [{k: v for k, v in r.items() if not k.startswith(("seconds", "peak_rss", "cuda_peak"))} for r in rows]


def test_runs_of_some_methods_each_join_into_the_one_run(tiny_model, data_root, tmp_path, capsys):
    from AutoDDPMLib.cli import main

    settings = dict(quick=True, datasets=["lgg", "ixi"], max_images=1, reference_cases=1, calibration_slices_count=2,
                    device="cpu", backend="torch", figures=False)
    whole = run_benchmark(model=str(tiny_model), output_dir=tmp_path / "whole", data=data_root, **settings)
    # The residual without its AutoDDPM run, AnoDDPM levels apart from each other: each draws the one run's noise.
    run_benchmark(model=str(tiny_model), output_dir=tmp_path / "a", data=data_root, methods=["anoddpm-50", "residual-fast"], **settings)
    run_benchmark(model=str(tiny_model), output_dir=tmp_path / "b", data=data_root,
                  methods=["fast", "reference", "anoddpm-100", "anoddpm-200", "anoddpm-300", "anoddpm-499", "intensity"],
                  **{**settings, "figures": True})
    assert main(["benchmark-merge", str(tmp_path / "b"), str(tmp_path / "a"), "--output-dir", str(tmp_path / "joined")]) == 0
    joined = json.loads((tmp_path / "joined" / "results.json").read_text())
    assert _measured(joined) == _measured(whole)
    meta = json.loads((tmp_path / "joined" / "meta.json").read_text())
    assert meta["methods"] == json.loads((tmp_path / "whole" / "meta.json").read_text())["methods"]
    assert len(meta["merged"]) == 2 and any(n.startswith("Joined from 2 runs") for n in meta["notes"])
    report = (tmp_path / "joined" / "results.md").read_text()
    assert "| method |" in report and "examples.png" in report and "tradeoff.png" in report
    # AutoDDPM fast's example cases come from the piece that ran it; the trade-off curve is drawn from all rows.
    assert (tmp_path / "joined" / "examples.png").read_bytes() == (tmp_path / "b" / "examples.png").read_bytes()
    assert (tmp_path / "joined" / "tradeoff.png").stat().st_size > 0


def test_only_runs_of_one_benchmark_join_and_each_method_once(tiny_model, data_root, tmp_path):
    from AutoDDPMLib.benchmark.merge import merge_benchmarks
    from AutoDDPMLib.errors import AutoDDPMError

    settings = dict(model=str(tiny_model), data=data_root, quick=True, datasets=["ixi"], max_images=1, reference_cases=1,
                    calibration_slices_count=2, device="cpu", backend="torch", figures=False)
    with pytest.raises(AutoDDPMError, match="unknown method.*anoddpm-7.*choose from fast"):
        run_benchmark(output_dir=tmp_path / "x", methods=["anoddpm-7"], **settings)
    run_benchmark(output_dir=tmp_path / "a", methods=["anoddpm-50"], **settings)
    run_benchmark(output_dir=tmp_path / "b", methods=["anoddpm-50", "intensity"], **settings)
    run_benchmark(output_dir=tmp_path / "c", methods=["intensity"], seed=1, **settings)
    with pytest.raises(AutoDDPMError, match="AnoDDPM t=50 was run by both"):
        merge_benchmarks([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    with pytest.raises(AutoDDPMError, match="different benchmarks"):
        merge_benchmarks([tmp_path / "a", tmp_path / "c"], tmp_path / "out")
    with pytest.raises(AutoDDPMError, match="is one of the runs"):
        merge_benchmarks([tmp_path / "a"], tmp_path / "a")
    with pytest.raises(AutoDDPMError, match="not a finished benchmark run"):
        merge_benchmarks([tmp_path / "a", tmp_path / "x"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written from a refused join
    rows = merge_benchmarks([tmp_path / "a"], tmp_path / "out", figures=False)
    assert {r["method"] for r in rows} == {"AnoDDPM t=50"}
    assert any(n.startswith("Not run (no rows): AutoDDPM fast") for n in json.loads((tmp_path / "out" / "meta.json").read_text())["notes"])


def test_a_run_without_matplotlib_says_so_in_its_meta(tiny_model, data_root, tmp_path, monkeypatch):
    from AutoDDPMLib.benchmark.merge import merge_benchmarks

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets where it is not installed
    run_benchmark(model=str(tiny_model), output_dir=tmp_path / "run", data=data_root, quick=True, datasets=["ixi"],
                  max_images=1, calibration_slices_count=2, methods=["intensity"], device="cpu", backend="torch")
    merge_benchmarks([tmp_path / "run"], tmp_path / "joined")
    for folder in ("run", "joined"):
        notes = json.loads((tmp_path / folder / "meta.json").read_text())["notes"]
        assert any(n.startswith("matplotlib is not installed") for n in notes), folder
        assert not list((tmp_path / folder).glob("*.png"))
