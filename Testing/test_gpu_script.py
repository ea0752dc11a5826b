"""tools/train_on_gpu.sh on a machine without the training data: it says what to prepare, and trains nothing."""

import os
import subprocess
import sys
from pathlib import Path

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
