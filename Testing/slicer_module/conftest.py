"""Fixtures for testing the Slicer module's Logic against real MRML (the ``slicer-core`` package).

The engine runs for real, as a separate process, with the tiny model of
Testing/conftest.py; only Qt, the scripted-module base classes and the
application start-up are stand-ins (standins.py).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "AutoDDPM"


class SkippedModule(pytest.Module):
    """A test file of this folder where slicer-core is missing: reported as skipped, with the reason."""

    def collect(self) -> NoReturn:
        # Its imports need slicer-core, so its tests cannot be collected one by one; the reason says how many.
        tests = sum(isinstance(node, ast.FunctionDef) and node.name.startswith("test")
                    for node in ast.parse(self.path.read_text(encoding="utf-8")).body)
        pytest.skip(f"{self.path.name}: {tests} Slicer-module tests not run, slicer-core is not installed "
                    f"(pip install -r Testing/slicer_module/requirements.txt)")


if importlib.util.find_spec("slicer_core") is None:
    # Without slicer-core there is no MRML to test against; the tests show as skipped rather than vanish.
    def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module:
        return SkippedModule.from_parent(parent, path=module_path)
else:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import standins

    standins.install()
    sys.path.insert(0, str(MODULE_DIR))
    from scene_helpers import new_scene


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine processes inherit this: they share two cores with other work.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture()
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder the Logic makes its temporary folders in (outside Slicer: the system temp folder)."""
    root = tmp_path / "temp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture()
def scene():
    return new_scene()


@pytest.fixture()
def logic():
    from AutoDDPM import AutoDDPMLogic

    logic = AutoDDPMLogic()
    yield logic
    logic.cancel()
