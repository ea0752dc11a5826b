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


def test_sample_data_is_the_shipped_file_with_its_checksum(monkeypatch: pytest.MonkeyPatch) -> None:
    import AutoDDPM

    registered = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kwargs: registered.append(kwargs))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    AutoDDPM.registerSampleData()
    assert len(registered) == 1
    entry = registered[0]
    assert entry["sampleName"] == entry["nodeNames"] == "TCGA_LGG_FLAIR"
    # A local file URI that Sample Data can fetch with urllib, and the checksum of exactly that file.
    with urllib.request.urlopen(entry["uris"]) as response:
        content = response.read()
    assert content == (ROOT / "Resources" / "SampleData" / "TCGA_LGG_FLAIR.nii.gz").read_bytes()
    assert entry["checksums"] == "SHA256:" + hashlib.sha256(content).hexdigest()
    assert entry["fileNames"] == "TCGA_LGG_FLAIR.nii.gz"
    assert Path(entry["thumbnailFileName"]).is_file()
