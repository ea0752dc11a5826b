"""Fixtures for testing the Slicer module's Logic against real MRML (the ``slicer-core`` package).

The engine runs for real, as a separate process, with the tiny model of
Testing/conftest.py; only Qt, the scripted-module base classes and the
application start-up are stand-ins (standins.py).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
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


@pytest.fixture(scope="session")
def stripped_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with post-processing, calibrated on the sample FLAIR with and without its skull
    (`autoddpm calibrate --with-stripped`): its card has a threshold for inputs with skull and one for
    skull-stripped inputs, and says the model does not cover stripped scans (the engine warns of them)."""
    from AutoDDPMLib.cli import main
    from AutoDDPMLib.resources import resources_dir

    folder = tmp_path_factory.mktemp("stripped") / "model"
    shutil.copytree(tiny_model, folder)
    card = json.loads((folder / "model.json").read_text())
    # The post-processing of the shipped models (parts under 30 mm^3 dropped).
    postprocessing = {"polarity": "bright", "brain_erosion_mm": 2.0, "median_mm": 3.0, "min_component_mm3": 30.0}
    card.update(postprocessing=postprocessing, covers={"skull_stripped": False})
    (folder / "model.json").write_text(json.dumps(card))
    data = folder.parent / "data"
    data.mkdir()
    samples = resources_dir() / "SampleData"
    shutil.copy(samples / "TCGA_LGG_FLAIR.nii.gz", data / "p0_flair.nii.gz")
    shutil.copy(samples / "TCGA_LGG_FLAIR_mask.nii.gz", data / "p0_mask.nii.gz")
    assert main(["calibrate", str(folder), "--data", str(data), "--max-slices", "4", "--with-stripped"]) == 0
    return folder
