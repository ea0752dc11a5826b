"""Without slicer-core the Slicer-module tests are reported as skipped, with the reason, instead of vanishing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLICER_TESTS = ROOT / "Testing" / "slicer_module"

# pytest in a process where the two packages slicer-core installs cannot be imported, as in an install
# without Testing/slicer_module/requirements.txt (find_spec gives None for a module set to None).
WITHOUT_SLICER_CORE = ("import sys; sys.modules['slicer_core'] = sys.modules['slicer'] = None; "
                       "import pytest; sys.exit(pytest.main(sys.argv[1:]))")


def test_slicer_module_tests_are_skipped_with_the_reason_without_slicer_core() -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_SLICER_CORE, "-p", "no:cacheprovider", "-rs", str(SLICER_TESTS)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    test_files = sorted(SLICER_TESTS.glob("test_*.py"))
    assert test_files
    # Exit code 5: no test ran, which is right when every one is skipped.
    assert result.returncode == 5, result.stdout + result.stderr
    assert f"{len(test_files)} skipped" in result.stdout, result.stdout
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    for test_file in test_files:
        assert any(f"{test_file.name}: " in line and "slicer-core is not installed" in line
                   and "pip install -r Testing/slicer_module/requirements.txt" in line for line in skipped), result.stdout
