import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional, Union

import numpy as np
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from AutoDDPMLib.detection.postprocessing import option_settings, stripped_input_threshold
from AutoDDPMLib.diffusion.sampling_schedules import DEFAULT_SCHEDULE
from AutoDDPMLib.errors import AutoDDPMError
from AutoDDPMLib.models.bundle import DEFAULT_MODEL, ModelCard, bundled_models_dir, list_bundled_models, read_card, resolve_model
from AutoDDPMLib.models.validation import validation_headline
from AutoDDPMLib.resources import resources_dir
from AutoDDPMLib.slicer_bridge.licences import is_non_commercial, settings_key
from AutoDDPMLib.slicer_bridge.process import (
    EngineProcess,
    RunClock,
    engine_command,
    engine_environment,
    format_duration,
    input_file_name,
    make_temp_dir,
    remove_temp_dir,
)
from AutoDDPMLib.slicer_bridge.results import (
    ANOMALY_MAP_REFERENCE,
    MIN_COMPONENT_ATTRIBUTE,
    THRESHOLD_ATTRIBUTE,
    AnomalySummary,
    ResultOrigin,
    copy_window_level,
    place_beside,
    prepare_segmentation,
    read_volume,
    same_geometry,
    set_segment_mask,
    show_anomaly_map,
    summarize,
    volume_array,
    write_volume,
)
from AutoDDPMLib.slicer_bridge.thresholding import (
    MapBox,
    check_threshold,
    map_box,
    preview_mask,
    settled_mask,
    slider_settings,
    threshold_for_run,
)

SAMPLE_NAME = "TCGA_LGG_FLAIR"
# Each repeat costs a whole run; beyond this the spread hardly changes while the wait grows.
MAX_REPEATS = 20
# How long the threshold slider rests before the small parts are dropped and the parts counted (a slider tick
# only thresholds: labelling the parts of a large map takes longer than a tick may).
SETTLE_MSEC = 250
# Set to 1 to make the self-test run the model (needs PyTorch, installs what the engine needs, minutes on a CPU);
# by default it checks what runs on a build machine without them.
FULL_SELF_TEST_VARIABLE = "AUTODDPM_FULL_SELF_TEST"


#
# AutoDDPM
#


class AutoDDPM(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AutoDDPM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AutoDDPM contributors"]
        self.parent.helpText = _(
            "Finds anomalies (tumours, lesions) in a brain MRI with a diffusion model trained only on healthy brains: "
            "AutoDDPM masks what looks unhealthy, stitches in a healthy reconstruction and re-samples it into a "
            "pseudo-healthy image. What had to change is the anomaly. Select the MRI, press Apply, then adjust the "
            "threshold to grow or shrink the segmentation without re-running the model. "
            "Everything runs on this computer: no data is sent anywhere. "
            "Research use only, not for clinical decisions. "
            'See the <a href="https://github.com/AutoDDPM/SlicerAutoDDPM#readme">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "AutoDDPM is the method of C. I. Bercea, M. Neumayr, D. Rueckert and J. A. Schnabel, "
            "'Mask, Stitch, and Re-Sample: Enhancing Robustness and Generalizability in Anomaly Detection through "
            "Automatic Diffusion Models', ICML 2023 IMLH workshop. This extension is an independent open-source "
            "implementation; the sample FLAIR volume comes from the TCGA-LGG collection (The Cancer Imaging Archive)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Add the shipped sample volumes to the Sample Data module (local files: nothing is downloaded).

    Every ``Resources/SampleData/<name>.nii.gz`` but the lesion masks, with ``<name>.png`` as its thumbnail.
    """
    import SampleData

    try:
        folder = resources_dir() / "SampleData"
    except AutoDDPMError as error:
        logging.warning(str(error))
        return
    volumes = sampleVolumes(folder)
    if not volumes:
        logging.warning(f"AutoDDPM sample volumes are missing from {folder}; reinstall the extension")
    for volume in volumes:
        name = volume.name.removesuffix(".nii.gz")
        thumbnail = volume.with_name(f"{name}.png")
        # Sample Data verifies the checksum of what it copies into its cache; a
        # hash of the shipped file keeps that check meaningful for a local file.
        digest = hashlib.sha256(volume.read_bytes()).hexdigest()
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="AutoDDPM",
            sampleName=name,
            thumbnailFileName=str(thumbnail if thumbnail.is_file() else Path(__file__).parent / "Resources" / "Icons" / "AutoDDPM.png"),
            uris=volume.as_uri(),
            fileNames=volume.name,
            checksums=f"SHA256:{digest}",
            nodeNames=name,
        )


def sampleVolumes(folder: Path) -> list[Path]:
    """The sample volumes in ``folder``: its NIfTI files but the lesion masks (``*_mask.nii.gz``), FLAIR first."""
    volumes = [path for path in folder.glob("*.nii.gz") if not path.name.endswith("_mask.nii.gz")]
    return sorted(volumes, key=lambda path: (path.name != f"{SAMPLE_NAME}.nii.gz", path.name))


#
# Parameters
#


class Schedule(Enum):
    fast = "fast"
    reference = "reference"

    def label(self) -> str:
        return {
            Schedule.fast: _("Fast (25 network evaluations per slice)"),
            Schedule.reference: _("Reference (451 evaluations per slice, as in the paper)"),
        }[self]


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"

    def label(self) -> str:
        return {
            Device.auto: _("Automatic (GPU if available)"),
            Device.cpu: _("CPU"),
            Device.cuda: _("GPU (CUDA)"),
            Device.mps: _("GPU (Apple MPS)"),
        }[self]


class BrainRegion(Enum):
    """Where the model's post-processing searches the anomaly map; the values are the engine's ``--postprocess``."""

    card = "card"
    deepbet = "deepbet"

    def label(self) -> str:
        return {
            BrainRegion.card: _("Head region (built in)"),
            BrainRegion.deepbet: _("Brain extraction (deepbet)"),
        }[self]


@parameterNodeWrapper
class AutoDDPMParameterNode:
    """The module's settings, saved with the scene.

    model: a bundled model's name or a model bundle folder ("" = the default model).
    brainRegion: the model card's head region, or deepbet's brain mask (its networks installed on first use).
    repeats: runs with different seeds; more than one adds a spread volume (uncertainty).
    threshold: on the anomaly map; moving it re-thresholds the segmentation live.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    schedule: Schedule = Schedule(DEFAULT_SCHEDULE)
    brainRegion: BrainRegion = BrainRegion.card
    device: Device = Device.auto
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    repeats: Annotated[int, WithinRange(1, MAX_REPEATS)] = 1
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.1
    outputPseudoHealthy: vtkMRMLScalarVolumeNode
    outputAnomalyMap: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode


#
# AutoDDPMWidget
#


class AutoDDPMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, outputs, advanced options, Apply/Cancel, progress and log."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._schedule = None  # the schedule the threshold slider was last set for
        self._brainRegion = None  # and the brain region
        self._settleTimer = None
        self._pendingThreshold: Optional[tuple[vtkMRMLSegmentationNode, float]] = None  # shown, not yet settled
        self._clock: Optional[RunClock] = None  # of the run in progress
        self._stage = ""  # the engine's stage, as the progress bar names it

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AutoDDPM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AutoDDPMLogic()
        self.logic.logCallback = self.addLog

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.populateModels()
        self.ui.modelComboBox.connect("activated(int)", self.onModelActivated)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.resetThresholdButton.connect("clicked(bool)", self.onResetThreshold)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onResultSelected)
        # A slider tick only thresholds; the small parts are dropped and the parts counted once it rests.
        self._settleTimer = qt.QTimer()
        self._settleTimer.setSingleShot(True)
        self._settleTimer.setInterval(SETTLE_MSEC)
        self._settleTimer.connect("timeout()", self.settleThreshold)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)

        self.initializeParameterNode()
        self.setRunning(False)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.logic:
            self.logic.cancel()
        if self._settleTimer:
            self._settleTimer.stop()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload (developer mode) runs AutoDDPMLib again too: an edit there needs no Slicer restart."""
        # AutoDDPMLib is forgotten and the module's reload imports it afresh, each module after those it imports.
        # importlib.reload of one module after another would leave a module with the old classes of those reloaded
        # after it (the models' AutoDDPMError no longer the one the panel catches). The old module names that
        # legacy_paths answers go too, with its finder: the new package installs its own.
        package = "AutoDDPMLib"
        for name in [name for name in sys.modules if name == package or name.startswith(package + ".")]:
            del sys.modules[name]
        sys.meta_path[:] = [finder for finder in sys.meta_path if not type(finder).__module__.startswith(package + ".")]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        # The run's input and outputs are about to disappear with the scene.
        self.logic.cancel()
        self._settleTimer.stop()
        self._pendingThreshold = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.model:
            # First use in this scene: the default model, with its calibrated threshold.
            try:
                parameterNode.threshold = self.logic.calibratedThreshold(None, parameterNode.schedule,
                                                                         parameterNode.brainRegion)
                parameterNode.model = DEFAULT_MODEL
            except (AutoDDPMError, ValueError) as error:
                # A broken install (no Resources folder, a damaged card): the panel still works, and says why.
                self.showProblem(str(error))
        self.setParameterNode(parameterNode)
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[AutoDDPMParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # The node's threshold is its next run's (a saved scene may hold another than its result's).
            with self.thresholdShownOnly():
                self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self._schedule, self._brainRegion = self._parameterNode.schedule, self._parameterNode.brainRegion
            self.selectModel(self._parameterNode.model)
            self.updateApplyButton()
            self.updateThresholdSlider()
            self.updateSummary()

    # Models

    def populateModels(self) -> None:
        """One entry per bundled model (from its card, no PyTorch needed), then 'Load model folder...'."""
        combo = self.ui.modelComboBox
        combo.clear()
        try:
            cards = list_bundled_models()
        except AutoDDPMError as error:
            cards = []
            self.showProblem(str(error))
        for card in cards:
            self.addModelItem(card)
        combo.addItem(_("Load model folder..."))

    def addModelItem(self, card: ModelCard) -> None:
        combo = self.ui.modelComboBox
        # Before the last entry, "Load model folder...", once that is there.
        hasLoader = combo.count > 0 and combo.itemData(combo.count - 1) is None
        index = combo.count - 1 if hasLoader else combo.count
        combo.insertItem(index, f"{card.name} ({card.data.get('modality', '?')})", str(card.path.parent))
        combo.setItemData(index, _("{description}\nValid for: {validFor}\nValidation: {validation}\nLicense: {license}\nFolder: {folder}").format(
            description=card.data.get("description", ""), validFor=card.data.get("valid_for", "?"),
            validation=validation_headline(card), license=card.data.get("license", "?"), folder=card.path.parent), qt.Qt.ToolTipRole)

    def selectModel(self, model: str) -> None:
        """Show the parameter node's model (a bundled model's name or a folder) in the combo box."""
        combo = self.ui.modelComboBox
        try:
            folder = str(resolve_model(model or None))
        except AutoDDPMError as error:
            self.showProblem(str(error))
            return
        for index in range(combo.count):
            if combo.itemData(index) and Path(combo.itemData(index)) == Path(folder):
                combo.currentIndex = index
                self.showModelInfo(index)
                return
        try:
            card = read_card(folder)
        except AutoDDPMError as error:
            self.showProblem(str(error))
            return
        self.addModelItem(card)
        self.selectModel(folder)

    def showModelInfo(self, index: int) -> None:
        folder = self.ui.modelComboBox.itemData(index)
        self.ui.modelComboBox.toolTip = self.ui.modelComboBox.itemData(index, qt.Qt.ToolTipRole) or ""
        if not folder:
            return
        card = read_card(folder)
        threshold = f"{card.anomaly_threshold:.3g}"
        if self._parameterNode:
            parameters = self._parameterNode
            try:
                threshold = f"{AutoDDPMLogic.cardThreshold(card, parameters.schedule, parameters.brainRegion):.3g}"
            except (AutoDDPMError, ValueError) as error:
                self.showProblem(str(error))  # e.g. deepbet's region chosen for a model that searches no region
        # What the model is valid for is what a user most needs before pressing Apply; its licence, what they may do.
        self.ui.modelInfoLabel.text = _("{modality} model, calibrated threshold {threshold}. Valid for: {validFor}. "
                                        "License: {license}.").format(
            modality=card.data.get("modality", "?"), threshold=threshold,
            validFor=card.data.get("valid_for", "?"), license=card.data.get("license", "?"))

    def onModelActivated(self, index: int) -> None:
        folder = self.ui.modelComboBox.itemData(index)
        if folder is None:  # "Load model folder..."
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Select a model bundle folder"))
            if folder:
                try:
                    read_card(folder)
                except AutoDDPMError as error:
                    slicer.util.errorDisplay(_("This folder is not an AutoDDPM model bundle.") + "\n\n" + str(error))
                    folder = ""
            if not folder:
                self.selectModel(self._parameterNode.model)  # back to the previous choice
                return
            self.selectModel(folder)
        try:
            # Bundled models are saved with the scene by name, so the scene also opens on another computer.
            bundled = Path(folder).resolve().parent == bundled_models_dir().resolve()
        except AutoDDPMError:
            bundled = False  # an install without its models: the folder is all there is to save
        self._parameterNode.model = Path(folder).name if bundled else folder
        # A new model brings its own calibrated threshold.
        self.showCalibratedThreshold()
        self.showModelInfo(self.ui.modelComboBox.currentIndex)

    def onInputChanged(self, inputVolume) -> None:
        # Results of another volume stay in the scene, but the next run makes new nodes named after this one.
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        role = vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        if segmentation and inputVolume and segmentation.GetNodeReference(role) not in (None, inputVolume):
            with slicer.util.NodeModify(self._parameterNode.parameterNode):
                self._parameterNode.outputPseudoHealthy = None
                self._parameterNode.outputAnomalyMap = None
                self._parameterNode.outputSegmentation = None

    # Running

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self.updateApplyButton()
        parameters = self._parameterNode
        if (parameters.schedule, parameters.brainRegion) == (self._schedule, self._brainRegion):
            return
        # Thresholds are calibrated per schedule and brain region: another brings its own.
        self._schedule, self._brainRegion = parameters.schedule, parameters.brainRegion
        if parameters.brainRegion == BrainRegion.deepbet and not self.offerBrainExtraction():
            return  # the head region is chosen again, and shown with its threshold
        if parameters.model:
            self.showCalibratedThreshold()
            self.showModelInfo(self.ui.modelComboBox.currentIndex)

    def offerBrainExtraction(self) -> bool:
        """deepbet's region is chosen: make sure its networks are there, installing them if the user agrees.

        When they are not (declined, or the installation failed) the head region is chosen again and the status
        line says why; returns whether deepbet's region stays chosen.
        """
        try:
            if self.logic.setupBrainExtraction():
                return True
            message = _("deepbet was not installed, so the brain region is the built-in head region.")
        except Exception as error:
            logging.exception("AutoDDPM: installing deepbet failed")
            message = _("deepbet could not be installed ({error}), so the brain region is the built-in head "
                        "region.").format(error=error)
        self._parameterNode.brainRegion = BrainRegion.card
        self.showProblem(message)
        return False

    def showCalibratedThreshold(self) -> None:
        """Put the selected model's calibrated threshold for the selected schedule and brain region on the slider,
        for the next run."""
        try:
            threshold = self.logic.calibratedThreshold(self._parameterNode.model or None, self._parameterNode.schedule,
                                                       self._parameterNode.brainRegion)
        except (AutoDDPMError, ValueError) as error:
            self.showProblem(str(error))
            return
        self.updateThresholdSlider(threshold)
        with self.thresholdShownOnly():
            self._parameterNode.threshold = threshold

    def currentResult(self) -> Optional[vtkMRMLSegmentationNode]:
        """The AutoDDPM segmentation the slider re-thresholds: the selected output segmentation, if AutoDDPM made it."""
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        return segmentation if AutoDDPMLogic.isAnomalySegmentation(segmentation) else None

    def sliderCalibratedThreshold(self, segmentation: Optional[vtkMRMLSegmentationNode]) -> Optional[float]:
        """The threshold "Reset to calibrated" returns to: the one calibrated for the run that made ``segmentation``,
        else for the selected model and schedule (None when the install cannot say)."""
        origin = ResultOrigin.read(segmentation) if segmentation is not None else None
        if origin is not None:
            return origin.calibrated_threshold
        try:
            return self.logic.calibratedThreshold(self._parameterNode.model or None, self._parameterNode.schedule,
                                                  self._parameterNode.brainRegion)
        except (AutoDDPMError, ValueError):
            return None  # said in the status line where the model was chosen

    def updateThresholdSlider(self, threshold: Optional[float] = None) -> None:
        """Range and steps of the slider follow the map it thresholds, and its calibrated threshold is marked.

        threshold: the value the slider is about to show (default: the parameter node's); the range holds it, so
        setting the range never moves the slider.
        """
        if not self._parameterNode:
            return
        segmentation = self.currentResult()
        calibrated = self.sliderCalibratedThreshold(segmentation)
        current = self._parameterNode.threshold if threshold is None else threshold
        region = self.logic.mapBox(segmentation.GetNodeReference(ANOMALY_MAP_REFERENCE)) if segmentation else None
        settings = slider_settings(region, current if calibrated is None else calibrated, current)
        slider = self.ui.thresholdSliderWidget
        with self.thresholdShownOnly():
            slider.decimals = settings.decimals
            slider.singleStep = settings.single_step
            slider.pageStep = settings.page_step
            slider.minimum = settings.minimum
            slider.maximum = settings.maximum
            slider.value = self._parameterNode.threshold
        button = self.ui.resetThresholdButton
        button.enabled = calibrated is not None
        if calibrated is not None:
            button.text = _("Reset to calibrated ({threshold:.3g})").format(threshold=calibrated)
            button.toolTip = _("Set the threshold back to {threshold:.4g}, calibrated on healthy brains for {what}.").format(
                threshold=calibrated, what=_("the model, schedule and brain region of the selected result")
                if segmentation is not None else _("the selected model, schedule and brain region"))

    @contextmanager
    def thresholdShownOnly(self) -> Iterator[None]:
        """Threshold changes made inside move the slider, and leave the result on display as it is.

        The slider holds the threshold of the next run; only the user moving it re-thresholds the selected result.
        Otherwise a result keeps the threshold it was made (or last re-thresholded) with: a change of model or
        schedule is for the next run.
        """
        slider = self.ui.thresholdSliderWidget
        wasBlocked = slider.blockSignals(True)
        try:
            yield
        finally:
            slider.blockSignals(wasBlocked)

    def updateApplyButton(self, caller=None, event=None) -> None:
        if self.logic.isRunning:
            return
        ready = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Find anomalies in the input volume") if ready else _("Select an input volume")

    def setRunning(self, running: bool) -> None:
        """Apply turns into Cancel while the engine runs; the settings are locked meanwhile."""
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop the computation; the scene stays as it was") if running else ""
        self.ui.progressBar.visible = running
        for section in (self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton):
            section.enabled = not running
        for widget in (self.ui.outputPseudoHealthySelector, self.ui.outputAnomalyMapSelector,
                       self.ui.outputSegmentationSelector, self.ui.thresholdSliderWidget, self.ui.resetThresholdButton):
            widget.enabled = not running
        if running:
            self.ui.progressBar.value = 0
            self.ui.progressBar.format = _("Starting...")
        else:
            self._clock = None
            self.updateApplyButton()
            self.ui.resetThresholdButton.enabled = self.sliderCalibratedThreshold(self.currentResult()) is not None

    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.ui.statusLabel.text = _("Cancelling...")
            self.logic.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("AutoDDPM could not start."), waitCursor=True):
            if not self.acknowledgeLicense():
                return
            self.logic.setupPythonRequirements()
            # deepbet's networks before the run, not minutes into it; declined, the head region is chosen instead
            # (and its threshold shown): the user presses Apply again to run with it.
            if self._parameterNode.brainRegion == BrainRegion.deepbet and not self.offerBrainExtraction():
                self.ui.statusLabel.text += " " + _("Not run: press Apply to run with it.")
                return
            # A threshold still shown only is settled first: the run must not meet it half done.
            self.settleThreshold()
            parameters = self._parameterNode
            self.ui.logTextEdit.clear()
            self.ui.statusLabel.text = _("Running...")
            self.setRunning(True)
            self._clock, self._stage = RunClock(time.monotonic()), ""
            try:
                # A calibrated threshold on the slider is not given to the engine: given, it would be used for every
                # input, and a skull-stripped one would miss the threshold calibrated for those.
                self.logic.process(
                    parameters.inputVolume,
                    model=parameters.model or None,
                    schedule=parameters.schedule.value,
                    device=parameters.device.value,
                    seed=parameters.seed,
                    repeats=parameters.repeats,
                    threshold=self.logic.runThreshold(parameters.model or None, parameters.schedule,
                                                      parameters.brainRegion, parameters.threshold),
                    postprocess=parameters.brainRegion.value,
                    outputPseudoHealthy=parameters.outputPseudoHealthy,
                    outputAnomalyMap=parameters.outputAnomalyMap,
                    outputSegmentation=parameters.outputSegmentation,
                    waitForCompletion=False,
                    progressCallback=self.onProgress,
                    completedCallback=self.onProcessingCompleted,
                )
            except Exception:
                self.setRunning(False)
                self.ui.statusLabel.text = _("Failed.")
                raise
            self.tickClock(self._clock)

    def onProgress(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            self.addLog(_("Model {model}, {schedule} schedule ({evaluations} network evaluations per slice) on {device}, "
                          "network run by {backend}.").format(
                model=event.get("model"), schedule=event.get("schedule"),
                evaluations=event.get("evaluations_per_slice"), device=event.get("device"), backend=event.get("backend")))
        elif kind == "progress":
            fraction = float(event.get("fraction", 0.0))
            self.ui.progressBar.value = int(round(100 * fraction))
            stage = {"reading": _("Reading"), "mask": _("Masking"), "resample": _("Re-sampling"),
                     "writing": _("Writing")}.get(event.get("stage"), event.get("stage", ""))
            self._clock.progress(time.monotonic(), fraction)
            self._stage = stage
            self.showTiming()
            if event.get("message"):
                self.ui.statusLabel.text = event["message"]
        elif kind == "warning":
            self.addLog(_("Warning: {message}").format(message=event.get("message", "")))
        elif kind == "done":
            self.ui.progressBar.value = 100
            self._stage = _("Loading results")
            self.showTiming()

    def showTiming(self) -> None:
        """The stage, the fraction done, the elapsed time and what is left, in the progress bar."""
        now = time.monotonic()
        timing = _("{elapsed} elapsed").format(elapsed=format_duration(self._clock.elapsed(now)))
        remaining = self._clock.remaining(now)
        if remaining is not None:
            timing += ", " + _("about {remaining} left").format(remaining=format_duration(remaining))
        self.ui.progressBar.format = f"{self._stage}: %p% ({timing})" if self._stage else _("Starting...") + f" ({timing})"

    def tickClock(self, clock: RunClock) -> None:
        """Once a second while ``clock``'s run goes on: the time shown moves between the engine's progress events."""
        if self._clock is not clock:
            return  # that run is over
        self.showTiming()
        qt.QTimer.singleShot(1000, lambda: self.tickClock(clock))

    def acknowledgeLicense(self) -> bool:
        """Before the first run of a model whose licence forbids commercial use, the user acknowledges it.

        Asked once per model and licence text (remembered in Slicer's settings); False when the user declines.
        """
        card = read_card(self.logic.modelFolder(self._parameterNode.model or None))
        license = card.data.get("license", "")
        if not is_non_commercial(license):
            return True
        settings = qt.QSettings()
        key = settings_key(card.name)
        if settings.value(key) == license:
            return True
        question = AutoDDPMLogic.licenseNotice(card.name, license) + "\n\n" + _(
            "Press OK to acknowledge its license and run it (asked once for this model), Cancel to choose another model.")
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=_("AutoDDPM: model license")):
            self.ui.statusLabel.text = _("Not run: the license of model '{model}' was not acknowledged.").format(model=card.name)
            return False
        settings.setValue(key, license)
        return True

    def onProcessingCompleted(self, result: "AutoDDPMResult") -> None:
        self.setRunning(False)
        if result.state == "cancelled":
            self.ui.statusLabel.text = _("Cancelled: the scene is as it was.")
            return
        if result.state == "failed":
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(result.error, windowTitle=_("AutoDDPM"))
            return
        parameters = self._parameterNode
        with slicer.util.NodeModify(parameters.parameterNode):
            parameters.outputPseudoHealthy = result.pseudoHealthyVolume
            parameters.outputAnomalyMap = result.anomalyMapVolume
            parameters.outputSegmentation = result.segmentation
        # The engine's threshold is already applied: moving the slider there must not redo it.
        self.updateThresholdSlider(result.threshold)
        with self.thresholdShownOnly():
            parameters.threshold = result.threshold
            self.ui.thresholdSliderWidget.value = result.threshold
        slicer.util.setSliceViewerLayers(background=result.inputVolume, foreground=result.anomalyMapVolume,
                                         foregroundOpacity=0.5, fit=True)
        self.ui.statusLabel.text = _("Done in {seconds:.0f} s.").format(seconds=result.engineSummary.get("seconds", 0))
        if result.spreadVolume is not None:
            self.addLog(_("'{name}': how much the anomaly map varies over {repeats} runs with different seeds "
                          "(standard deviation per voxel).").format(name=result.spreadVolume.GetName(),
                                                                    repeats=result.engineSummary.get("repeats")))
        self.updateSummary(result.summary)

    def onThresholdChanged(self, value: float) -> None:
        """The user moves the slider: the selected result shows the voxels above it at once (a tick has to be quick);
        the small parts are dropped and the parts counted when the slider rests (:meth:`settleThreshold`)."""
        segmentation = self.currentResult()
        if self.logic.isRunning or segmentation is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Re-thresholding failed.")):
            volume = self.logic.previewThreshold(segmentation, value)
            self._pendingThreshold = (segmentation, value)
            self._settleTimer.start()
            self.ui.summaryLabel.text = _("About {volume:.2f} mL above {threshold:.3g}; the parts are counted when the "
                                          "slider rests.").format(volume=volume, threshold=value)

    def settleThreshold(self) -> None:
        """Make the segmentation the slider last showed the engine's mask at that threshold, and measure it."""
        self._settleTimer.stop()
        pending, self._pendingThreshold = self._pendingThreshold, None
        if pending is None or pending[0].GetScene() is None:
            return  # nothing shown only, or its segmentation deleted meanwhile
        segmentation, threshold = pending
        with slicer.util.tryWithErrorDisplay(_("Re-thresholding failed.")):
            summary = self.logic.setThreshold(segmentation, threshold)
        if segmentation is self.currentResult():
            self.updateSummary(summary)

    def onResetThreshold(self) -> None:
        """Back to the calibrated threshold: the selected result is re-thresholded there at once."""
        segmentation = self.currentResult()
        calibrated = self.sliderCalibratedThreshold(segmentation)
        if calibrated is None or self.logic.isRunning:
            return
        self._settleTimer.stop()
        self._pendingThreshold = None
        with self.thresholdShownOnly():
            self._parameterNode.threshold = calibrated
        summary = None
        if segmentation is not None:
            with slicer.util.tryWithErrorDisplay(_("Re-thresholding failed.")):
                summary = self.logic.setThreshold(segmentation, calibrated)
        self.updateSummary(summary)

    def onResultSelected(self, node) -> None:
        self.updateThresholdSlider()
        self.updateSummary()

    def updateSummary(self, summary: Optional[AnomalySummary] = None) -> None:
        """The selected result's size at its threshold, and what made it: model, schedule, thresholds, licence.

        summary: the result's, when the caller has just made it (measuring again would label the mask again).
        """
        segmentation = self.currentResult()
        if segmentation is None:
            self.ui.summaryLabel.text = self.ui.resultInfoLabel.text = ""
            return
        self.ui.summaryLabel.text = AutoDDPMLogic.summaryText(summary or self.logic.measure(segmentation))
        origin = ResultOrigin.read(segmentation)
        if origin is None:
            self.ui.resultInfoLabel.text = ""
            return
        try:
            region = BrainRegion(origin.postprocess).label()
        except ValueError:
            region = origin.postprocess  # one this version does not know (a scene saved by a newer one)
        # A skull-stripped input has a calibrated threshold of its own: said, or it would seem not the model's.
        calibrated = (_("calibrated threshold for skull-stripped inputs {calibrated:.3g}") if origin.skull_stripped
                      else _("calibrated threshold {calibrated:.3g}")).format(calibrated=origin.calibrated_threshold)
        self.ui.resultInfoLabel.text = _("Made by model {model}, {schedule} schedule, brain region: {region}; "
                                         "{calibrated}. License: {license}.").format(
            model=origin.model, schedule=origin.schedule, region=region, calibrated=calibrated, license=origin.license)

    def addLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def showProblem(self, message: str) -> None:
        """Say what keeps the panel from working (missing or damaged models) in the status line and the log.

        Several steps of setting up meet the same broken install: it is said once.
        """
        if self.ui.statusLabel.text != message:
            self.ui.statusLabel.text = message
            self.addLog(message)


#
# AutoDDPMLogic
#


@dataclass
class AutoDDPMResult:
    """One run of AutoDDPM on a volume.

    state: "running", "importing", "done", "cancelled" or "failed" (then ``error`` says why).
    pseudoHealthyVolume, anomalyMapVolume, segmentation: the output nodes, once "done"; spreadVolume too with repeats,
    brainRegionVolume when the model's post-processing searches a brain region (1 inside, 0 outside).
    threshold and summary: the threshold on the anomaly map and what it segments.
    engineSummary: the engine's final report (anomalous_voxels, seconds, output files, the threshold the mask was made
    with, whether the input was taken for a skull-stripped one, ...).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    state: str = "running"
    error: str = ""
    pseudoHealthyVolume: Optional[vtkMRMLScalarVolumeNode] = None
    anomalyMapVolume: Optional[vtkMRMLScalarVolumeNode] = None
    segmentation: Optional[vtkMRMLSegmentationNode] = None
    spreadVolume: Optional[vtkMRMLScalarVolumeNode] = None  # only with repeats > 1
    brainRegionVolume: Optional[vtkMRMLScalarVolumeNode] = None  # only with a post-processing brain region
    threshold: Optional[float] = None
    summary: Optional[AnomalySummary] = None
    engineStart: dict = field(default_factory=dict)
    engineSummary: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)


@dataclass
class _ActiveRun:
    """What the Logic keeps while the engine process runs."""

    tempDir: Path
    inputPath: Path
    result: AutoDDPMResult
    options: dict  # engine_command's keyword arguments but the device
    outputs: dict
    progressCallback: Optional[Callable[[dict], None]]
    completedCallback: Optional[Callable[[AutoDDPMResult], None]]
    engine: Optional[EngineProcess] = None
    device: str = "auto"
    cancelled: bool = False


class AutoDDPMLogic(ScriptedLoadableModuleLogic):
    """Runs AutoDDPM on a volume and turns the results into nodes; needs no widget.

    From Slicer's Python console::

        logic = slicer.modules.autoddpm.widgetRepresentation().self().logic  # or AutoDDPMLogic()
        result = logic.process(slicer.util.getNode("TCGA_LGG_FLAIR"))
        print(logic.summaryText(result.summary))
        logic.setThreshold(result, 0.2)
    """

    # How often the main thread looks for news from a background run.
    pollIntervalMsec = 100

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # Receives every line the engine prints that is not a progress event (default: the Python log).
        self.logCallback: Optional[Callable[[str], None]] = None
        self._run: Optional[_ActiveRun] = None
        # The last thresholded map's box, with what tells whether its voxels are still the same (see mapBox).
        self._mapBox: Optional[tuple[tuple, MapBox]] = None

    def getParameterNode(self) -> AutoDDPMParameterNode:
        return AutoDDPMParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._run is not None

    def setupPythonRequirements(self) -> None:
        """Install what the engine needs, asking the user first: PyTorch through the PyTorch extension, the rest with pip.

        Raises RuntimeError when the user declines or the PyTorch extension is missing.
        """
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(_("AutoDDPM needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                                     "restart Slicer, and try again.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.0") is None:
                    raise RuntimeError(_("AutoDDPM cannot run without PyTorch, and its installation was cancelled."))
        requirementsFile = Path(__file__).parent / "Resources" / "requirements.txt"
        packaging = self._slicerPackaging()
        if packaging is not None:
            requirements = packaging.load_requirements(requirementsFile)
            if not packaging.pip_check(requirements):
                packaging.pip_ensure(requirements, requester="AutoDDPM")
            return
        # Slicer before 5.12: check each requirement, install the missing ones after a confirmation.
        from importlib.metadata import PackageNotFoundError, version

        from packaging.requirements import Requirement

        missing = []
        for line in requirementsFile.read_text().splitlines():
            line = line.split("#")[0].strip()
            if not line:
                continue
            requirement = Requirement(line)
            try:
                if version(requirement.name) in requirement.specifier:
                    continue
            except PackageNotFoundError:
                pass
            missing.append(line)
        if not missing:
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("AutoDDPM needs these Python packages: {packages}. Install them now?").format(packages=", ".join(missing))):
            raise RuntimeError(_("AutoDDPM cannot run without {packages}.").format(packages=", ".join(missing)))
        slicer.util.pip_install(missing)

    @staticmethod
    def _slicerPackaging():
        # The dependency helpers (load_requirements, pip_check, pip_ensure) of Slicer >= 5.12.
        for name in ("slicer.packaging", "slicer.pydeps"):
            try:
                return importlib.import_module(name)
            except ImportError:
                continue
        return None

    def setupBrainExtraction(self) -> bool:
        """Make sure deepbet's brain-extraction networks are installed (for ``postprocess="deepbet"``), installing
        them after the user agrees; False when the user declines.

        They come from deepbet's wheel installed with ``--no-deps``: the engine runs the two networks itself, so
        deepbet's own dependencies (pandas, nibabel, a GUI toolkit, its own PyTorch requirement) are not installed.
        Raises RuntimeError when the installed networks still cannot be used.
        """
        # Imported here: brain_extraction imports scipy, which setupPythonRequirements may not have installed yet.
        from AutoDDPMLib.volumes.brain_extraction import DEEPBET_VERSION, deepbet_network_files

        try:
            deepbet_network_files()  # installed, and the very networks the engine was checked with
            return True
        except AutoDDPMError as error:
            logging.info(f"AutoDDPM: {error}")
        requirement = f"deepbet=={DEEPBET_VERSION}"
        if not slicer.util.confirmOkCancelDisplay(
                _("The deepbet brain region needs the brain-extraction networks of deepbet {version} (Fisch et al., "
                  "2024; MIT licence), a 17 MB Python package, and they are not installed. Install {requirement} now? "
                  "Only its own files are installed, none of its dependencies; the networks run on this "
                  "computer.").format(version=DEEPBET_VERSION, requirement=requirement),
                windowTitle=_("AutoDDPM: brain extraction")):
            return False
        arguments = ["--no-deps", requirement]
        packaging = self._slicerPackaging()
        if packaging is not None:
            packaging.pip_install(arguments, requester="AutoDDPM")  # Slicer >= 5.12: with a progress dialog
        else:
            slicer.util.pip_install(arguments)
        importlib.invalidate_caches()  # the new package's metadata must be found in this process
        try:
            deepbet_network_files()
        except AutoDDPMError as error:
            raise RuntimeError(_("deepbet was installed, but its networks cannot be used: {error}").format(
                error=error)) from None
        return True

    @staticmethod
    def checkInput(inputVolume) -> None:
        """Raise ValueError, with what to do about it, if AutoDDPM cannot analyse this node."""
        if inputVolume is None:
            raise ValueError(_("Select an input volume: the brain MRI to analyse."))
        name = inputVolume.GetName()
        if inputVolume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(_("'{name}' is a label map (a segmentation), not an MRI: select the MRI volume itself.").format(name=name))
        if not inputVolume.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError(_("'{name}' is not a volume: select a brain MRI volume.").format(name=name))
        image = inputVolume.GetImageData()
        if image is None or 0 in image.GetDimensions():
            raise ValueError(_("'{name}' has no voxels: load the MRI again.").format(name=name))
        components = image.GetNumberOfScalarComponents()
        if components != 1 or inputVolume.IsA("vtkMRMLTensorVolumeNode"):
            raise ValueError(_("'{name}' has {components} values per voxel (a 4D, vector or colour volume); AutoDDPM "
                               "analyses one 3D scalar volume: extract a single frame or channel first.").format(
                                   name=name, components=components))
        voxels = volume_array(inputVolume)
        finite = voxels[np.isfinite(voxels)]
        if finite.size == 0 or finite.min() == finite.max():
            raise ValueError(_("'{name}' has no signal (every voxel has the same value): select a volume with the brain in it.").format(name=name))

    @staticmethod
    def modelFolder(model: Union[str, os.PathLike, None]) -> Path:
        """The bundle folder of a bundled model's name or a folder path (None: the default model), card checked."""
        try:
            folder = resolve_model(model)
            read_card(folder)
        except AutoDDPMError as error:
            raise ValueError(str(error)) from None
        return folder

    @staticmethod
    def calibratedThreshold(model: Union[str, os.PathLike, None], schedule: Union[str, "Schedule"] = DEFAULT_SCHEDULE,
                            postprocess: Union[str, "BrainRegion"] = "card", skullStripped: bool = False) -> float:
        """The model card's anomaly threshold for ``schedule`` (on its map post-processed as ``postprocess`` says,
        when it post-processes): what a run uses unless given another. ``skullStripped``: that of a skull-stripped
        input (see :meth:`cardThreshold`)."""
        return AutoDDPMLogic.cardThreshold(read_card(AutoDDPMLogic.modelFolder(model)), schedule, postprocess,
                                           skullStripped)

    @staticmethod
    def cardThreshold(card: ModelCard, schedule: Union[str, "Schedule"],
                      postprocess: Union[str, "BrainRegion"] = "card", skullStripped: bool = False) -> float:
        """``card``'s threshold for runs with ``schedule`` and ``postprocess``: as the engine picks it, the one
        calibrated for that post-processing, else the raw map's.

        skullStripped: for an input the engine takes for a skull-stripped one: the threshold calibrated on validation
        volumes stripped the same way (``autoddpm calibrate --with-stripped``) where the card has one; else, as the
        engine does then, the threshold of inputs with skull.
        """
        schedule = str(getattr(schedule, "value", schedule))
        settings = AutoDDPMLogic.postprocessSettings(card, postprocess)
        threshold = stripped_input_threshold(card, schedule, settings) if skullStripped else None
        return card.run_threshold(schedule, settings) if threshold is None else threshold

    @staticmethod
    def runThreshold(model: Union[str, os.PathLike, None], schedule: Union[str, "Schedule"],
                     postprocess: Union[str, "BrainRegion"], threshold: float) -> Optional[float]:
        """The ``threshold`` argument of :meth:`process` for a run the user set up with ``threshold``: None while it
        is a threshold the model card has for the run (that of inputs with skull, or of skull-stripped ones: the
        panel shows the one the last run used), so that the engine picks the right one for each input; else the
        user's ``threshold``, used as given."""
        card = read_card(AutoDDPMLogic.modelFolder(model))
        calibrated = [AutoDDPMLogic.cardThreshold(card, schedule, postprocess, stripped) for stripped in (False, True)]
        return threshold_for_run(threshold, calibrated)

    @staticmethod
    def postprocessSettings(card: ModelCard, postprocess: Union[str, "BrainRegion"]) -> dict:
        """The post-processing settings a run of ``card`` with ``postprocess`` ("card" or "deepbet") uses; ValueError,
        with what to do, for another value or deepbet's region on a model that searches no brain region."""
        postprocess = str(getattr(postprocess, "value", postprocess))
        if postprocess not in [region.value for region in BrainRegion]:
            raise ValueError(_("Unknown brain region '{postprocess}': use 'card' (the model's head region) or 'deepbet' "
                               "(deepbet's brain extraction).").format(postprocess=postprocess))
        if postprocess == BrainRegion.deepbet.value and not card.postprocessing:
            # deepbet's region replaces the card's, and this card searches none (said in the panel's words).
            raise ValueError(_("Model '{model}' does not post-process its anomaly map, so it searches no brain region "
                               "that deepbet's could replace: choose '{head}' for it.").format(
                                   model=card.name, head=BrainRegion.card.label()))
        try:
            return option_settings(postprocess, card.postprocessing)
        except AutoDDPMError as error:
            raise ValueError(str(error)) from None  # e.g. a card whose post-processing switches every step off

    def process(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        model: Union[str, os.PathLike, None] = None,
        schedule: str = DEFAULT_SCHEDULE,
        device: str = "auto",
        seed: int = 0,
        threshold: Optional[float] = None,
        repeats: int = 1,
        outputPseudoHealthy: Optional[vtkMRMLScalarVolumeNode] = None,
        outputAnomalyMap: Optional[vtkMRMLScalarVolumeNode] = None,
        outputSegmentation: Optional[vtkMRMLSegmentationNode] = None,
        waitForCompletion: bool = True,
        progressCallback: Optional[Callable[[dict], None]] = None,
        completedCallback: Optional[Callable[[AutoDDPMResult], None]] = None,
        postprocess: Union[str, BrainRegion] = "card",
        skullStripped: Optional[bool] = None,
    ) -> AutoDDPMResult:
        """Find anomalies in ``inputVolume``; the input itself is never modified.

        model: a bundled model's name or a model bundle folder (None: the default model).
        schedule: "fast" or "reference"; device: "auto", "cpu", "cuda" or "mps"; seed: makes runs repeatable.
        threshold: on the anomaly map (None: the model's calibrated threshold, for a skull-stripped input the one
            calibrated for those where the card has it; a threshold given is used for any input).
        repeats: more than 1 runs AutoDDPM that many times with different seeds (that many times the time): the
            outputs are the mean over the runs, and ``result.spreadVolume`` the per-voxel standard deviation of
            their anomaly maps.
        output*: nodes to fill; None creates new ones named after the input (only once the run succeeds).
        waitForCompletion: True blocks until the results are in the scene (console, scripts, tests) and raises
            RuntimeError if the engine fails; False returns at once, runs in the background and reports through
            ``completedCallback(result)``.
        progressCallback: receives each engine event (dicts with "event": "start", "progress", "warning", "done").
        postprocess: where the model's post-processing searches the map: "card" (the head region of its card) or
            "deepbet" (deepbet's brain mask; its networks must be installed: :meth:`setupBrainExtraction`); the
            default threshold is the one calibrated for it.
        skullStripped: whether the input is skull-stripped (0 outside the brain). None: the engine looks at it (is
            the background around the brain exactly one value?); True or False: it takes the caller's word. A
            stripped input is thresholded with the model card's threshold for skull-stripped inputs where it has one
            and no ``threshold`` is given (``result.engineSummary["skull_stripped"]`` says how it was taken); True
            for a model without one, and no ``threshold``, fails with the engine's reason. Where the card says the
            model does not cover stripped scans, the engine's warning about one reaches the log and
            ``result.warnings``.

        Invalid inputs raise ValueError before anything starts, and leave the scene untouched.
        """
        if self.isRunning:
            raise RuntimeError(_("AutoDDPM is already running: wait for it to finish or cancel it."))
        self.checkInput(inputVolume)
        if inputVolume in (outputPseudoHealthy, outputAnomalyMap):
            raise ValueError(_("The input volume cannot also be an output: it would be overwritten. Choose another "
                               "output volume or let AutoDDPM create one."))
        modelFolder = self.modelFolder(model)
        card = read_card(modelFolder)
        schedule, device = str(getattr(schedule, "value", schedule)), str(getattr(device, "value", device))
        postprocess = str(getattr(postprocess, "value", postprocess))
        self.postprocessSettings(card, postprocess)  # an unknown region, or none for deepbet's to replace
        if schedule not in [s.value for s in Schedule]:
            raise ValueError(_("Unknown schedule '{schedule}': use 'fast' or 'reference'.").format(schedule=schedule))
        if device not in [d.value for d in Device]:
            raise ValueError(_("Unknown device '{device}': use 'auto', 'cpu', 'cuda' or 'mps'.").format(device=device))
        if skullStripped not in (None, True, False):
            raise ValueError(_("skullStripped must be None (the engine looks at the input), True or False, not "
                               "{value!r}.").format(value=skullStripped))
        if not isinstance(repeats, int) or not 1 <= repeats <= MAX_REPEATS:
            raise ValueError(_("Repeats must be a whole number from 1 to {maximum}, not {repeats}.").format(
                maximum=MAX_REPEATS, repeats=repeats))
        if importlib.util.find_spec("torch") is None:
            raise RuntimeError(_("PyTorch is not installed: press Apply in the AutoDDPM module once, or call "
                                 "AutoDDPMLogic().setupPythonRequirements()."))
        if postprocess == BrainRegion.deepbet.value:
            self._checkBrainExtraction()
        # Said, not asked: the console and scripts are not stopped (the panel asks once before the first run).
        notice = self.licenseNotice(card.name, card.data.get("license", ""))
        if notice:
            self.log(notice, logging.WARNING)

        result = AutoDDPMResult(inputVolume)
        tempDir = make_temp_dir(getattr(getattr(slicer, "app", None), "temporaryPath", None))
        run = _ActiveRun(tempDir, tempDir / input_file_name(inputVolume.GetName()), result,
                         dict(model=str(modelFolder), schedule=schedule, seed=seed, threshold=threshold, repeats=repeats,
                              postprocess=postprocess, skull_stripped=skullStripped),
                         dict(pseudoHealthy=outputPseudoHealthy, anomalyMap=outputAnomalyMap, segmentation=outputSegmentation),
                         progressCallback, completedCallback)
        try:
            write_volume(inputVolume, run.inputPath)
            self._launch(run, device)
        except BaseException:
            remove_temp_dir(tempDir)
            raise
        self._run = run

        if not waitForCompletion:
            qt.QTimer.singleShot(self.pollIntervalMsec, lambda: self._checkBackgroundRun(run))
            return result
        application = getattr(slicer, "app", None)
        try:
            while not self._step(run, timeout=0.1):
                if application is not None:
                    # Inside Slicer the views keep repainting (a second Apply is refused while this runs).
                    application.processEvents()
        except BaseException:
            # Ctrl+C in the console or an error in a callback: leave nothing behind.
            self._abort(run)
            raise
        if result.state == "failed":
            raise RuntimeError(result.error)
        return result

    @staticmethod
    def _checkBrainExtraction() -> None:
        """RuntimeError, before the run starts, when deepbet's networks are missing (the engine would stop there)."""
        from AutoDDPMLib.volumes.brain_extraction import deepbet_network_files

        try:
            deepbet_network_files()
        except AutoDDPMError as error:
            raise RuntimeError(_("The deepbet brain region cannot be used: {error}. Choose it in the AutoDDPM module "
                                 "to install it, or call AutoDDPMLogic().setupBrainExtraction().").format(
                                     error=error)) from None

    def _launch(self, run: _ActiveRun, device: str) -> None:
        args = engine_command(run.inputPath, run.tempDir / "output", device=device, **run.options)
        self.log(" ".join(args))
        # Inside Slicer the engine starts from the environment Slicer itself started with (PythonSlicer sets up
        # its own paths); outside Slicer from this process's environment.
        base = slicer.util.startupEnvironment() if hasattr(slicer, "app") else None
        run.engine = EngineProcess(args, env=engine_environment(device, base))
        run.device = device

    def cancel(self) -> None:
        """Stop the running computation: its processes are killed, its temporary files deleted, no node is created."""
        run = self._run
        if run is None:
            return
        run.cancelled = True
        self._abort(run)
        run.result.state = "cancelled"
        self.log(_("Cancelled."))
        if run.completedCallback:
            run.completedCallback(run.result)

    def _abort(self, run: _ActiveRun) -> None:
        run.engine.kill()
        remove_temp_dir(run.tempDir)
        if self._run is run:
            self._run = None

    def _checkBackgroundRun(self, run: _ActiveRun) -> None:
        # Called by a Qt timer on the main thread, where it is safe to touch the scene.
        if self._run is not run:
            return  # cancelled meanwhile
        try:
            finished = self._step(run, timeout=0.0)
        except Exception as error:
            self._abort(run)
            run.result.state, run.result.error = "failed", str(error)
            logging.exception("AutoDDPM background run failed")
            if run.completedCallback:
                run.completedCallback(run.result)
            return
        if not finished:
            qt.QTimer.singleShot(self.pollIntervalMsec, lambda: self._checkBackgroundRun(run))

    def _step(self, run: _ActiveRun, timeout: float) -> bool:
        """Handle the engine's news; finish the run once the engine has exited. True when the run is over."""
        result = run.result
        for event in run.engine.poll(timeout):
            kind = event["event"]
            if kind == "log":
                self.log(event["message"])
                continue
            if kind == "start":
                result.engineStart = event
            elif kind == "warning":
                result.warnings.append(event.get("message", ""))
                self.log(_("Warning: {message}").format(message=event.get("message", "")))
            elif kind == "done":
                result.engineSummary = event
            if run.progressCallback:
                run.progressCallback(event)
            if run.cancelled:
                return True
        if run.cancelled:
            return True
        if not run.engine.finished:
            return False
        return self._finish(run)

    def _finish(self, run: _ActiveRun) -> bool:
        """Import the results of an engine that has exited, or retry on the CPU; True when the run is over."""
        result = run.result
        run.engine.kill()  # already exited: this only releases the pipes
        message = run.engine.error_message() if run.engine.returncode != 0 else ""
        if message and run.device != "cpu" and "out of memory" in message.lower():
            # The engine already shrinks its batches on the GPU; a GPU too small even for that still has the CPU.
            warning = _("The GPU ran out of memory ({message}); running on the CPU instead.").format(message=message)
            result.warnings.append(warning)
            self.log(warning)
            self._launch(run, "cpu")
            return False
        try:
            if message:
                result.state = "failed"
                result.error = _("AutoDDPM failed: {message}").format(message=message)
            elif not result.engineSummary.get("outputs"):
                result.state = "failed"
                result.error = _("AutoDDPM finished without reporting its results; see the log.")
            else:
                result.state = "importing"
                self._importResults(run)
                result.state = "done"
        except Exception as error:
            result.state, result.error = "failed", _("AutoDDPM could not load its results: {error}").format(error=error)
            logging.exception("AutoDDPM result import failed")
        finally:
            remove_temp_dir(run.tempDir)
            self._run = None
        self.log(result.error if result.state == "failed" else self.summaryText(result.summary))
        if run.completedCallback:
            run.completedCallback(result)
        return True

    def _importResults(self, run: _ActiveRun) -> None:
        """Read the engine's files into nodes; on any failure remove the nodes this created."""
        result, inputVolume = run.result, run.result.inputVolume
        scene = inputVolume.GetScene()
        files = result.engineSummary["outputs"]
        threshold = float(result.engineSummary["threshold"])
        created = []

        def outputNode(node, className: str, suffix: str):
            if node is None:
                node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(f"{inputVolume.GetName()} {suffix}"))
                created.append(node)
            return node

        try:
            mask = vtkMRMLScalarVolumeNode()  # outside the scene: only its voxels are needed
            read_volume(mask, files["mask"])
            pseudoHealthy = outputNode(run.outputs["pseudoHealthy"], "vtkMRMLScalarVolumeNode", _("pseudo-healthy"))
            read_volume(pseudoHealthy, files["pseudohealthy"])
            anomalyMap = outputNode(run.outputs["anomalyMap"], "vtkMRMLScalarVolumeNode", _("anomaly map"))
            read_volume(anomalyMap, files["anomaly"])
            spread = None
            if "spread" in files:  # runs with repeats: always a new node, there is no selector for it
                spread = outputNode(None, "vtkMRMLScalarVolumeNode", _("spread"))
                read_volume(spread, files["spread"])
            brain = None
            if "brain" in files:  # what was searched: the map is zero outside it
                brain = outputNode(None, "vtkMRMLScalarVolumeNode", _("searched region"))
                read_volume(brain, files["brain"])
            for node in (mask, pseudoHealthy, anomalyMap, spread, brain):
                if node is not None and not same_geometry(node, inputVolume):
                    raise RuntimeError(_("the engine's output does not have the input's geometry"))
            copy_window_level(inputVolume, pseudoHealthy)
            show_anomaly_map(anomalyMap, threshold)
            segmentation = outputNode(run.outputs["segmentation"], "vtkMRMLSegmentationNode", _("anomaly"))
            prepare_segmentation(segmentation, inputVolume, anomalyMap)
            maskArray = volume_array(mask) > 0
            set_segment_mask(segmentation, maskArray, inputVolume)
            segmentation.SetAttribute(THRESHOLD_ATTRIBUTE, repr(threshold))
            minComponent = float(result.engineSummary.get("postprocessing", {}).get("min_component_mm3") or 0.0)
            segmentation.SetAttribute(MIN_COMPONENT_ATTRIBUTE, repr(minComponent))
            card = read_card(run.options["model"])
            schedule, postprocess = run.options["schedule"], run.options["postprocess"]
            # An input the engine took for a skull-stripped one was thresholded with the card's threshold for those:
            # "Reset to calibrated" returns there, not to that of inputs with skull.
            stripped = bool(result.engineSummary.get("skull_stripped"))
            ResultOrigin(result.engineStart.get("model") or card.name, schedule, card.data.get("license", "?"),
                         self.cardThreshold(card, schedule, postprocess, stripped), postprocess,
                         stripped).store(segmentation)
            place_beside(inputVolume, [pseudoHealthy, anomalyMap, segmentation] + [n for n in (spread, brain) if n is not None])
        except BaseException:
            for node in created:
                scene.RemoveNode(node)
            raise
        result.pseudoHealthyVolume, result.anomalyMapVolume, result.segmentation = pseudoHealthy, anomalyMap, segmentation
        result.spreadVolume, result.brainRegionVolume = spread, brain
        result.threshold = threshold
        result.summary = summarize(maskArray, inputVolume.GetSpacing(), threshold)

    @staticmethod
    def isAnomalySegmentation(node) -> bool:
        """Whether ``node`` is a segmentation made by AutoDDPM (it keeps a link to its anomaly map)."""
        return bool(node and node.IsA("vtkMRMLSegmentationNode") and node.GetNodeReference(ANOMALY_MAP_REFERENCE))

    def setThreshold(self, target: Union[AutoDDPMResult, vtkMRMLSegmentationNode], threshold: float) -> AnomalySummary:
        """Re-threshold the stored anomaly map into the Anomaly segment, without running the model again.

        target: a result of :meth:`process` (its threshold and summary are updated) or its segmentation node.
        Voxels with anomaly > threshold are in the segment, less parts smaller than the run's model drops
        (its post-processing): the engine's mask at that threshold. Returns the new summary.
        """
        segmentation = target.segmentation if isinstance(target, AutoDDPMResult) else target
        anomalyMap = self._anomalyMap(segmentation)
        threshold = check_threshold(threshold)
        region = self.mapBox(anomalyMap)
        mask, summary = settled_mask(region, anomalyMap.GetSpacing(), threshold, self._minComponent(segmentation))
        set_segment_mask(segmentation, mask, anomalyMap, region.start)
        segmentation.SetAttribute(THRESHOLD_ATTRIBUTE, repr(threshold))
        if isinstance(target, AutoDDPMResult):
            target.threshold, target.summary = threshold, summary
        return summary

    def previewThreshold(self, segmentation: vtkMRMLSegmentationNode, threshold: float) -> float:
        """Show the voxels above ``threshold`` in the Anomaly segment, fast enough for each tick of a slider;
        returns their volume in mL.

        The small parts the run's model drops stay, and the segmentation's stored threshold is unchanged:
        :meth:`setThreshold` at the same threshold, once the slider rests, makes the engine's mask of it.
        """
        anomalyMap = self._anomalyMap(segmentation)
        region = self.mapBox(anomalyMap)
        mask = preview_mask(region, threshold)
        set_segment_mask(segmentation, mask, anomalyMap, region.start)
        return int(np.count_nonzero(mask)) * float(np.prod(anomalyMap.GetSpacing())) / 1000.0

    def measure(self, segmentation: vtkMRMLSegmentationNode) -> AnomalySummary:
        """The summary of an AutoDDPM segmentation at its stored threshold."""
        anomalyMap = self._anomalyMap(segmentation)
        threshold = float(segmentation.GetAttribute(THRESHOLD_ATTRIBUTE) or 0.0)
        return settled_mask(self.mapBox(anomalyMap), anomalyMap.GetSpacing(), threshold, self._minComponent(segmentation))[1]

    def mapBox(self, anomalyMap: vtkMRMLScalarVolumeNode) -> MapBox:
        """Where thresholds can select voxels of ``anomalyMap``: found once per map, while its voxels stay the same."""
        image = anomalyMap.GetImageData()
        scalars = image.GetPointData().GetScalars() if image is not None else None
        # VTK's modification times only grow: a new image or a changed voxel array gives another key.
        key = (anomalyMap.GetID(), image.GetMTime() if image is not None else 0,
               scalars.GetMTime() if scalars is not None else 0)
        if self._mapBox is None or self._mapBox[0] != key:
            self._mapBox = (key, map_box(volume_array(anomalyMap)))
        return self._mapBox[1]

    def _anomalyMap(self, segmentation) -> vtkMRMLScalarVolumeNode:
        if not self.isAnomalySegmentation(segmentation):
            raise ValueError(_("This segmentation was not made by AutoDDPM: it has no anomaly map to threshold."))
        return segmentation.GetNodeReference(ANOMALY_MAP_REFERENCE)

    @staticmethod
    def _minComponent(segmentation: vtkMRMLSegmentationNode) -> float:
        return float(segmentation.GetAttribute(MIN_COMPONENT_ATTRIBUTE) or 0.0)

    @staticmethod
    def licenseNotice(model: str, license: str) -> str:
        """What the user of a model whose licence forbids commercial use must know ("" for other models)."""
        if not is_non_commercial(license):
            return ""
        return _("The model '{model}' is licensed {license}: it may be used for non-commercial purposes only "
                 "(research, teaching).").format(model=model, license=license)

    @staticmethod
    def summaryText(summary: Optional[AnomalySummary]) -> str:
        """One line for the user: anomalous volume and largest connected part, in mL."""
        if summary is None:
            return ""
        if summary.voxels == 0:
            return _("No anomaly above threshold {threshold:.3g}.").format(threshold=summary.threshold)
        return _("Anomalous volume {volume:.2f} mL in {parts} part(s); largest part {largest:.2f} mL "
                 "(threshold {threshold:.3g}).").format(volume=summary.volume_ml, parts=summary.components,
                                                        largest=summary.largest_component_ml, threshold=summary.threshold)

    def log(self, text: str, level: int = logging.INFO) -> None:
        if self.logCallback:
            self.logCallback(text)
        else:
            logging.log(level, text)


#
# AutoDDPMTest
#


class AutoDDPMTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, the SelfTests module, ctest).

    By default what a build machine can run without PyTorch: the sample data, the model cards, the input checks
    and the re-thresholding of a map into a segmentation. The model itself runs only when the environment variable
    AUTODDPM_FULL_SELF_TEST is 1 (it needs PyTorch and the engine's packages, which it installs, and minutes on a
    CPU), as SlicerMONAIAuto3DSeg keeps its inference test off build machines.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AutoDDPM_WithoutEngine()
        if os.environ.get(FULL_SELF_TEST_VARIABLE) == "1":
            self.setUp()
            self.test_AutoDDPM_SampleVolume()
        else:
            logging.warning(f"AutoDDPM self-test: the model run was not tested (set {FULL_SELF_TEST_VARIABLE}=1 to test it; "
                            "it installs PyTorch and the engine's packages)")

    def test_AutoDDPM_WithoutEngine(self):
        import SampleData
        from scipy import ndimage
        from vtk.util import numpy_support

        self.delayDisplay(_("Loading the sample FLAIR volume"))
        registerSampleData()
        volume = SampleData.downloadSample(SAMPLE_NAME)
        self.assertIsNotNone(volume)
        logic = AutoDDPMLogic()
        logic.checkInput(volume)
        for card in list_bundled_models():
            self.assertGreater(logic.calibratedThreshold(card.name), 0)

        self.delayDisplay(_("Re-thresholding a map"))
        # A map made from the FLAIR itself (its tumour is bright), in the range of the models' maps.
        voxels = slicer.util.arrayFromVolume(volume).astype(np.float32)
        ijkToRAS = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRAS)
        anomalyMap = slicer.util.addVolumeFromArray(0.1 * voxels / voxels.max(), ijkToRAS=ijkToRAS, name="test anomaly map")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "test anomaly")
        prepare_segmentation(segmentation, volume, anomalyMap)
        segmentation.SetAttribute(MIN_COMPONENT_ATTRIBUTE, "30.0")

        def segmentVoxels() -> int:
            labelmap = slicer.vtkOrientedImageData()
            segmentation.GetBinaryLabelmapRepresentation("Anomaly", labelmap)
            scalars = labelmap.GetPointData().GetScalars()
            return 0 if scalars is None else int(np.count_nonzero(numpy_support.vtk_to_numpy(scalars)))

        anomaly = slicer.util.arrayFromVolume(anomalyMap)
        threshold = float(np.percentile(anomaly, 97))
        logic.previewThreshold(segmentation, threshold)
        self.assertEqual(segmentVoxels(), int((anomaly > threshold).sum()))
        summary = logic.setThreshold(segmentation, threshold)
        labels, _count = ndimage.label(anomaly > threshold, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(labels.ravel())[1:]  # voxels per 26-connected part
        kept = sizes[sizes * float(np.prod(anomalyMap.GetSpacing())) >= 30.0]
        self.assertEqual((summary.voxels, summary.components), (int(kept.sum()), len(kept)))
        self.assertEqual(segmentVoxels(), summary.voxels)
        self.delayDisplay(_("Test passed"))

    def test_AutoDDPM_SampleVolume(self):
        import SampleData

        self.delayDisplay(_("Loading the sample FLAIR volume"))
        registerSampleData()
        fullVolume = SampleData.downloadSample(SAMPLE_NAME)
        self.assertIsNotNone(fullVolume)

        # Two axial slices through the tumour keep the test quick on a CPU.
        maskNode = slicer.util.loadLabelVolume(str(resources_dir() / "SampleData" / f"{SAMPLE_NAME}_mask.nii.gz"))
        tumourSlice = int(np.argmax(slicer.util.arrayFromVolume(maskNode).sum(axis=(1, 2))))
        slicer.mrmlScene.RemoveNode(maskNode)
        first = max(tumourSlice - 1, 0)
        ijkToRAS = vtk.vtkMatrix4x4()
        fullVolume.GetIJKToRASMatrix(ijkToRAS)
        origin = ijkToRAS.MultiplyPoint([0, 0, first, 1])
        for row in range(3):
            ijkToRAS.SetElement(row, 3, origin[row])
        inputVolume = slicer.util.addVolumeFromArray(
            slicer.util.arrayFromVolume(fullVolume)[first:first + 2].copy(), ijkToRAS=ijkToRAS, name="TwoSlices")
        inputBefore = slicer.util.arrayFromVolume(inputVolume).copy()

        self.delayDisplay(_("Running AutoDDPM on two slices"))
        logic = AutoDDPMLogic()
        logic.setupPythonRequirements()
        events = []
        result = logic.process(inputVolume, schedule="fast", device="auto", progressCallback=events.append)

        self.assertEqual(result.state, "done")
        self.assertTrue(any(event["event"] == "progress" for event in events))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(inputVolume), inputBefore)
        for node in (result.pseudoHealthyVolume, result.anomalyMapVolume):
            self.assertTrue(same_geometry(node, inputVolume))
        self.assertEqual(result.summary.voxels, result.engineSummary["anomalous_voxels"])
        segmentArray = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentation, "Anomaly", inputVolume)
        self.assertEqual(int(segmentArray.sum()), result.engineSummary["anomalous_voxels"])

        higher = logic.setThreshold(result, result.threshold * 2 + 1e-6)
        self.assertLessEqual(higher.voxels, result.engineSummary["anomalous_voxels"])

        slicer.util.setSliceViewerLayers(background=inputVolume, foreground=result.anomalyMapVolume, foregroundOpacity=0.5)
        self.delayDisplay(logic.summaryText(result.summary))
        self.delayDisplay(_("Test passed"))
