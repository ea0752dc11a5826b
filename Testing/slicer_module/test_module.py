"""The module class and the sample data registration, with a stand-in application object."""

from __future__ import annotations

import hashlib
import sys
import types
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class FakeApp:
    def __init__(self) -> None:
        self.connections = []

    def connect(self, signal: str, slot) -> None:
        self.connections.append((signal, slot))


def test_module_description_is_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    import slicer

    import AutoDDPM

    app = FakeApp()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    parent = types.SimpleNamespace()
    AutoDDPM.AutoDDPM(parent)
    # What Slicer's generic module test checks, and a little more.
    assert parent.title == "AutoDDPM"
    assert parent.categories == ["Segmentation"]
    assert parent.contributors and parent.helpText and parent.acknowledgementText
    assert "no data is sent anywhere" in parent.helpText
    # Sample data is registered once the application has started, not at import.
    assert app.connections == [("startupCompleted()", AutoDDPM.registerSampleData)]


def test_sample_data_registers_every_shipped_volume_with_its_checksum_and_thumbnail(monkeypatch: pytest.MonkeyPatch) -> None:
    import AutoDDPM

    registered = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kwargs: registered.append(kwargs))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    AutoDDPM.registerSampleData()
    folder = ROOT / "Resources" / "SampleData"
    shipped = sorted(path.name for path in folder.glob("*.nii.gz") if not path.name.endswith("_mask.nii.gz"))
    # The FLAIR volume and the T1 samples, each once, the FLAIR first (the module's own test loads it by name).
    assert sorted(entry["fileNames"] for entry in registered) == shipped and len(shipped) >= 4
    assert registered[0]["sampleName"] == "TCGA_LGG_FLAIR"
    for entry in registered:
        assert entry["category"] == "AutoDDPM"
        assert entry["sampleName"] == entry["nodeNames"] == entry["fileNames"].removesuffix(".nii.gz")
        # A local file URI that Sample Data can fetch with urllib, and the checksum of exactly that file.
        with urllib.request.urlopen(entry["uris"]) as response:
            content = response.read()
        assert content == (folder / entry["fileNames"]).read_bytes()
        assert entry["checksums"] == "SHA256:" + hashlib.sha256(content).hexdigest()
        # Its own thumbnail: a small PNG beside it.
        thumbnail = Path(entry["thumbnailFileName"])
        assert thumbnail == folder / (entry["sampleName"] + ".png")
        assert thumbnail.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and thumbnail.stat().st_size < 16_000


def test_the_default_self_test_runs_without_pytorch(scene, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """What Slicer's build machines run (ctest, the SelfTests module): no PyTorch there, nothing installed."""
    import AutoDDPM
    import standins

    monkeypatch.setitem(sys.modules, "torch", None)  # any import of torch fails, find_spec says it is missing
    monkeypatch.delenv("AUTODDPM_FULL_SELF_TEST", raising=False)
    sample_data = standins.sample_data_module()
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    # Without PyTorch, setupPythonRequirements would need the PyTorch extension and raise: it is not called.
    AutoDDPM.AutoDDPMTest().runTest()
    assert "AUTODDPM_FULL_SELF_TEST=1" in caplog.text
    # It loaded the sample and re-thresholded a map into a segmentation.
    assert scene.GetFirstNodeByName("TCGA_LGG_FLAIR") is not None
    assert scene.GetFirstNodeByClass("vtkMRMLSegmentationNode").GetAttribute("AutoDDPM.Threshold")
