"""tools/interpolate_weights.py: the WiSE-FT mix of a model and its continuation, written as a bundle."""

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from AutoDDPMLib.models.bundle import WEIGHTS_FILE, read_card, resolve_model

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "interpolate_weights.py"


def interpolate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_the_mix_is_the_weighted_sum_with_the_tuned_models_card(tmp_path):
    # The two bundled models share one network, so they stand in for a model and its continuation.
    start, tuned = resolve_model("flair-lgg"), resolve_model("t1-ixi-midaxial")
    proc = interpolate("flair-lgg", "t1-ixi-midaxial", "0.25", str(tmp_path / "mix"))
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(str(start / WEIGHTS_FILE)), load_file(str(tuned / WEIGHTS_FILE))
    mixed = load_file(str(tmp_path / "mix" / WEIGHTS_FILE))
    assert mixed.keys() == a.keys()
    for name, t in mixed.items():
        assert t.dtype == torch.float16
        expected = (0.75 * a[name].float() + 0.25 * b[name].float()).half()
        assert torch.equal(t, expected), name
    card = read_card(tmp_path / "mix")
    assert card.name == "t1-ixi-midaxial"
    assert card.data["training"]["interpolated"]["alpha"] == 0.25


def test_an_alpha_outside_zero_to_one_is_refused_before_anything_is_written(tmp_path):
    proc = interpolate("flair-lgg", "t1-ixi-midaxial", "1.5", str(tmp_path / "mix"))
    assert proc.returncode == 1 and "alpha 1.5 is outside [0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mix").exists()
