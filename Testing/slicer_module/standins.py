"""Test-only stand-ins for the parts of Slicer that the ``slicer-core`` package does not ship.

slicer-core gives the real MRML scene, nodes, storage and segmentation logic,
but not Qt, CTK, the scripted-module base classes, the parameter-node wrapper,
the translation functions or the application's start-up (which registers the
segmentation converters). These minimal versions let the module's Logic run
against real nodes; the widget itself only runs inside Slicer.
"""

from __future__ import annotations

import sys
import time
import types
import unittest


class QTimer:
    """``QTimer.singleShot`` without an event loop: :func:`process_events` fires the timers that are due."""

    pending: list[tuple[float, object]] = []

    @staticmethod
    def singleShot(msec: int, callback) -> None:
        QTimer.pending.append((time.monotonic() + msec / 1000.0, callback))


def process_events(max_wait: float = 0.05) -> int:
    """Wait up to ``max_wait`` seconds and run the timers due by then, as Qt's event loop would; returns how many ran."""
    deadline = time.monotonic() + max_wait
    due = sorted((entry for entry in QTimer.pending if entry[0] <= deadline), key=lambda entry: entry[0])
    time.sleep(max(0.0, (due[-1][0] if due else deadline) - time.monotonic()))
    for entry in due:
        QTimer.pending.remove(entry)
        entry[1]()
    return len(due)


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent


class ScriptedLoadableModuleLogic:
    """Like Slicer's: one parameter node per module, a vtkMRMLScriptedModuleNode in the scene."""

    def __init__(self, parent=None) -> None:
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetModuleName(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        print(message)


class WithinRange:
    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum


def parameterNodeWrapper(cls):
    """Only wraps the node: the Logic never reads parameters, the widget does (in Slicer)."""

    def __init__(self, node) -> None:
        self.parameterNode = node

    cls.__init__ = __init__
    return cls


def install() -> None:
    """Register the stand-ins under the names the module imports."""
    import slicer

    modules = {
        "qt": types.ModuleType("qt"),
        "ctk": types.ModuleType("ctk"),
        "slicer.ScriptedLoadableModule": types.ModuleType("slicer.ScriptedLoadableModule"),
        "slicer.parameterNodeWrapper": types.ModuleType("slicer.parameterNodeWrapper"),
        "slicer.i18n": types.ModuleType("slicer.i18n"),
    }
    modules["qt"].QTimer = QTimer
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(modules["slicer.ScriptedLoadableModule"], name, globals()[name])
    modules["slicer.parameterNodeWrapper"].parameterNodeWrapper = parameterNodeWrapper
    modules["slicer.parameterNodeWrapper"].WithinRange = WithinRange
    modules["slicer.i18n"].tr = lambda text: text
    modules["slicer.i18n"].translate = lambda context, text: text
    for name, module in modules.items():
        sys.modules[name] = module
        if name.startswith("slicer."):
            setattr(slicer, name.split(".", 1)[1], module)

    # What Slicer's Segmentations module registers at start-up.
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
