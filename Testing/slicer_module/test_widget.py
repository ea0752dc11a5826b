"""The module panel's own code (AutoDDPMWidget) on stand-in widgets read from AutoDDPM.ui, against real MRML.

Qt does not run here: standins.load_ui gives each widget of the .ui a stand-in
whose signals run their slots at once, and the parameter node wrapper binds the
slider and node selectors as Slicer's does. What the panel does with them (which
threshold it shows, what it re-thresholds, what it says) is the module's code.
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import standins
from scene_helpers import add_head_volume, add_image_volume, segment_voxels, stripped_sample

from AutoDDPMLib.volumes.brain_extraction import deepbet_available


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
    calibrated = AutoDDPMLogic.calibratedThreshold(None, parameters.schedule)
    assert parameters.threshold == calibrated
    # The slider shows it with three significant digits (0.00568, not 0.006), in a range made for it.
    slider = panel.ui.thresholdSliderWidget
    assert slider.value == float(f"{calibrated:.3g}") and slider.singleStep == 10.0 ** -slider.decimals
    assert slider.minimum == 0 and calibrated < slider.maximum <= 20 * calibrated
    assert f"{calibrated:.3g}" in panel.ui.resetThresholdButton.text and panel.ui.resetThresholdButton.enabled
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


def settle(panel) -> None:
    """Let the slider rest: Qt's event loop runs the panel's timer, as it does once the user stops moving it."""
    from AutoDDPM import SETTLE_MSEC

    standins.process_events(2 * SETTLE_MSEC / 1000.0)
    assert not panel._settleTimer.isActive()


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
    # The user moving the slider re-thresholds the result, live: once the slider rests, it is the engine's mask.
    slider.value = 0.01
    assert parameters.threshold == 0.01 and segment_voxels(segmentation) > made[1]
    settle(panel)
    assert float(segmentation.GetAttribute("AutoDDPM.Threshold")) == 0.01
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


POSTPROCESSING = {"polarity": "bright", "brain_erosion_mm": 2.0, "median_mm": 3.0, "min_component_mm3": 30.0}


@pytest.fixture()
def postprocessed_model(tiny_model_with) -> Path:
    """The tiny model with the post-processing of the shipped ones (parts under 30 mm^3 dropped) and a threshold
    calibrated on its post-processed map."""
    thresholds = {"mask_tau": 0.05, "anomaly": 0.05, "calibrated": True, "calibration": {"schedule": "fast"},
                  "postprocessed": {"anomaly": 0.002, "mask_tau": 0.05, "settings": POSTPROCESSING}}
    return tiny_model_with("pp", postprocessing=POSTPROCESSING, thresholds=thresholds,
                           license="CC BY-NC-SA 4.0 (non-commercial)")


def run_in_panel(panel, scene, folder: Path, model: Path):
    """Apply as the panel runs it (the Logic, then the panel takes the result); returns the result."""
    choose_model(panel, model)
    parameters = panel._parameterNode
    parameters.inputVolume = add_head_volume(scene, folder)
    result = panel.logic.process(parameters.inputVolume, model=parameters.model, threshold=parameters.threshold)
    panel.onProcessingCompleted(result)
    return result


def engine_mask(anomaly: np.ndarray, spacing, threshold: float) -> np.ndarray:
    """The command line's mask of a post-processed map (detection.map_filters, what `autoddpm run` writes)."""
    from AutoDDPMLib.detection.map_filters import anomaly_mask
    from AutoDDPMLib.detection.postprocessing import PostProcessing

    return anomaly_mask(anomaly, threshold, spacing, PostProcessing.from_dict(POSTPROCESSING))


def test_a_slider_tick_thresholds_at_once_and_the_resting_slider_gives_the_engines_mask(
        panel, scene, postprocessed_model, temp_root, tmp_path) -> None:
    import slicer

    result = run_in_panel(panel, scene, tmp_path, postprocessed_model)
    anomaly = slicer.util.arrayFromVolume(result.anomalyMapVolume)
    spacing = result.anomalyMapVolume.GetSpacing()
    slider, segmentation = panel.ui.thresholdSliderWidget, result.segmentation
    # A threshold the slider can show, where the map has parts smaller than the model keeps.
    quantiles = np.quantile(anomaly[anomaly > 0], [0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
    candidates = [round(float(t), slider.decimals) for t in quantiles]
    threshold = next(t for t in candidates if engine_mask(anomaly, spacing, t).sum() < (anomaly > t).sum())
    slider.value = threshold
    # The tick: every voxel above the threshold, at once; the stored threshold is still the settled one.
    assert segment_voxels(segmentation) == int((anomaly > threshold).sum())
    assert float(segmentation.GetAttribute("AutoDDPM.Threshold")) == result.threshold
    assert "parts are counted when the slider rests" in panel.ui.summaryLabel.text
    # At rest: the command line's mask at that threshold, measured.
    settle(panel)
    expected = engine_mask(anomaly, spacing, threshold)
    assert 0 < segment_voxels(segmentation) == int(expected.sum())
    assert float(segmentation.GetAttribute("AutoDDPM.Threshold")) == threshold
    summary = panel.logic.measure(segmentation)
    assert summary.voxels == int(expected.sum()) and f"{threshold:.3g}" in panel.ui.summaryLabel.text
    assert f"{summary.components} part(s)" in panel.ui.summaryLabel.text
    # Ticks in a row settle once, at the last value.
    for value in (2 * threshold, 1.5 * threshold, threshold):
        slider.value = value
    settle(panel)
    assert segment_voxels(segmentation) == int(expected.sum())


def test_the_slider_follows_the_map_and_one_click_returns_to_the_calibrated_threshold(
        panel, scene, postprocessed_model, temp_root, tmp_path) -> None:
    import slicer

    result = run_in_panel(panel, scene, tmp_path, postprocessed_model)
    engine_voxels = result.engineSummary["anomalous_voxels"]
    anomaly = slicer.util.arrayFromVolume(result.anomalyMapVolume)
    slider, reset = panel.ui.thresholdSliderWidget, panel.ui.resetThresholdButton
    # The range spans the map's values, not 0..1; the calibrated 0.002 shows as 0.00200 and is marked on the button.
    assert slider.minimum == 0 and 2 * 0.002 <= slider.maximum <= float(anomaly.max()) + slider.singleStep
    assert slider.decimals == 5 and slider.singleStep == 1e-5 and slider.value == 0.002
    assert "0.002" in reset.text and reset.enabled
    # Elsewhere, then one click back: the engine's own mask again.
    slider.value = slider.maximum / 2
    settle(panel)
    assert segment_voxels(result.segmentation) != engine_voxels
    reset.emit("clicked(bool)", False)
    assert panel._parameterNode.threshold == 0.002 and slider.value == 0.002
    assert segment_voxels(result.segmentation) == engine_voxels
    assert float(result.segmentation.GetAttribute("AutoDDPM.Threshold")) == 0.002
    assert not panel._settleTimer.isActive()


def test_a_non_commercial_model_is_acknowledged_once_before_its_first_run(
        panel, scene, postprocessed_model, temp_root, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Apply as the user presses it: the licence question, the run in the background with its timing, the result
    with what made it."""
    import slicer

    monkeypatch.setattr(slicer, "app", standins.Application(str(temp_root)), raising=False)
    monkeypatch.setattr(standins.QSettings, "values", {})
    questions, answers = [], [False, True]
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda text, windowTitle=None, **kwargs: questions.append(text) or answers.pop(0))
    choose_model(panel, postprocessed_model)
    parameters = panel._parameterNode
    parameters.inputVolume = add_head_volume(scene, tmp_path)
    assert "CC BY-NC-SA 4.0" in panel.ui.modelInfoLabel.text
    # Declined: nothing runs, the panel says why.
    panel.onApplyButton()
    assert len(questions) == 1 and "non-commercial purposes only" in questions[0]
    assert not panel.logic.isRunning and "not acknowledged" in panel.ui.statusLabel.text
    # Accepted: it runs; the progress bar shows the elapsed time and, once the rate is known, what is left.
    formats = []
    onProgress = panel.onProgress
    monkeypatch.setattr(panel, "onProgress", lambda event: (onProgress(event), formats.append(panel.ui.progressBar.format)))
    panel.onApplyButton()
    assert len(questions) == 2 and panel.logic.isRunning
    while panel.logic.isRunning:
        standins.process_events()
    assert any("elapsed" in text for text in formats)
    assert any(re.search(r"\d+:\d\d elapsed, about \d+:\d\d left", text) for text in formats)
    # The result says what made it; the licence is remembered, the next run asks nothing.
    segmentation = parameters.outputSegmentation
    assert segmentation is not None and segment_voxels(segmentation) > 0
    info = panel.ui.resultInfoLabel.text
    assert "fast schedule" in info and "CC BY-NC-SA 4.0" in info and "0.002" in info
    assert "tiny" in info or postprocessed_model.name in info
    panel.onApplyButton()
    assert len(questions) == 2
    while panel.logic.isRunning:
        standins.process_events()
    assert slicer.app.overrideCursors == 0


def test_the_console_api_says_the_license_and_does_not_ask(
        logic, scene, postprocessed_model, temp_root, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    volume = add_head_volume(scene, tmp_path)
    with caplog.at_level(logging.WARNING):
        result = logic.process(volume, model=str(postprocessed_model))
    assert result.state == "done"
    assert any("non-commercial purposes only" in record.getMessage() and record.levelno == logging.WARNING
               for record in caplog.records)


def test_a_saved_and_reopened_scene_shows_its_result_in_the_panel_and_rethresholds_it(
        make_panel, scene, postprocessed_model, temp_root, tmp_path) -> None:
    import slicer

    from scene_helpers import save_and_reopen

    panel = make_panel()
    result = run_in_panel(panel, scene, tmp_path, postprocessed_model)
    info, engine_voxels = panel.ui.resultInfoLabel.text, result.engineSummary["anomalous_voxels"]
    assert "Made by model" in info and "fast schedule" in info
    saved = tmp_path / "saved"
    saved.mkdir()
    panel.onSceneStartClose(None, None)
    reopened = save_and_reopen(scene, saved)

    # Slicer started again on the saved scene: a new panel finds the result through the parameter node.
    panel = make_panel()
    segmentation = panel.ui.outputSegmentationSelector.currentNode()
    assert segmentation is not None and segmentation.GetScene() is reopened
    assert panel.currentResult() is segmentation and panel.ui.resultInfoLabel.text == info
    assert "0.002" in panel.ui.resetThresholdButton.text and panel.ui.thresholdSliderWidget.maximum < 1
    anomaly = slicer.util.arrayFromVolume(segmentation.GetNodeReference("AutoDDPM.AnomalyMap"))
    threshold = round(0.5 * result.threshold, panel.ui.thresholdSliderWidget.decimals)
    panel.ui.thresholdSliderWidget.value = threshold
    assert segment_voxels(segmentation) == int((anomaly > threshold).sum())
    settle(panel)
    expected = engine_mask(anomaly, segmentation.GetNodeReference("AutoDDPM.AnomalyMap").GetSpacing(), threshold)
    assert segment_voxels(segmentation) == int(expected.sum())
    panel.ui.resetThresholdButton.emit("clicked(bool)", False)
    assert segment_voxels(segmentation) == engine_voxels


@pytest.fixture()
def deepbet_model(tiny_model_with) -> Path:
    """The post-processed tiny model with a threshold calibrated for deepbet's brain region too (0.003 beside the
    head region's 0.002), as `autoddpm calibrate --with-deepbet` writes it; a licence that asks nothing."""
    from AutoDDPMLib.detection.postprocessing import option_settings

    deepbet = {"anomaly": 0.003, "mask_tau": 0.05, "settings": option_settings("deepbet", POSTPROCESSING)}
    thresholds = {"mask_tau": 0.05, "anomaly": 0.05, "calibrated": True, "calibration": {"schedule": "fast"},
                  "postprocessed": {"anomaly": 0.002, "mask_tau": 0.05, "settings": POSTPROCESSING},
                  "postprocessed_alternatives": [deepbet]}
    return tiny_model_with("deepbet", postprocessing=POSTPROCESSING, thresholds=thresholds, license="CC BY-SA 3.0")


def never_asked(text, *args, **kwargs) -> bool:
    pytest.fail(f"the panel asked: {text}")


@pytest.mark.skipif(not deepbet_available(), reason='needs deepbet\'s networks: pip install --no-deps "deepbet==1.0.2"')
def test_the_deepbet_brain_region_brings_its_calibrated_threshold_and_apply_runs_with_it(
        panel, scene, deepbet_model, temp_root, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import slicer

    from AutoDDPM import BrainRegion

    monkeypatch.setattr(slicer, "app", standins.Application(str(temp_root)), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", never_asked)  # deepbet is installed: nothing to ask
    parameters, slider, reset = panel._parameterNode, panel.ui.thresholdSliderWidget, panel.ui.resetThresholdButton
    assert parameters.brainRegion == BrainRegion.card
    choose_model(panel, deepbet_model)
    assert parameters.threshold == slider.value == 0.002
    # deepbet's region chosen (as its combo box sets it): its own calibrated threshold, for the next run.
    parameters.brainRegion = BrainRegion.deepbet
    assert parameters.threshold == slider.value == 0.003
    assert "0.003" in reset.text and "0.003" in panel.ui.modelInfoLabel.text
    # Apply runs the engine with deepbet's region; the result keeps the region and its threshold.
    parameters.inputVolume = add_head_volume(scene, tmp_path)
    panel.onApplyButton()
    while panel.logic.isRunning:
        standins.process_events()
    assert any("--postprocess deepbet" in line for line in panel.ui.logTextEdit.lines)
    segmentation = parameters.outputSegmentation
    assert segmentation is not None and float(segmentation.GetAttribute("AutoDDPM.Threshold")) == 0.003
    assert "Brain extraction (deepbet)" in panel.ui.resultInfoLabel.text and "0.003" in panel.ui.resultInfoLabel.text
    # The head region again: its threshold for the next run; the result still resets to its own.
    parameters.brainRegion = BrainRegion.card
    assert parameters.threshold == slider.value == 0.002
    assert float(segmentation.GetAttribute("AutoDDPM.Threshold")) == 0.003 and "0.003" in reset.text


def test_deepbet_is_installed_without_its_dependencies_only_if_the_user_agrees(
        panel, scene, deepbet_model, temp_root, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import slicer

    from AutoDDPM import BrainRegion

    monkeypatch.setattr(slicer, "app", standins.Application(str(temp_root)), raising=False)
    choose_model(panel, deepbet_model)
    parameters = panel._parameterNode
    # Another deepbet found first (an older release, without the networks the engine was checked with).
    older = tmp_path / "site-packages"
    (older / "deepbet-1.0.1.dist-info").mkdir(parents=True)
    (older / "deepbet-1.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: deepbet\nVersion: 1.0.1\n")
    monkeypatch.syspath_prepend(str(older))
    questions, answers, installs = [], [False, True], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay",
                        lambda text, windowTitle=None, **kwargs: questions.append(text) or answers.pop(0))

    def pip_install(arguments) -> None:
        # Slicer's pip_install (Slicer < 5.12) would fetch deepbet 1.0.2 over the older one; here the 1.0.2 installed
        # in this environment is found again.
        installs.append(list(arguments))
        sys.path.remove(str(older))

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    # Picked and declined: nothing installed, the head region again with its threshold, and the panel says why.
    parameters.brainRegion = BrainRegion.deepbet
    assert len(questions) == 1 and "deepbet==1.0.2" in questions[0] and installs == []
    assert parameters.brainRegion == BrainRegion.card and parameters.threshold == 0.002
    assert "head region" in panel.ui.statusLabel.text
    # Picked and accepted: deepbet alone, none of its dependencies; the region stays, with its threshold.
    parameters.brainRegion = BrainRegion.deepbet
    assert len(questions) == 2 and installs == [["--no-deps", "deepbet==1.0.2"]]
    assert parameters.brainRegion == BrainRegion.deepbet and parameters.threshold == 0.003
    # The older one back before Apply (reinstalled meanwhile): Apply asks before starting; declined, nothing runs.
    sys.path.insert(0, str(older))
    answers[:] = [False]
    parameters.inputVolume = add_head_volume(scene, tmp_path)
    panel.onApplyButton()
    assert len(questions) == 3 and not panel.logic.isRunning and parameters.outputSegmentation is None
    assert parameters.brainRegion == BrainRegion.card and parameters.threshold == 0.002
    assert "Not run" in panel.ui.statusLabel.text and "head region" in panel.ui.statusLabel.text
    assert list(temp_root.iterdir()) == []


def test_apply_lets_the_engine_pick_the_threshold_of_a_skull_stripped_input_unless_the_user_chose_one(
        panel, scene, stripped_model, temp_root, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import slicer

    from AutoDDPM import AutoDDPMLogic

    monkeypatch.setattr(slicer, "app", standins.Application(str(temp_root)), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", never_asked)
    model = str(stripped_model)
    with_skull = AutoDDPMLogic.calibratedThreshold(model)
    stripped = AutoDDPMLogic.calibratedThreshold(model, "fast", "card", skullStripped=True)
    parameters, slider, reset = panel._parameterNode, panel.ui.thresholdSliderWidget, panel.ui.resetThresholdButton
    choose_model(panel, stripped_model)
    assert parameters.threshold == with_skull
    parameters.inputVolume = add_image_volume(scene, tmp_path, "stripped", stripped_sample())

    def apply() -> str:
        """Apply as the user presses it; returns the engine's command line."""
        panel.ui.logTextEdit.clear()
        panel.onApplyButton()
        while panel.logic.isRunning:
            standins.process_events()
        (command,) = [line for line in panel.ui.logTextEdit.lines if "AutoDDPMLib.cli" in line]
        return command

    # The slider holds the calibrated threshold: the engine is given none, and picks the stripped inputs' own.
    assert "--threshold" not in apply()
    segmentation = parameters.outputSegmentation
    assert float(segmentation.GetAttribute("AutoDDPM.Threshold")) == stripped
    # The slider shows the threshold the engine used, and returns to it.
    assert parameters.threshold == stripped and slider.value == round(stripped, slider.decimals)
    assert f"{stripped:.3g}" in reset.text and "skull-stripped" in panel.ui.resultInfoLabel.text
    assert any("its threshold for skull-stripped inputs was used" in line for line in panel.ui.logTextEdit.lines)
    # A threshold the user chose is the run's, for any input.
    chosen = round(2 * stripped, slider.decimals)
    slider.value = chosen
    assert f"--threshold {chosen!r}" in apply()
    assert float(parameters.outputSegmentation.GetAttribute("AutoDDPM.Threshold")) == chosen == parameters.threshold
    # Back to calibrated: the engine picks again.
    reset.emit("clicked(bool)", False)
    assert parameters.threshold == stripped
    assert "--threshold" not in apply()
    assert list(temp_root.iterdir()) == []
