"""tools/train_on_gpu.sh: without the training data it says what to prepare; with it, a smoke run on the CPU."""

import os
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk
from conftest import make_head_volume

from AutoDDPMLib.cli import main
from AutoDDPMLib.models.bundle import read_card, resolve_model

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "train_on_gpu.sh"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_without_arguments_it_shows_its_usage():
    proc = run_script()
    assert proc.returncode == 2 and "train_on_gpu.sh OUTPUT_DIR [MINUTES]" in proc.stderr


def test_without_slices_or_data_it_says_how_to_prepare_them(tmp_path):
    proc = run_script(str(tmp_path / "out"), "1", AUTODDPM_DEVICE="cpu", AUTODDPM_DATA=str(tmp_path / "no-data"))
    assert proc.returncode == 2
    assert "autoddpm prepare-slices --data ../shared/data/lgg_flair/train --image-size 64" in proc.stderr
    assert not any((tmp_path / "out").glob("flair-lgg-*"))


def test_an_unknown_run_is_refused_before_anything_is_made(tmp_path):
    proc = run_script(str(tmp_path / "out"), "1", AUTODDPM_DEVICE="cpu", RUNS="flair-lgg-aug flair-lgg-128")
    assert proc.returncode == 2 and "unknown run 'flair-lgg-128' in RUNS" in proc.stderr
    assert not any((tmp_path / "out").iterdir())


def test_a_cpu_smoke_run_trains_both_runs_and_keeps_snapshots(tmp_path):
    # The script a GPU session runs, end to end on the CPU with a few synthetic slices: one step of each run
    # (it stops after 0.01 minutes), each keeping that step as a snapshot to choose from on the development sets.
    data = tmp_path / "healthy"
    data.mkdir()
    sitk.WriteImage(make_head_volume(lesion=False), str(data / "h_flair.nii.gz"))
    for grid in (64, 96):
        assert main(["prepare-slices", "--data", str(data), "--image-size", str(grid),
                     "--output", str(tmp_path / f"slices-{grid}.safetensors")]) == 0
    out = tmp_path / "out"
    proc = run_script(str(out), "0.01", str(tmp_path / "slices-64.safetensors"), str(tmp_path / "slices-96.safetensors"),
                      AUTODDPM_DEVICE="cpu", SNAPSHOT_STEPS="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = read_card(resolve_model("flair-lgg"))
    for run, grid in (("flair-lgg-aug", 64), ("flair-lgg-96", 96)):
        snapshot = read_card(out / run / "snapshots" / "step-000001")
        assert snapshot.image_size == grid and snapshot.data["training"]["steps"] == 1
        # The run's bundle takes flair-lgg's post-processing; the snapshots get it where they are compared.
        assert read_card(out / run).postprocessing == shipped.postprocessing
    assert "tools/compare_checkpoints.py flair-lgg" in proc.stdout
