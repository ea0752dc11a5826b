"""Fixtures for testing the Slicer module's Logic against real MRML (the ``slicer-core`` package).

The engine runs for real, as a separate process, with the tiny model of
Testing/conftest.py; only Qt, the scripted-module base classes and the
application start-up are stand-ins (standins.py).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "AutoDDPM"

if importlib.util.find_spec("slicer_core") is None:
    # Without slicer-core (pip install -r Testing/slicer_module/requirements.txt) there is no MRML to test against.
    collect_ignore_glob = ["test_*.py"]
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
