"""Helpers for the Logic tests: a fresh scene, and a synthetic head loaded like a file in Slicer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TESTING_DIR = Path(__file__).resolve().parents[1]


def _load_testing_conftest():
    # Testing/conftest.py is not an importable package module; load it by path for make_head_volume().
    spec = importlib.util.spec_from_file_location("autoddpm_testing_conftest", TESTING_DIR / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_head_volume = _load_testing_conftest().make_head_volume


def new_scene():
    """A fresh scene, set as ``slicer.mrmlScene`` as in the application."""
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    return scene


def add_head_volume(scene, folder: Path, name: str = "head", **kwargs):
    """A synthetic head read from a NIfTI file the way Slicer loads one, in a patient/study of the subject hierarchy."""
    return add_image_volume(scene, folder, name, make_head_volume(**kwargs))


def stripped_sample():
    """The sample FLAIR as a skull-stripping pipeline leaves it: 0 outside the head eroded 12 mm (as
    tools/dev_volumes.py strips the development patients)."""
    import SimpleITK as sitk

    from AutoDDPMLib.resources import resources_dir
    from AutoDDPMLib.volumes.head_region import skull_stripped
    from AutoDDPMLib.volumes.slices import AxialStack

    stack = AxialStack.from_image(sitk.ReadImage(str(resources_dir() / "SampleData" / "TCGA_LGG_FLAIR.nii.gz")))
    return stack.to_image(skull_stripped(stack.array, stack.spacing, (0.5, 99.5), 12.0))


def add_image_volume(scene, folder: Path, name: str, image):
    """``image`` (SimpleITK) read from a NIfTI file the way Slicer loads one, in a patient/study of the subject
    hierarchy."""
    import SimpleITK as sitk
    import slicer

    from AutoDDPMLib.slicer_bridge.results import read_volume

    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(image, str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    read_volume(node, path)
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().AutoWindowLevelOff()
    node.GetDisplayNode().SetWindowLevel(700, 400)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient")
    study = hierarchy.CreateStudyItem(patient, "Study")
    hierarchy.CreateItem(study, node)
    return node


def segment_voxels(segmentation) -> int:
    """Voxels in the Anomaly segment, counted on its own binary labelmap."""
    import slicer
    from vtk.util import numpy_support

    labelmap = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation("Anomaly", labelmap)
    scalars = labelmap.GetPointData().GetScalars()
    return 0 if scalars is None else int((numpy_support.vtk_to_numpy(scalars) > 0).sum())


def save_and_reopen(scene, folder: Path):
    """Save ``scene`` as Slicer's "Save" does (each node's data in its own file, then the .mrml) and read it back
    into a new scene, which becomes ``slicer.mrmlScene``."""
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if not node.IsA("vtkMRMLStorableNode") or node.GetHideFromEditors() and not node.IsA("vtkMRMLColorTableNode"):
            continue
        if node.GetStorageNode() is None and not node.AddDefaultStorageNode():
            continue
        storage = node.GetStorageNode()
        storage.SetFileName(str(folder / f"{node.GetID()}.{storage.GetDefaultWriteFileExtension()}"))
        if not storage.WriteData(node):
            raise RuntimeError(f"could not write {node.GetName()}")
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(folder / "scene.mrml"))
    if not scene.Commit():
        raise RuntimeError("could not write the scene")
    reopened = new_scene()
    reopened.SetRootDirectory(str(folder))
    reopened.SetURL(str(folder / "scene.mrml"))
    if not reopened.Connect():
        raise RuntimeError("could not read the scene back")
    return reopened
