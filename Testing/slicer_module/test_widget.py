"""The module panel's own code (AutoDDPMWidget) on stand-in widgets read from AutoDDPM.ui, against real MRML.

Qt does not run here: standins.load_ui gives each widget of the .ui a stand-in
whose signals run their slots at once, and the parameter node wrapper binds the
slider and node selectors as Slicer's does. What the panel does with them (which
threshold it shows, what it re-thresholds, what it says) is the module's code.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import types
import warnings
from pathlib import Path

import pytest
import standins
from scene_helpers import add_head_volume, segment_voxels


@pytest.fixture()
def make_panel(scene, monkeypatch: pytest.MonkeyPatch):
    """Makes the module panel as Slicer sets it up when the module is first entered."""
    import slicer

    import AutoDDPM

    monkeypatch.setattr(slicer.util, "loadUI", standins.load_ui)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", standins.child_widget_variables)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kwargs: None)
    panels = []

    def make():
        widget = AutoDDPM.AutoDDPMWidget(types.SimpleNamespace(isEntered=True))
        panels.append(widget)
        widget.setup()
        return widget

    yield make
    for widget in panels:
        widget.cleanup()


@pytest.fixture()
def panel(make_panel):
    return make_panel()


def test_panel_starts_with_the_default_model_and_its_threshold(panel) -> None:
    from AutoDDPM import DEFAULT_MODEL, AutoDDPMLogic

    parameters = panel._parameterNode
    assert parameters.model == DEFAULT_MODEL
    assert parameters.threshold == AutoDDPMLogic.calibratedThreshold(None, parameters.schedule)
    assert panel.ui.thresholdSliderWidget.value == parameters.threshold
    assert Path(panel.ui.modelComboBox.itemData(panel.ui.modelComboBox.currentIndex)).name == DEFAULT_MODEL
    assert panel.ui.applyButton.text == "Apply" and not panel.ui.applyButton.enabled  # no input volume yet
    assert panel.ui.statusLabel.text == ""


def no_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An extension installed without its Resources folder."""
    from AutoDDPMLib import resources

    monkeypatch.delenv("AUTODDPM_RESOURCES", raising=False)
    monkeypatch.setattr(resources, "_PACKAGE_DIR", tmp_path / "lib" / "AutoDDPMLib")
    return "cannot find the AutoDDPM Resources folder"


def corrupt_default_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The default model's card damaged (a failed update, a disk error)."""
    from AutoDDPM import DEFAULT_MODEL

    card = tmp_path / "Resources" / "Models" / DEFAULT_MODEL / "model.json"
    card.parent.mkdir(parents=True)
    card.write_text('{"name": ')
    monkeypatch.setenv("AUTODDPM_RESOURCES", str(card.parents[2]))
    return "is not valid JSON"


@pytest.mark.parametrize("break_install", [no_resources, corrupt_default_model])
def test_a_broken_install_shows_a_message_in_a_working_panel(make_panel, scene, tiny_model, tmp_path, monkeypatch,
                                                             break_install) -> None:
    message = break_install(tmp_path, monkeypatch)
    panel = make_panel()
    # The panel is set up to the end and says what is wrong, once.
    assert message in panel.ui.statusLabel.text
    assert sum(message in line for line in panel.ui.logTextEdit.lines) == 1
    assert panel.ui.applyButton.text == "Apply" and not panel.ui.progressBar.visible
    # It still works: an input volume enables Apply, whose run then fails with the message.
    volume = add_head_volume(scene, tmp_path)
    panel._parameterNode.inputVolume = volume
    assert panel.ui.applyButton.enabled
    with pytest.raises(ValueError, match=message):
        panel.logic.process(volume, model=panel._parameterNode.model or None)
    # A model folder can still be chosen, with its threshold.
    panel.selectModel(str(tiny_model))
    panel.onModelActivated(panel.ui.modelComboBox.currentIndex)
    assert panel._parameterNode.model == str(tiny_model) and panel._parameterNode.threshold == 0.05


def choose_model(panel, folder: Path) -> None:
    """The user picks a model in the combo box (a folder loaded before, or a bundled model)."""
    panel.selectModel(str(folder))
    panel.onModelActivated(panel.ui.modelComboBox.currentIndex)


def test_a_new_model_or_schedule_leaves_the_results_as_their_run_made_them(panel, scene, tiny_model_with, temp_root,
                                                                         tmp_path) -> None:
    from AutoDDPM import AutoDDPMLogic, Schedule

    fast = {"mask_tau": 0.05, "anomaly": 0.05}
    model = tiny_model_with("model", thresholds=dict(fast, schedules={"reference": {"mask_tau": 0.2, "anomaly": 0.3}}))
    other = tiny_model_with("other", thresholds={"mask_tau": 0.05, "anomaly": 0.02})
    parameters, slider = panel._parameterNode, panel.ui.thresholdSliderWidget
    choose_model(panel, model)
    assert parameters.threshold == slider.value == 0.05
    # Apply, as the panel runs it: the Logic, then the panel takes the result.
    parameters.inputVolume = add_head_volume(scene, tmp_path)
    result = panel.logic.process(parameters.inputVolume, model=parameters.model, threshold=parameters.threshold)
    panel.onProcessingCompleted(result)
    segmentation = parameters.outputSegmentation
    assert panel.ui.outputSegmentationSelector.currentNode() is segmentation
    made = (segmentation.GetAttribute("AutoDDPM.Threshold"), segment_voxels(segmentation), panel.ui.summaryLabel.text)
    assert float(made[0]) == 0.05 and made[1] == result.engineSummary["anomalous_voxels"] > 0

    def as_made() -> tuple:
        return segmentation.GetAttribute("AutoDDPM.Threshold"), segment_voxels(segmentation), panel.ui.summaryLabel.text

    # Another schedule (as its combo box sets it), another model: the next run's threshold, not the result's.
    parameters.schedule = Schedule.reference
    assert parameters.threshold == slider.value == 0.3
    assert as_made() == made
    choose_model(panel, other)
    assert parameters.threshold == slider.value == AutoDDPMLogic.calibratedThreshold(str(other), Schedule.reference)
    assert as_made() == made
    # The scene's parameters shown again (leaving and re-entering the scene, the slider elsewhere meanwhile).
    panel.setParameterNode(None)
    wasBlocked = slider.blockSignals(True)
    slider.value = 0.5
    slider.blockSignals(wasBlocked)
    panel.initializeParameterNode()
    assert slider.value == parameters.threshold != 0.5
    assert as_made() == made
    # The user moving the slider re-thresholds the result, live.
    slider.value = 0.01
    assert float(segmentation.GetAttribute("AutoDDPM.Threshold")) == parameters.threshold == 0.01
    assert segment_voxels(segmentation) > made[1]
    assert "0.01" in panel.ui.summaryLabel.text


def test_a_model_folder_gone_since_it_was_chosen_is_said_on_a_schedule_change(panel, tiny_model_with) -> None:
    from AutoDDPM import Schedule

    model = tiny_model_with("moved-away")
    choose_model(panel, model)
    shutil.rmtree(model)
    panel._parameterNode.schedule = Schedule.reference
    assert "unknown model" in panel.ui.statusLabel.text
    assert panel._parameterNode.threshold == panel.ui.thresholdSliderWidget.value == 0.05


def is_ours(name: str) -> bool:
    return name == "AutoDDPM" or name == "AutoDDPMLib" or name.startswith("AutoDDPMLib.")


@pytest.fixture()
def loaded_modules():
    """The module and AutoDDPMLib as loaded now (old module names included); put back afterwards for the other tests."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        importlib.import_module("AutoDDPMLib.bundle")  # an old name, as a script of 0.1.0 imports it
    saved = {name: module for name, module in sys.modules.items() if is_ours(name)}
    meta_path = list(sys.meta_path)
    yield saved
    for name in [name for name in sys.modules if is_ours(name)]:
        del sys.modules[name]
    sys.modules.update(saved)
    sys.meta_path[:] = meta_path


def test_reload_runs_autoddpmlib_again(panel, loaded_modules) -> None:
    panel.onReload()
    reloaded = sys.modules["AutoDDPM"]
    lib = {name: module for name, module in sys.modules.items() if is_ours(name) and name != "AutoDDPM"}
    # Every AutoDDPMLib module the reloaded module uses ran again from its file: an edit there takes effect ...
    assert {"AutoDDPMLib.errors", "AutoDDPMLib.models.bundle", "AutoDDPMLib.slicer_bridge.results"} <= set(lib)
    assert not [name for name, module in lib.items() if module is loaded_modules.get(name)]
    # ... and each sees the others' new classes: the panel still catches what the engine's helpers raise.
    assert reloaded.AutoDDPMError is lib["AutoDDPMLib.models.bundle"].AutoDDPMError
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        reloaded.AutoDDPMLogic.modelFolder("no-such-model")
    # An old module name leads to the new module, through the one finder of the new package.
    with pytest.warns(DeprecationWarning, match="moved to AutoDDPMLib.models.bundle"):
        assert importlib.import_module("AutoDDPMLib.bundle") is lib["AutoDDPMLib.models.bundle"]
    assert [type(finder).__module__ for finder in sys.meta_path].count("AutoDDPMLib.legacy_paths") == 1
