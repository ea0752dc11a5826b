"""Turning the engine's output files into Slicer nodes: volumes, the anomaly overlay, the segmentation.

Everything here works on MRML nodes without the Slicer application (no
``slicer.app``, no Qt), so the module's Logic runs the same in Slicer, in its
Python console and in tests with the ``slicer-core`` package. ``slicer`` and
``vtk`` are imported inside the functions: :func:`summarize` and the constants
are plain Python.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:
    import slicer

SEGMENT_ID = "Anomaly"
SEGMENT_COLOR = (1.0, 0.85, 0.1)
COLOR_TABLE_NAME = "AutoDDPM Anomaly"

# Node reference from the segmentation to the anomaly map it was thresholded
# from, and the attribute with the threshold used: both are saved with the
# scene, so the live re-threshold also works after reloading it.
ANOMALY_MAP_REFERENCE = "AutoDDPM.AnomalyMap"
THRESHOLD_ATTRIBUTE = "AutoDDPM.Threshold"
# The run's smallest kept part in mm^3 (the model card's post-processing), so re-thresholding drops the same parts.
MIN_COMPONENT_ATTRIBUTE = "AutoDDPM.MinComponentMm3"
# What made the result, kept with it (a change of model in the panel is for the next run, not for this result):
# the model's name, its licence, the schedule, the post-processing (the engine's --postprocess: which brain region
# was searched), whether the engine took the input for a skull-stripped one (it then has a threshold of its own) and
# the threshold calibrated for them ("Reset to calibrated").
MODEL_ATTRIBUTE = "AutoDDPM.Model"
LICENSE_ATTRIBUTE = "AutoDDPM.License"
SCHEDULE_ATTRIBUTE = "AutoDDPM.Schedule"
POSTPROCESS_ATTRIBUTE = "AutoDDPM.PostProcess"
SKULL_STRIPPED_ATTRIBUTE = "AutoDDPM.SkullStripped"
CALIBRATED_THRESHOLD_ATTRIBUTE = "AutoDDPM.CalibratedThreshold"

# DICOM terminology of the segment: a morphologically altered structure of
# type "lesion" in the brain; Slicer shows it in the segment's terminology box.
_TERMINOLOGY = dict(
    terminologyContextName="Segmentation category and type - DICOM master list",
    categoryValue="49755003", categorySchemeDesignator="SCT", categoryMeaning="Morphologically Altered Structure",
    typeValue="52988006", typeSchemeDesignator="SCT", typeMeaning="Lesion",
    modifierValue="", modifierSchemeDesignator="", modifierMeaning="",
    regionContextName="Anatomic codes - DICOM master list",
    regionValue="12738006", regionSchemeDesignator="SCT", regionMeaning="Brain",
    regionModifierValue="", regionModifierSchemeDesignator="", regionModifierMeaning="",
)


@dataclass(frozen=True)
class AnomalySummary:
    """Size of a thresholded anomaly: voxels, millilitres, and the largest connected part."""

    threshold: float
    voxels: int
    volume_ml: float
    components: int
    largest_component_ml: float


@dataclass(frozen=True)
class ResultOrigin:
    """What made an AutoDDPM result: kept as attributes of its segmentation, so saved and reopened with the scene."""

    model: str
    schedule: str
    license: str
    calibrated_threshold: float
    postprocess: str = "card"  # results made before the choice existed searched the card's region
    skull_stripped: bool = False  # results made before the engine said so had the threshold of inputs with skull

    def store(self, segmentation: "slicer.vtkMRMLSegmentationNode") -> None:
        segmentation.SetAttribute(MODEL_ATTRIBUTE, self.model)
        segmentation.SetAttribute(SCHEDULE_ATTRIBUTE, self.schedule)
        segmentation.SetAttribute(LICENSE_ATTRIBUTE, self.license)
        segmentation.SetAttribute(POSTPROCESS_ATTRIBUTE, self.postprocess)
        segmentation.SetAttribute(SKULL_STRIPPED_ATTRIBUTE, "true" if self.skull_stripped else "false")
        segmentation.SetAttribute(CALIBRATED_THRESHOLD_ATTRIBUTE, repr(float(self.calibrated_threshold)))

    @staticmethod
    def read(segmentation: "slicer.vtkMRMLSegmentationNode") -> "ResultOrigin | None":
        """The origin stored on ``segmentation``; None for a result made before origins were kept."""
        calibrated = segmentation.GetAttribute(CALIBRATED_THRESHOLD_ATTRIBUTE)
        if calibrated is None:
            return None
        return ResultOrigin(segmentation.GetAttribute(MODEL_ATTRIBUTE) or "?",
                            segmentation.GetAttribute(SCHEDULE_ATTRIBUTE) or "?",
                            segmentation.GetAttribute(LICENSE_ATTRIBUTE) or "?", float(calibrated),
                            segmentation.GetAttribute(POSTPROCESS_ATTRIBUTE) or "card",
                            segmentation.GetAttribute(SKULL_STRIPPED_ATTRIBUTE) == "true")


def summarize(mask: np.ndarray, spacing: Iterable[float], threshold: float) -> AnomalySummary:
    """Measure a binary mask; ``spacing`` in mm, connectivity 26 (voxels touching at a corner are one part)."""
    from scipy import ndimage

    voxel_ml = float(np.prod(list(spacing))) / 1000.0
    mask = np.asarray(mask) > 0
    voxels = int(mask.sum())
    largest = 0
    components = 0
    if voxels:
        labels, components = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        largest = int(np.bincount(labels.ravel())[1:].max())
    return AnomalySummary(float(threshold), voxels, voxels * voxel_ml, int(components), largest * voxel_ml)


def volume_array(node: "slicer.vtkMRMLScalarVolumeNode") -> np.ndarray:
    """The node's voxels as a numpy view indexed [k, j, i]."""
    import slicer.util

    return slicer.util.arrayFromVolume(node)


def write_volume(node: "slicer.vtkMRMLScalarVolumeNode", path: str | os.PathLike) -> None:
    """Write a volume with its geometry, without adding a storage node to the scene."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    # The file lives for one run only: compressing it would cost time for nothing.
    storage.SetUseCompression(False)
    if not storage.WriteData(node):
        raise RuntimeError(f"could not write {node.GetName()} to {path}")


def read_volume(node: "slicer.vtkMRMLScalarVolumeNode", path: str | os.PathLike) -> None:
    """Read an image file (voxels and geometry) into ``node``, which may or may not be in a scene."""
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"could not read the engine's output {path}")


def same_geometry(a: "slicer.vtkMRMLVolumeNode", b: "slicer.vtkMRMLVolumeNode", tolerance: float = 1e-3) -> bool:
    """Same voxel grid: dimensions and IJK-to-RAS matrix (within ``tolerance`` mm)."""
    import vtk

    if a.GetImageData().GetDimensions() != b.GetImageData().GetDimensions():
        return False
    matrices = []
    for node in (a, b):
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        matrices.append(np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]))
    return bool(np.allclose(matrices[0], matrices[1], atol=tolerance))


def anomaly_color_table(scene: "slicer.vtkMRMLScene") -> "slicer.vtkMRMLColorTableNode":
    """The overlay's colour table (created once per scene): transparent at 0, then dark red to yellow to white.

    Opacity rises with the value so that the small residuals everywhere in the
    brain stay see-through and only real differences colour the image.
    """
    import slicer

    existing = scene.GetFirstNode(COLOR_TABLE_NAME, "vtkMRMLColorTableNode", False, True)
    if existing is not None:
        return existing
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(COLOR_TABLE_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    for index in range(256):
        t = index / 255.0
        red, green, blue = (float(np.clip(3 * t - offset, 0, 1)) for offset in (0.0, 1.0, 2.0))
        table.SetColor(index, f"{t:.3f}", max(red, 0.5 if index else 0.0), green, blue, float(np.clip(4 * t, 0, 1)))
    scene.AddNode(table)
    return table


def show_anomaly_map(map_node: "slicer.vtkMRMLScalarVolumeNode", threshold: float) -> None:
    """Colour the anomaly map for overlaying: the colour table over [0, max(2 x threshold, map maximum)]."""
    map_node.CreateDefaultDisplayNodes()
    display = map_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(anomaly_color_table(map_node.GetScene()).GetID())
    top = max(2.0 * threshold, float(volume_array(map_node).max()), 1e-6)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, top)
    display.SetInterpolate(False)


def copy_window_level(source: "slicer.vtkMRMLScalarVolumeNode", target: "slicer.vtkMRMLScalarVolumeNode") -> None:
    """Show ``target`` with the window/level of ``source``: pseudo-healthy and input then compare one to one."""
    target.CreateDefaultDisplayNodes()
    source_display = source.GetDisplayNode()
    if source_display is None:
        return
    display = target.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(source_display.GetWindow(), source_display.GetLevel())
    if source_display.GetColorNodeID():
        display.SetAndObserveColorNodeID(source_display.GetColorNodeID())


def prepare_segmentation(segmentation: "slicer.vtkMRMLSegmentationNode", reference: "slicer.vtkMRMLScalarVolumeNode",
                         anomaly_map: "slicer.vtkMRMLScalarVolumeNode") -> None:
    """Reference geometry, the "Anomaly" segment with its terminology, and the link to the anomaly map.

    The segmentation goes under ``reference``'s transform, as :func:`place_beside` puts it: its geometry and its
    segment are then the reference's voxel grid as stored, and overlay the reference whatever transform that has.
    """
    import slicer

    # First the transform: the geometry is taken relative to the segmentation's transform at this moment, so a
    # transform set afterwards would apply the reference's offset a second time.
    segmentation.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segmentation.SetNodeReferenceID(ANOMALY_MAP_REFERENCE, anomaly_map.GetID())
    segmentation.CreateDefaultDisplayNodes()
    segments = segmentation.GetSegmentation()
    if segments.GetSegment(SEGMENT_ID) is None:
        segments.AddEmptySegment(SEGMENT_ID, SEGMENT_ID, list(SEGMENT_COLOR))
    segment = segments.GetSegment(SEGMENT_ID)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(),
                   slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(*_TERMINOLOGY.values()))
    display = segmentation.GetDisplayNode()
    # An outline leaves the anomaly map overlay below it visible.
    display.SetSegmentOpacity2DFill(SEGMENT_ID, 0.0)
    display.SetSegmentOpacity2DOutline(SEGMENT_ID, 1.0)


def set_segment_mask(segmentation: "slicer.vtkMRMLSegmentationNode", mask: np.ndarray,
                     reference: "slicer.vtkMRMLScalarVolumeNode", start: tuple[int, int, int] = (0, 0, 0)) -> None:
    """Replace the Anomaly segment's voxels with ``mask`` ([k, j, i] on ``reference``'s grid as stored, which is the
    segmentation's own coordinates once :func:`prepare_segmentation` has put it under ``reference``'s transform).

    ``mask`` may be a box of that grid whose first voxel is ``start`` (k, j, i): the segment is then empty outside
    the box, and writing it costs the box's size, not the volume's.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    matrix = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(matrix)
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetImageToWorldMatrix(matrix)
    (k0, j0, i0), (nk, nj, ni) = start, np.shape(mask)
    labelmap.SetExtent(i0, i0 + ni - 1, j0, j0 + nj - 1, k0, k0 + nk - 1)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    if labelmap.GetNumberOfPoints():
        numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = (np.asarray(mask) > 0).ravel()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation, SEGMENT_ID, logic.MODE_REPLACE):
        raise RuntimeError(f"could not update segment {SEGMENT_ID} of {segmentation.GetName()}")


def place_beside(reference: "slicer.vtkMRMLNode", nodes: Iterable["slicer.vtkMRMLNode"]) -> None:
    """Put ``nodes`` under the subject-hierarchy parent (the study) of ``reference``, and under its transform."""
    import slicer

    scene = reference.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    reference_item = hierarchy.GetItemByDataNode(reference)
    parent = hierarchy.GetItemParent(reference_item) if reference_item else hierarchy.GetSceneItemID()
    for node in nodes:
        # The engine worked on the voxel grid as stored: a transform on the input applies to the results too.
        if hasattr(node, "SetAndObserveTransformNodeID"):
            node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:
            hierarchy.CreateItem(parent, node)
