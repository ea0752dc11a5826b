"""The module's Logic against real MRML nodes and the real engine (tiny model)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import standins
from scene_helpers import (
    add_head_volume,
    add_image_volume,
    make_head_volume,
    new_scene,
    save_and_reopen,
    segment_voxels,
    stripped_sample,
)

from AutoDDPMLib.volumes.brain_extraction import deepbet_available

needs_deepbet = pytest.mark.skipif(not deepbet_available(), reason='needs deepbet\'s networks: pip install --no-deps "deepbet==1.0.2"')


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def to_world(node) -> np.ndarray:
    """The matrix from the node's own coordinates to world coordinates (its parent transforms applied)."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    assert slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(node.GetParentTransformNode(), None, matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def world_ijk_to_ras(node) -> np.ndarray:
    """Where a volume's voxels are in the world: its IJK-to-RAS matrix under its transforms."""
    return to_world(node) @ ijk_to_ras(node)


def segmentation_geometry_in_world(segmentation) -> tuple[np.ndarray, tuple]:
    """The segmentation's reference image geometry (the grid the Segment Editor paints on), in world coordinates."""
    import slicer
    import vtk

    matrix, extent = vtk.vtkMatrix4x4(), [0] * 6
    geometry = segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, matrix, extent)
    local = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    return to_world(segmentation) @ local, tuple(extent)


def segment_points_in_world(segmentation) -> np.ndarray:
    """The world coordinates (mm, rounded to 0.01) of the Anomaly segment's voxels, sorted."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    labelmap = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation("Anomaly", labelmap)
    extent = labelmap.GetExtent()
    dims = [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)]
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1])
    k, j, i = np.nonzero(values)
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)])
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    local = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    return sort_points((to_world(segmentation) @ local @ ijk)[:3].T)


def mask_points_in_world(mask: np.ndarray, volume) -> np.ndarray:
    """The world coordinates of the voxels of ``mask`` ([k, j, i] on ``volume``'s grid), as segment_points_in_world."""
    k, j, i = np.nonzero(mask)
    return sort_points((world_ijk_to_ras(volume) @ np.stack([i, j, k, np.ones_like(i)]))[:3].T)


def sort_points(points: np.ndarray) -> np.ndarray:
    points = np.round(points, 2) + 0.0  # + 0.0: no -0.0
    return points[np.lexsort(points.T[::-1])]


def move_by_50mm(scene, volume) -> None:
    """Put ``volume`` under a registration: 50 mm to the right and 30 degrees about the vertical axis."""
    import vtk

    transform = vtk.vtkTransform()
    transform.Translate(50.0, 0.0, 0.0)
    transform.RotateZ(30.0)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetMatrixTransformToParent(transform.GetMatrix())
    volume.SetAndObserveTransformNodeID(node.GetID())


@pytest.fixture(scope="module")
def finished_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """One blocking run on a synthetic head with a bright lesion, shared by the checks of its results."""
    from AutoDDPM import AutoDDPMLogic

    folder = tmp_path_factory.mktemp("run")
    scene = new_scene()
    volume = add_head_volume(scene, folder)
    before = np.array(__import__("slicer").util.arrayFromVolume(volume), copy=True)
    geometry = ijk_to_ras(volume)
    events = []
    logic = AutoDDPMLogic()
    result = logic.process(volume, model=str(tiny_model), seed=0, progressCallback=events.append)
    return dict(scene=scene, volume=volume, before=before, geometry=geometry, result=result, events=events, logic=logic)


def test_outputs_have_the_inputs_geometry(finished_run) -> None:
    result, volume = finished_run["result"], finished_run["volume"]
    assert result.state == "done"
    dims = volume.GetImageData().GetDimensions()
    for node in (result.pseudoHealthyVolume, result.anomalyMapVolume):
        assert node.GetScene() is finished_run["scene"]
        assert node.GetImageData().GetDimensions() == dims
        np.testing.assert_allclose(ijk_to_ras(node), finished_run["geometry"], atol=1e-4)
    assert result.pseudoHealthyVolume.GetName() == "head pseudo-healthy"
    assert result.anomalyMapVolume.GetName() == "head anomaly map"
    # The segmentation's reference geometry is the input volume.
    import slicer

    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert result.segmentation.GetNodeReference(role) is volume


def test_segmentation_matches_the_engines_mask(finished_run) -> None:
    result = finished_run["result"]
    engine_voxels = result.engineSummary["anomalous_voxels"]
    assert 0 < engine_voxels < volume_size(finished_run["volume"])
    assert segment_voxels(result.segmentation) == engine_voxels
    assert result.summary.voxels == engine_voxels
    # Same mL as the engine reports, and the largest part cannot be bigger than the whole.
    assert result.summary.volume_ml == pytest.approx(result.engineSummary["anomalous_volume_ml"], rel=1e-3)
    assert 0 < result.summary.largest_component_ml <= result.summary.volume_ml
    # The engine's mask is exactly the anomaly map above its threshold.
    import slicer

    anomaly = slicer.util.arrayFromVolume(result.anomalyMapVolume)
    assert int((anomaly > result.threshold).sum()) == engine_voxels


def volume_size(node) -> int:
    return int(np.prod(node.GetImageData().GetDimensions()))


def test_results_are_shown_and_placed_in_the_inputs_study(finished_run) -> None:
    import slicer

    result, volume = finished_run["result"], finished_run["volume"]
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(finished_run["scene"])
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volume))
    assert hierarchy.GetItemLevel(study) == "Study"
    for node in (result.pseudoHealthyVolume, result.anomalyMapVolume, result.segmentation):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    # Pseudo-healthy volume shown like the input; anomaly map with its colour table.
    display = result.pseudoHealthyVolume.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (700, 400)
    assert result.anomalyMapVolume.GetDisplayNode().GetColorNode().GetName() == "AutoDDPM Anomaly"
    segment = result.segmentation.GetSegmentation().GetSegment("Anomaly")
    import vtk

    terminology = vtk.reference("")
    assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
    terminology = str(terminology)
    assert "Lesion" in terminology and "Brain" in terminology
    assert "mL" in finished_run["logic"].summaryText(result.summary)


def test_input_is_untouched(finished_run) -> None:
    import slicer

    volume = finished_run["volume"]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), finished_run["before"])
    np.testing.assert_array_equal(ijk_to_ras(volume), finished_run["geometry"])
    assert volume.GetStorageNode() is None  # writing the engine's input did not attach a file to the node


def test_progress_events_arrive_in_order(finished_run) -> None:
    kinds = [event["event"] for event in finished_run["events"]]
    assert kinds.index("start") < kinds.index("done")
    # what the panel's log names: the engine says which backend runs the network
    assert finished_run["result"].engineStart["backend"] in ("torch", "onnxruntime")
    fractions = [event["fraction"] for event in finished_run["events"] if event["event"] == "progress"]
    assert len(fractions) >= 3 and fractions == sorted(fractions) and fractions[-1] <= 1.0


def test_live_rethreshold(finished_run) -> None:
    logic, result = finished_run["logic"], finished_run["result"]
    import slicer

    anomaly = slicer.util.arrayFromVolume(result.anomalyMapVolume)
    original = result.threshold
    engine_voxels = result.engineSummary["anomalous_voxels"]
    try:
        counts = []
        for threshold in (0.5 * original, original, 2 * original, float(anomaly.max())):
            summary = logic.setThreshold(result, threshold)
            counts.append(segment_voxels(result.segmentation))
            assert counts[-1] == summary.voxels == int((anomaly > threshold).sum())
            assert result.summary is summary and result.threshold == threshold
        assert counts == sorted(counts, reverse=True)
        assert counts[1] == engine_voxels  # the engine's own threshold gives back the engine's mask
        assert counts[0] > counts[2]  # the thresholds really move the segmentation
        assert counts[-1] == 0
        # The re-threshold is stored with the segmentation: it survives a scene save and reload.
        assert float(result.segmentation.GetAttribute("AutoDDPM.Threshold")) == float(anomaly.max())
        assert logic.measure(result.segmentation).voxels == 0
    finally:
        logic.setThreshold(result, original)


def test_rethreshold_refuses_a_foreign_segmentation(scene, logic) -> None:
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError, match="not made by AutoDDPM"):
        logic.setThreshold(segmentation, 0.1)


def test_background_run_reports_completion(scene, logic, tiny_model, temp_root, tmp_path) -> None:
    volume = add_head_volume(scene, tmp_path, lesion=False, seed=1)
    volume.SetName("IXI012 T1/brain")  # the engine sees the node's name: a T1 given to a FLAIR model
    # A registration transform on the input applies to the results too.
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    finished = []
    result = logic.process(volume, model=str(tiny_model), waitForCompletion=False, completedCallback=finished.append)
    assert result.state == "running" and logic.isRunning
    assert result.pseudoHealthyVolume is None  # nothing is created before the engine succeeds
    while not finished:
        standins.process_events()
    assert finished == [result] and result.state == "done" and not logic.isRunning
    assert segment_voxels(result.segmentation) == result.engineSummary["anomalous_voxels"]
    assert any("looks like a T1 image" in warning for warning in result.warnings)
    for node in (result.pseudoHealthyVolume, result.anomalyMapVolume, result.segmentation):
        assert node.GetTransformNodeID() == transform.GetID()
    assert list(temp_root.iterdir()) == []


def test_cancel_mid_run_leaves_nothing(scene, logic, tiny_model, temp_root, tmp_path) -> None:
    volume = add_head_volume(scene, tmp_path)
    before = node_ids(scene)
    events, finished = [], []

    def on_event(event: dict) -> None:
        events.append(event)
        if event["event"] == "progress":
            logic.cancel()

    result = logic.process(volume, model=str(tiny_model), waitForCompletion=False,
                           progressCallback=on_event, completedCallback=finished.append)
    engine = logic._run.engine.process
    assert list(temp_root.iterdir())  # the run's folder exists while it runs
    # The engine's start-up (importing PyTorch) takes seconds, more on a busy machine: a generous deadline.
    deadline = time.monotonic() + 300
    while not finished and time.monotonic() < deadline:
        standins.process_events()
    assert finished == [result] and result.state == "cancelled"
    assert [event["event"] for event in events if event["event"] != "log"][-1] == "progress"
    assert engine.poll() is not None  # the engine process is gone
    assert not logic.isRunning
    assert node_ids(scene) == before
    assert list(temp_root.iterdir()) == []
    # Timers still pending from the cancelled run do nothing.
    while standins.process_events(0.3):
        pass
    assert node_ids(scene) == before


def test_engine_failure_is_reported_and_leaves_nothing(scene, logic, tiny_model, temp_root, tmp_path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model.json").write_bytes((tiny_model / "model.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"not weights")
    volume = add_head_volume(scene, tmp_path)
    before = node_ids(scene)
    with pytest.raises(RuntimeError, match="corrupt"):
        logic.process(volume, model=str(broken))
    assert node_ids(scene) == before
    assert list(temp_root.iterdir()) == []
    assert not logic.isRunning


def _labelmap(scene, volume):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    node.SetAndObserveImageData(volume.GetImageData())
    return node


def _four_d(scene, volume):
    import vtk

    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 4)
    image.AllocateScalars(vtk.VTK_FLOAT, 5)  # five time points per voxel, as a 4D MultiVolume stores them
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fourD")
    node.SetAndObserveImageData(image)
    return node


def _vector(scene, volume):
    import vtk

    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 4)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    node.SetAndObserveImageData(image)
    return node


def _no_signal(scene, volume):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    node.SetAndObserveImageData(__import__("vtk").vtkImageData())
    node.GetImageData().DeepCopy(volume.GetImageData())
    slicer.util.arrayFromVolume(node)[:] = 0
    return node


@pytest.mark.parametrize("make, message", [
    (lambda scene, volume: None, "Select an input volume"),
    (_labelmap, "label map"),
    (_four_d, "5 values per voxel"),
    (_vector, "3 values per voxel"),
    (_no_signal, "no signal"),
])
def test_bad_inputs_fail_clearly_before_starting(scene, logic, tiny_model, temp_root, tmp_path, make, message) -> None:
    volume = add_head_volume(scene, tmp_path)
    bad = make(scene, volume)
    before = node_ids(scene)
    with pytest.raises(ValueError, match=message):
        logic.process(bad, model=str(tiny_model))
    assert node_ids(scene) == before
    assert list(temp_root.iterdir()) == []
    assert not logic.isRunning


def test_given_output_nodes_are_filled_not_duplicated(scene, logic, tiny_model, temp_root, tmp_path) -> None:
    volume = add_head_volume(scene, tmp_path)
    pseudo = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my pseudo-healthy")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    volumes_before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    result = logic.process(volume, model=str(tiny_model), outputPseudoHealthy=pseudo, outputSegmentation=segmentation)
    assert result.pseudoHealthyVolume is pseudo and result.segmentation is segmentation
    assert pseudo.GetName() == "my pseudo-healthy"
    # Only the anomaly map was missing: one new volume.
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before + 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert pseudo.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    assert segment_voxels(segmentation) == result.engineSummary["anomalous_voxels"]


def test_repeats_add_a_spread_volume(scene, logic, tiny_model, temp_root, tmp_path) -> None:
    import slicer

    volume = add_head_volume(scene, tmp_path)
    single = logic.process(volume, model=str(tiny_model), seed=5)
    assert single.spreadVolume is None
    repeated = logic.process(volume, model=str(tiny_model), seed=5, repeats=2)
    spread = repeated.spreadVolume
    assert spread.GetScene() is scene and spread.GetName() == "head spread"
    assert spread.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(ijk_to_ras(spread), ijk_to_ras(volume), atol=1e-4)
    values = slicer.util.arrayFromVolume(spread)
    assert values.min() >= 0 and values.max() > 0
    # The other outputs are the mean over the runs: not the seed's single run, and the segmentation is their threshold.
    mean_map = slicer.util.arrayFromVolume(repeated.anomalyMapVolume)
    assert not np.array_equal(mean_map, slicer.util.arrayFromVolume(single.anomalyMapVolume))
    assert segment_voxels(repeated.segmentation) == int((mean_map > repeated.threshold).sum())
    assert list(temp_root.iterdir()) == []


@pytest.mark.parametrize("repeats", [0, 21, 2.5])
def test_bad_repeats_fail_before_starting(scene, logic, tiny_model, temp_root, tmp_path, repeats) -> None:
    volume = add_head_volume(scene, tmp_path)
    before = node_ids(scene)
    with pytest.raises(ValueError, match="Repeats must be a whole number from 1 to 20"):
        logic.process(volume, model=str(tiny_model), repeats=repeats)
    assert node_ids(scene) == before
    assert list(temp_root.iterdir()) == []


def test_input_cannot_be_an_output(scene, logic, tiny_model, temp_root, tmp_path) -> None:
    volume = add_head_volume(scene, tmp_path)
    before = node_ids(scene)
    with pytest.raises(ValueError, match="cannot also be an output"):
        logic.process(volume, model=str(tiny_model), outputAnomalyMap=volume)
    assert node_ids(scene) == before and list(temp_root.iterdir()) == []


def test_unknown_model_fails_clearly(scene, logic, temp_root, tmp_path) -> None:
    volume = add_head_volume(scene, tmp_path)
    before = node_ids(scene)
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        logic.process(volume, model="no-such-model")
    assert node_ids(scene) == before and list(temp_root.iterdir()) == []


def test_each_schedule_has_its_calibrated_threshold(logic, tiny_model_with) -> None:
    from AutoDDPM import Schedule

    fast = {"mask_tau": 0.05, "anomaly": 0.05}
    model = tiny_model_with("model", thresholds=dict(fast, schedules={"reference": {"mask_tau": 0.2, "anomaly": 0.3}}))
    assert logic.calibratedThreshold(str(model), Schedule.reference) == 0.3
    assert logic.calibratedThreshold(str(model), "fast") == 0.05
    with pytest.raises(ValueError, match="unknown model"):
        logic.calibratedThreshold("no-such-model")


def test_second_run_while_running_is_refused(scene, logic, tiny_model, temp_root, tmp_path) -> None:
    volume = add_head_volume(scene, tmp_path)
    logic.process(volume, model=str(tiny_model), waitForCompletion=False)
    with pytest.raises(RuntimeError, match="already running"):
        logic.process(volume, model=str(tiny_model))
    logic.cancel()
    assert list(temp_root.iterdir()) == []


def test_gpu_out_of_memory_retries_on_the_cpu(scene, logic, tiny_model, temp_root, tmp_path, monkeypatch) -> None:
    import AutoDDPM

    # An engine whose GPU is always too small: any device but the CPU fails the way PyTorch does.
    engine = tmp_path / "small_gpu_engine.py"
    engine.write_text(
        "import runpy, sys\n"
        "if sys.argv[sys.argv.index('--device') + 1] != 'cpu':\n"
        "    print('autoddpm: error: CUDA out of memory. Tried to allocate 2.00 GiB', file=sys.stderr)\n"
        "    sys.exit(2)\n"
        "sys.argv[0] = 'autoddpm'\n"
        "runpy.run_module('AutoDDPMLib.cli', run_name='__main__')\n")
    real_command = AutoDDPM.engine_command
    commands = []

    def small_gpu_command(*args, **kwargs):
        command = real_command(*args, **kwargs)
        commands.append(command)
        return [command[0], str(engine)] + command[3:]

    monkeypatch.setattr(AutoDDPM, "engine_command", small_gpu_command)
    volume = add_head_volume(scene, tmp_path)
    result = logic.process(volume, model=str(tiny_model), device="cuda")
    assert [command[command.index("--device") + 1] for command in commands] == ["cuda", "cpu"]
    assert result.state == "done" and result.engineStart["device"] == "cpu"
    assert any("running on the CPU" in warning for warning in result.warnings)
    assert list(temp_root.iterdir()) == []


def test_post_processed_run_shows_the_searched_region_and_rethresholds_as_the_engine(
        scene, logic, tiny_model_with, temp_root, tmp_path) -> None:
    import slicer

    postprocessing = {"polarity": "bright", "brain_erosion_mm": 2.0, "median_mm": 3.0, "min_component_mm3": 30.0}
    thresholds = {"mask_tau": 0.05, "anomaly": 0.05, "calibrated": True, "calibration": {"schedule": "fast"},
                  "postprocessed": {"anomaly": 0.002, "mask_tau": 0.05, "settings": postprocessing}}
    model = tiny_model_with("pp", postprocessing=postprocessing, thresholds=thresholds)
    assert logic.calibratedThreshold(str(model)) == 0.002  # the slider starts at the post-processed map's threshold
    volume = add_head_volume(scene, tmp_path)
    result = logic.process(volume, model=str(model), seed=0)
    # The engine reports every setting, the brain region the card leaves out included.
    assert result.threshold == 0.002 and result.engineSummary["postprocessing"] == dict(postprocessing, brain_region="head")
    brain = slicer.util.arrayFromVolume(result.brainRegionVolume) > 0
    anomaly = slicer.util.arrayFromVolume(result.anomalyMapVolume)
    assert brain.any() and not brain.all() and (anomaly[~brain] == 0).all()
    np.testing.assert_allclose(ijk_to_ras(result.brainRegionVolume), ijk_to_ras(volume), atol=1e-4)
    engine_voxels = result.engineSummary["anomalous_voxels"]
    assert segment_voxels(result.segmentation) == engine_voxels
    # Re-thresholding drops the parts the engine drops: at the run's threshold it gives the engine's mask back,
    # and at any threshold no kept part is smaller than the model's smallest.
    from scipy import ndimage

    voxel_mm3 = float(np.prod(volume.GetSpacing()))
    for threshold in (0.0, 0.5 * result.threshold, result.threshold):
        labels, _ = ndimage.label(anomaly > threshold, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(labels.ravel())
        kept = int(sum(size for label, size in enumerate(sizes) if label and size * voxel_mm3 >= 30.0))
        summary = logic.setThreshold(result, threshold)
        assert summary.voxels == segment_voxels(result.segmentation) == kept
    assert logic.setThreshold(result, result.threshold).voxels == engine_voxels
    assert list(temp_root.iterdir()) == []


POSTPROCESSING = {"polarity": "bright", "brain_erosion_mm": 2.0, "median_mm": 3.0, "min_component_mm3": 30.0}


@pytest.fixture()
def deepbet_model(tiny_model_with) -> Path:
    """The tiny model with post-processing, and thresholds calibrated for its head region (0.002) and for deepbet's
    brain region (0.003), the latter as `autoddpm calibrate --with-deepbet` writes it."""
    from AutoDDPMLib.detection.postprocessing import option_settings

    deepbet = {"anomaly": 0.003, "mask_tau": 0.05, "settings": option_settings("deepbet", POSTPROCESSING)}
    thresholds = {"mask_tau": 0.05, "anomaly": 0.05, "calibrated": True, "calibration": {"schedule": "fast"},
                  "postprocessed": {"anomaly": 0.002, "mask_tau": 0.05, "settings": POSTPROCESSING},
                  "postprocessed_alternatives": [deepbet]}
    return tiny_model_with("deepbet", postprocessing=POSTPROCESSING, thresholds=thresholds)


@needs_deepbet
def test_the_deepbet_brain_region_is_searched_with_its_own_calibrated_threshold(
        scene, logic, deepbet_model, temp_root, tmp_path) -> None:
    import slicer

    from AutoDDPMLib.detection.postprocessing import option_settings
    from AutoDDPMLib.slicer_bridge.results import ResultOrigin
    from AutoDDPMLib.volumes.brain_extraction import deepbet_extractor
    from AutoDDPMLib.volumes.slices import AxialStack

    assert logic.calibratedThreshold(str(deepbet_model)) == 0.002
    assert logic.calibratedThreshold(str(deepbet_model), "fast", "deepbet") == 0.003
    volume = add_head_volume(scene, tmp_path)
    lines = []
    logic.logCallback = lines.append
    result = logic.process(volume, model=str(deepbet_model), seed=0, postprocess="deepbet")
    # The engine was asked for deepbet's region, searched it, and thresholded with its threshold.
    assert any("AutoDDPMLib.cli" in line and "--postprocess deepbet" in line for line in lines)
    settings = option_settings("deepbet", POSTPROCESSING)
    assert result.engineSummary["postprocessing"] == settings and settings["brain_region"] == "deepbet"
    assert result.threshold == 0.003
    # The searched region shown is deepbet's mask of the input (the same voxels, in whichever order), and the map is
    # zero outside it.
    brain = slicer.util.arrayFromVolume(result.brainRegionVolume) > 0
    deepbet_mask = deepbet_extractor()(AxialStack.from_image(make_head_volume()).array)
    assert 0 < int(brain.sum()) == int(deepbet_mask.sum()) < brain.size
    assert (slicer.util.arrayFromVolume(result.anomalyMapVolume)[~brain] == 0).all()
    assert segment_voxels(result.segmentation) == result.engineSummary["anomalous_voxels"]
    # The result keeps the region and the threshold calibrated for it ("Reset to calibrated" returns there).
    origin = ResultOrigin.read(result.segmentation)
    assert (origin.calibrated_threshold, origin.postprocess) == (0.003, "deepbet")
    assert list(temp_root.iterdir()) == []


def test_the_deepbet_brain_region_without_deepbet_fails_before_starting(
        scene, logic, deepbet_model, temp_root, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import AutoDDPMLib.volumes.brain_extraction  # noqa: F401  (loaded while its package can still be found)

    volume = add_head_volume(scene, tmp_path)
    before = node_ids(scene)
    monkeypatch.setattr(sys, "path", [])  # no installed distribution can be found: deepbet is not installed
    with pytest.raises(RuntimeError, match=r'needs deepbet\'s networks: pip install --no-deps "deepbet==1.0.2"'):
        logic.process(volume, model=str(deepbet_model), postprocess="deepbet")
    assert node_ids(scene) == before and list(temp_root.iterdir()) == [] and not logic.isRunning


@pytest.mark.parametrize("postprocess, message", [
    ("deepbet", "does not post-process its anomaly map"),  # the tiny model searches no brain region
    ("none", "Unknown brain region 'none'"),
])
def test_a_brain_region_the_model_cannot_search_fails_before_starting(
        scene, logic, tiny_model, temp_root, tmp_path, postprocess, message) -> None:
    volume = add_head_volume(scene, tmp_path)
    before = node_ids(scene)
    with pytest.raises(ValueError, match=message):
        logic.calibratedThreshold(str(tiny_model), "fast", postprocess)
    with pytest.raises(ValueError, match=message):
        logic.process(volume, model=str(tiny_model), postprocess=postprocess)
    assert node_ids(scene) == before and list(temp_root.iterdir()) == [] and not logic.isRunning


def test_a_skull_stripped_input_is_thresholded_and_reset_with_the_models_threshold_for_stripped_inputs(
        scene, logic, stripped_model, temp_root, tmp_path) -> None:
    """Given no threshold the engine picks it: for an input it takes for a skull-stripped one, the card's threshold
    for those, which the result keeps as its calibrated threshold ("Reset to calibrated" returns there); told the
    input is not stripped, the card's own threshold."""
    from AutoDDPMLib.models.bundle import read_card
    from AutoDDPMLib.slicer_bridge.results import ResultOrigin

    model = str(stripped_model)
    with_skull = logic.calibratedThreshold(model)
    stripped = logic.calibratedThreshold(model, "fast", "card", skullStripped=True)
    assert stripped == read_card(model).data["thresholds"]["postprocessed_alternatives"][0]["anomaly"] != with_skull
    volume = add_image_volume(scene, tmp_path, "stripped", stripped_sample())
    lines = []
    logic.logCallback = lines.append
    # The engine looks at the input (no --skull-stripped: auto) and warns, in the log, that it looks stripped.
    result = logic.process(volume, model=model, seed=0)
    (command,) = [line for line in lines if "AutoDDPMLib.cli" in line]
    assert "--skull-stripped" not in command and "--threshold" not in command
    assert result.engineSummary["skull_stripped"] and result.engineSummary["postprocessing"]["skull_stripped_input"]
    assert result.threshold == stripped == float(result.segmentation.GetAttribute("AutoDDPM.Threshold"))
    assert segment_voxels(result.segmentation) == result.engineSummary["anomalous_voxels"]
    assert any("its threshold for skull-stripped inputs was used" in line for line in lines)
    origin = ResultOrigin.read(result.segmentation)
    assert (origin.calibrated_threshold, origin.skull_stripped, origin.postprocess) == (stripped, True, "card")
    # Told it is not stripped, the engine believes the caller.
    lines.clear()
    result = logic.process(volume, model=model, seed=0, skullStripped=False)
    assert any("AutoDDPMLib.cli" in line and "--skull-stripped no" in line for line in lines)
    assert not result.engineSummary["skull_stripped"] and result.threshold == with_skull
    origin = ResultOrigin.read(result.segmentation)
    assert (origin.calibrated_threshold, origin.skull_stripped) == (with_skull, False)
    assert list(temp_root.iterdir()) == []


def test_a_skull_stripped_input_the_run_cannot_threshold_fails_clearly(
        scene, logic, stripped_model, deepbet_model, temp_root, tmp_path) -> None:
    volume = add_head_volume(scene, tmp_path)
    before = node_ids(scene)
    with pytest.raises(ValueError, match="skullStripped must be None"):
        logic.process(volume, model=str(stripped_model), skullStripped="yes")
    # Said to be stripped, for a model without a threshold for stripped inputs: the engine's reason, and what to do.
    with pytest.raises(RuntimeError, match="no threshold calibrated for skull-stripped inputs.*--with-stripped"):
        logic.process(volume, model=str(deepbet_model), skullStripped=True)
    assert node_ids(scene) == before and list(temp_root.iterdir()) == [] and not logic.isRunning


def test_the_stripped_inputs_threshold_falls_back_to_the_models_own(logic, deepbet_model, tiny_model) -> None:
    # No threshold calibrated for stripped inputs (or no post-processing at all): the engine thresholds a stripped
    # input as any other, and so does "Reset to calibrated".
    assert logic.calibratedThreshold(str(deepbet_model), "fast", "card", skullStripped=True) == 0.002
    assert logic.calibratedThreshold(str(tiny_model), "fast", "card", skullStripped=True) == 0.05


def test_a_run_is_given_the_threshold_only_where_the_user_chose_another(logic, stripped_model) -> None:
    """What the panel's Apply gives the Logic for the threshold its slider holds: None (the engine picks) for a
    threshold calibrated for the model, schedule and brain region, the stripped inputs' included (shown after a run
    on a stripped input); a threshold the user chose, as chosen."""
    from AutoDDPM import BrainRegion, Schedule

    from AutoDDPMLib.slicer_bridge.thresholding import slider_decimals

    model = str(stripped_model)
    with_skull = logic.calibratedThreshold(model)
    stripped = logic.calibratedThreshold(model, "fast", "card", skullStripped=True)
    # As calibrated, or as the slider shows it (three significant digits) after moving away and back.
    for calibrated in (with_skull, stripped, float(f"{with_skull:.3g}"), float(f"{stripped:.3g}")):
        assert logic.runThreshold(model, Schedule.fast, BrainRegion.card, calibrated) is None
    for chosen in (2 * with_skull, 0.5 * stripped, with_skull + 10.0 ** -slider_decimals(with_skull)):
        assert logic.runThreshold(model, Schedule.fast, BrainRegion.card, chosen) == chosen
    with pytest.raises(ValueError, match="unknown model"):
        logic.runThreshold("no-such-model", "fast", "card", with_skull)


def test_results_of_a_transformed_input_overlay_it(scene, logic, tiny_model_with, temp_root, tmp_path) -> None:
    """An input under a registration: every output lies where the input lies in the world, voxel for voxel."""
    import slicer

    postprocessing = {"polarity": "bright", "brain_erosion_mm": 2.0, "median_mm": 3.0, "min_component_mm3": 0.0}
    model = tiny_model_with("pp", postprocessing=postprocessing)
    volume = add_head_volume(scene, tmp_path)
    move_by_50mm(scene, volume)
    # A threshold on the post-processed map that flags part of the head.
    result = logic.process(volume, model=str(model), seed=0, threshold=0.002)
    assert result.brainRegionVolume is not None
    for node in (result.pseudoHealthyVolume, result.anomalyMapVolume, result.brainRegionVolume):
        np.testing.assert_allclose(world_ijk_to_ras(node), world_ijk_to_ras(volume), atol=1e-4)
    geometry, extent = segmentation_geometry_in_world(result.segmentation)
    np.testing.assert_allclose(geometry, world_ijk_to_ras(volume), atol=1e-4)
    dims = volume.GetImageData().GetDimensions()
    assert extent == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    mask = slicer.util.arrayFromVolume(result.anomalyMapVolume) > result.threshold
    assert mask.any()
    np.testing.assert_array_equal(segment_points_in_world(result.segmentation), mask_points_in_world(mask, volume))
    # Re-thresholding keeps the overlay.
    lower = logic.setThreshold(result, 0.001)
    mask = slicer.util.arrayFromVolume(result.anomalyMapVolume) > 0.001
    assert lower.voxels == int(mask.sum())
    np.testing.assert_array_equal(segment_points_in_world(result.segmentation), mask_points_in_world(mask, volume))


@pytest.mark.parametrize("order", ["segmentation first", "placed first"])
def test_segmentation_of_a_transformed_input_overlays_it_in_any_order(scene, tmp_path, order) -> None:
    """prepare_segmentation, set_segment_mask and place_beside give the same overlay whichever comes first."""
    import slicer

    from AutoDDPMLib.slicer_bridge.results import place_beside, prepare_segmentation, set_segment_mask

    volume = add_head_volume(scene, tmp_path)
    move_by_50mm(scene, volume)
    anomaly_map = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "map")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    mask = np.zeros(slicer.util.arrayFromVolume(volume).shape, bool)
    mask[2:4, 10:15, 20:30] = True
    if order == "placed first":
        place_beside(volume, [anomaly_map, segmentation])
    prepare_segmentation(segmentation, volume, anomaly_map)
    set_segment_mask(segmentation, mask, volume)
    if order == "segmentation first":
        place_beside(volume, [anomaly_map, segmentation])
    geometry, _ = segmentation_geometry_in_world(segmentation)
    np.testing.assert_allclose(geometry, world_ijk_to_ras(volume), atol=1e-4)
    np.testing.assert_array_equal(segment_points_in_world(segmentation), mask_points_in_world(mask, volume))


def test_a_result_saved_with_the_scene_and_reopened_keeps_its_map_threshold_and_origin(
        scene, logic, tiny_model_with, temp_root, tmp_path) -> None:
    """Save the scene, open it again: the segmentation still knows its map, threshold, smallest part and origin,
    and re-thresholds as before."""
    import slicer

    from AutoDDPM import AutoDDPMLogic
    from AutoDDPMLib.models.bundle import read_card
    from AutoDDPMLib.slicer_bridge.results import ResultOrigin

    postprocessing = {"polarity": "bright", "brain_erosion_mm": 2.0, "median_mm": 3.0, "min_component_mm3": 30.0}
    thresholds = {"mask_tau": 0.05, "anomaly": 0.05, "calibrated": True, "calibration": {"schedule": "fast"},
                  "postprocessed": {"anomaly": 0.002, "mask_tau": 0.05, "settings": postprocessing}}
    model = tiny_model_with("pp", postprocessing=postprocessing, thresholds=thresholds, license="CC BY-SA 3.0")
    volume = add_head_volume(scene, tmp_path)
    result = logic.process(volume, model=str(model), seed=0)
    engineThreshold, lowered = result.threshold, 0.5 * result.threshold
    lower = logic.setThreshold(result, lowered)
    origin = ResultOrigin(read_card(model).name, "fast", "CC BY-SA 3.0", 0.002)
    assert ResultOrigin.read(result.segmentation) == origin
    saved = tmp_path / "saved"
    saved.mkdir()
    reopened = save_and_reopen(scene, saved)

    segmentation = reopened.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert AutoDDPMLogic.isAnomalySegmentation(segmentation)
    assert segmentation.GetNodeReference("AutoDDPM.AnomalyMap").GetName() == result.anomalyMapVolume.GetName()
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReference(role).GetName() == volume.GetName()
    assert float(segmentation.GetAttribute("AutoDDPM.Threshold")) == lowered
    assert float(segmentation.GetAttribute("AutoDDPM.MinComponentMm3")) == 30.0
    assert ResultOrigin.read(segmentation) == origin
    assert segment_voxels(segmentation) == lower.voxels
    # A new Logic (Slicer started again) measures and re-thresholds it as the run's own did.
    reopenedLogic = AutoDDPMLogic()
    assert reopenedLogic.measure(segmentation) == lower
    assert reopenedLogic.setThreshold(segmentation, engineThreshold).voxels == result.engineSummary["anomalous_voxels"]
    assert segment_voxels(segmentation) == result.engineSummary["anomalous_voxels"]


def test_preview_shows_every_voxel_above_and_keeps_the_settled_threshold(finished_run) -> None:
    import slicer

    logic, result = finished_run["logic"], finished_run["result"]
    anomaly = slicer.util.arrayFromVolume(result.anomalyMapVolume)
    try:
        volume_ml = logic.previewThreshold(result.segmentation, 0.5 * result.threshold)
        voxels = int((anomaly > 0.5 * result.threshold).sum())
        assert segment_voxels(result.segmentation) == voxels
        assert volume_ml == pytest.approx(voxels * float(np.prod(result.anomalyMapVolume.GetSpacing())) / 1000.0)
        assert float(result.segmentation.GetAttribute("AutoDDPM.Threshold")) == result.threshold
    finally:
        logic.setThreshold(result, result.threshold)
    assert segment_voxels(result.segmentation) == result.engineSummary["anomalous_voxels"]


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), float("inf")])
def test_rethreshold_refuses_what_the_command_line_refuses(finished_run, threshold) -> None:
    logic, result = finished_run["logic"], finished_run["result"]
    with pytest.raises(ValueError, match="finite number >= 0"):
        logic.setThreshold(result, threshold)
    with pytest.raises(ValueError, match="finite number >= 0"):
        logic.previewThreshold(result.segmentation, threshold)
    assert segment_voxels(result.segmentation) == result.engineSummary["anomalous_voxels"]


def test_a_changed_map_is_thresholded_as_it_is_now(finished_run) -> None:
    """The map's box is kept between ticks, but not once its voxels change (a new run into the same node)."""
    import slicer

    logic, result = finished_run["logic"], finished_run["result"]
    anomaly = slicer.util.arrayFromVolume(result.anomalyMapVolume)
    before = anomaly.copy()
    logic.setThreshold(result, result.threshold)
    try:
        anomaly[:] = 0
        anomaly[0, 0, 0] = 1.0  # a corner the old box may not hold
        slicer.util.arrayFromVolumeModified(result.anomalyMapVolume)
        assert logic.setThreshold(result.segmentation, 0.5).voxels == segment_voxels(result.segmentation) == 1
    finally:
        anomaly[:] = before
        slicer.util.arrayFromVolumeModified(result.anomalyMapVolume)
        logic.setThreshold(result.segmentation, result.threshold)
    assert segment_voxels(result.segmentation) == result.engineSummary["anomalous_voxels"]
