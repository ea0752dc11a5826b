"""Test-only stand-ins for the parts of Slicer that the ``slicer-core`` package does not ship.

slicer-core gives the real MRML scene, nodes, storage and segmentation logic,
but not Qt, CTK, the scripted-module base classes, the parameter-node wrapper,
the translation functions or the application's start-up (which registers the
segmentation converters). These minimal versions let the module's Logic run
against real nodes, and the widget's own code run on a panel of stand-in
widgets read from the module's .ui file (:func:`load_ui`); Qt's widgets, their
layout and rendering only run inside Slicer.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import inspect
import os
import sys
import time
import types
import typing
import unittest
import urllib.parse
import urllib.request
from pathlib import Path
from xml.etree import ElementTree


class QTimer:
    """QTimer without an event loop: :func:`process_events` fires the timers that are due.

    ``QTimer.singleShot(msec, callback)``, and single-shot timer objects whose ``start()`` restarts them.
    """

    pending: list[tuple[float, object]] = []

    @staticmethod
    def singleShot(msec: int, callback) -> None:
        QTimer.pending.append((time.monotonic() + msec / 1000.0, callback))

    def __init__(self) -> None:
        self._interval = 0
        self._slots: list = []

    def setSingleShot(self, singleShot: bool) -> None:
        assert singleShot, "only single-shot timers are stood in for"

    def setInterval(self, msec: int) -> None:
        self._interval = msec

    def connect(self, signal: str, slot) -> None:
        assert signal == "timeout()"
        self._slots.append(slot)

    def start(self) -> None:
        self.stop()
        QTimer.pending.append((time.monotonic() + self._interval / 1000.0, self._timeout))

    def stop(self) -> None:
        QTimer.pending[:] = [entry for entry in QTimer.pending if entry[1] != self._timeout]

    def isActive(self) -> bool:
        return any(entry[1] == self._timeout for entry in QTimer.pending)

    def _timeout(self) -> None:
        for slot in list(self._slots):
            slot()


class QSettings:
    """Slicer's settings, kept in memory for the test session (``values``; a test clears them as it needs)."""

    values: dict[str, object] = {}

    def value(self, key: str, default=None):
        return QSettings.values.get(key, default)

    def setValue(self, key: str, value) -> None:
        QSettings.values[key] = value


def process_events(max_wait: float = 0.05) -> int:
    """Wait up to ``max_wait`` seconds and run the timers due by then, as Qt's event loop would; returns how many ran."""
    deadline = time.monotonic() + max_wait
    due = sorted((entry for entry in QTimer.pending if entry[0] <= deadline), key=lambda entry: entry[0])
    time.sleep(max(0.0, (due[-1][0] if due else deadline) - time.monotonic()))
    for entry in due:
        if entry in QTimer.pending:  # a timer that an earlier one stopped does not fire
            QTimer.pending.remove(entry)
            entry[1]()
    return len(due)


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent


class Qt:
    """The item data roles and the cursor the module uses."""

    ToolTipRole = 3
    UserRole = 256
    WaitCursor = 3


class Application:
    """slicer.app as the panel's Apply meets it: a wait cursor, testing mode (dialogs are not shown), a temporary
    folder, and the environment Slicer started with (here this process's)."""

    def __init__(self, temporaryPath: str) -> None:
        self.temporaryPath = temporaryPath
        self.overrideCursors = 0

    def setOverrideCursor(self, cursor) -> None:
        self.overrideCursors += 1

    def restoreOverrideCursor(self) -> None:
        self.overrideCursors -= 1

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self) -> None:
        process_events(0.0)

    def startupEnvironment(self) -> "_Environment":
        return _Environment(dict(os.environ))


class _Environment(dict):
    """QProcessEnvironment: keys() and value(name)."""

    def value(self, name: str) -> str:
        return self[name]


class Widget:
    """A widget of the .ui as the module uses it: properties it sets, signals it connects to (run at once)."""

    def __init__(self, name: str = "", parameterName: str | None = None) -> None:
        self.name = name
        self.parameterName = parameterName
        self.enabled = self.visible = True
        self.text = self.toolTip = ""
        self._slots: dict[str, list] = {}
        self._blocked = False

    def connect(self, signal: str, slot) -> None:
        self._slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal: str, slot) -> None:
        self._slots[signal].remove(slot)

    def emit(self, signal: str, *args) -> None:
        if not self._blocked:
            for slot in list(self._slots.get(signal, [])):
                slot(*args[:_accepted_arguments(slot, len(args))])

    def blockSignals(self, block: bool) -> bool:
        wasBlocked, self._blocked = self._blocked, block
        return wasBlocked

    def property(self, name: str):
        return self.parameterName if name == "SlicerParameterName" else None

    def setMRMLScene(self, scene) -> None:
        self.mrmlScene = scene


def _accepted_arguments(slot, given: int) -> int:
    """How many of a signal's arguments PythonQt passes to ``slot``: as many as it takes (a slot may take fewer)."""
    parameters = inspect.signature(slot).parameters.values()
    if any(parameter.kind is parameter.VAR_POSITIONAL for parameter in parameters):
        return given
    return min(given, sum(parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
                          for parameter in parameters))


class SliderWidget(Widget):
    """ctkSliderWidget: ``value``, and valueChanged(double) when it changes.

    Like ctk's, the value is rounded to ``decimals`` and kept within [minimum, maximum]: a change of those that
    moves the value emits valueChanged too; :func:`load_ui` sets them as the .ui does.
    """

    changedSignal = "valueChanged(double)"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._value = 0.0
        self._decimals, self._minimum, self._maximum = 2, 0.0, 99.0  # QDoubleSpinBox's defaults
        self.singleStep = self.pageStep = 0.0

    @property
    def value(self) -> float:
        return self._value

    @value.setter
    def value(self, value: float) -> None:
        value = round(min(max(float(value), self._minimum), self._maximum), self._decimals)
        if value != self._value:
            self._value = value
            self.emit(self.changedSignal, self._value)

    @property
    def decimals(self) -> int:
        return self._decimals

    @decimals.setter
    def decimals(self, decimals: int) -> None:
        self._decimals = decimals
        self.value = self._value

    @property
    def minimum(self) -> float:
        return self._minimum

    @minimum.setter
    def minimum(self, minimum: float) -> None:
        self._minimum = minimum
        self._maximum = max(self._maximum, minimum)
        self.value = self._value

    @property
    def maximum(self) -> float:
        return self._maximum

    @maximum.setter
    def maximum(self, maximum: float) -> None:
        self._maximum = maximum
        self._minimum = min(self._minimum, maximum)
        self.value = self._value

    def read(self) -> float:
        return self.value

    def write(self, value: float) -> None:
        self.value = value


class NodeComboBox(Widget):
    """qMRMLNodeComboBox: currentNode(), and currentNodeChanged(vtkMRMLNode*) when it changes."""

    changedSignal = "currentNodeChanged(vtkMRMLNode*)"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._node = None

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is not self._node:
            self._node = node
            self.emit(self.changedSignal, node)

    def read(self):
        return self.currentNode()

    def write(self, node) -> None:
        self.setCurrentNode(node)


class ComboBox(Widget):
    """QComboBox with item data (not bound to parameters here: the tests set those parameters themselves)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.items: list[dict] = []
        self.currentIndex = -1

    @property
    def count(self) -> int:
        return len(self.items)

    def clear(self) -> None:
        self.items.clear()
        self.currentIndex = -1

    def insertItem(self, index: int, text: str, data=None) -> None:
        self.items.insert(index, {"text": text, Qt.UserRole: data})

    def addItem(self, text: str, data=None) -> None:
        self.insertItem(self.count, text, data)

    def itemData(self, index: int, role: int = Qt.UserRole):
        return self.items[index].get(role)

    def setItemData(self, index: int, value, role: int = Qt.UserRole) -> None:
        self.items[index][role] = value


class PlainTextEdit(Widget):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lines: list[str] = []

    def appendPlainText(self, text: str) -> None:
        self.lines.append(text)

    def clear(self) -> None:
        self.lines.clear()


WIDGET_CLASSES = {"ctkSliderWidget": SliderWidget, "qMRMLNodeComboBox": NodeComboBox, "QComboBox": ComboBox,
                  "QPlainTextEdit": PlainTextEdit}


def load_ui(path: str | os.PathLike) -> Widget:
    """slicer.util.loadUI: the .ui file's top widget, with a stand-in for each named widget in ``children``."""
    top, *elements = list(ElementTree.parse(path).getroot().iter("widget"))
    root = Widget(top.get("name"))
    root.children = {}
    for element in elements:
        parameter = element.find("property[@name='SlicerParameterName']/string")
        kind = WIDGET_CLASSES.get(element.get("class"), Widget)
        widget = kind(element.get("name"), None if parameter is None else parameter.text)
        if kind is SliderWidget:  # the range and decimals the .ui gives the slider
            for name in ("decimals", "minimum", "maximum"):
                value = element.find(f"property[@name='{name}']/*")
                if value is not None:
                    setattr(widget, name, int(value.text) if name == "decimals" else float(value.text))
        root.children[element.get("name")] = widget
    return root


def child_widget_variables(root: Widget) -> types.SimpleNamespace:
    """slicer.util.childWidgetVariables: each named widget as an attribute."""
    return types.SimpleNamespace(**root.children)


class Layout(list):
    def addWidget(self, widget) -> None:
        self.append(widget)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent
        self.layout = Layout()
        self.moduleName = type(self).__name__.removesuffix("Widget")

    def setup(self) -> None:
        """Slicer adds the developer tools (Reload, Reload and Test) here."""

    def resourcePath(self, filename: str) -> str:
        return str(Path(sys.modules[type(self).__module__].__file__).parent / "Resources" / filename)

    def onReload(self) -> None:
        """What slicer.util.reloadScriptedModule does to the module's code: run its file again as a new module."""
        spec = importlib.util.spec_from_file_location(self.moduleName, sys.modules[type(self).__module__].__file__)
        module = importlib.util.module_from_spec(spec)
        sys.modules[self.moduleName] = module
        spec.loader.exec_module(module)


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
    """Typed parameters kept in the node, and the two-way binding of connectGui, as Slicer's wrapper does them.

    Values are stored as the node's parameters (node references for nodes), so every wrapper of a node sees the
    same values; a write modifies the node once. connectGui binds the widgets of the .ui that name a parameter and
    can show it (sliders, node selectors) and, like Slicer's, updates them from a ModifiedEvent observer.
    """
    fields = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        kind = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        fields[name] = (kind, getattr(cls, name, None))
        setattr(cls, name, property(functools.partial(_read_parameter, name=name),
                                    functools.partial(_write_parameter, name=name)))

    def __init__(self, node) -> None:
        self.parameterNode = node
        self._guis: dict[int, tuple[dict, int]] = {}
        self._updatingGui = False
        for name, (kind, default) in fields.items():
            if not _is_node_type(kind) and name not in node.GetParameterNames():
                _write_parameter(self, default, name=name)

    def connectGui(self, gui) -> int:
        import vtk

        widgets = {widget.property("SlicerParameterName"): widget for widget in vars(gui).values()
                   if widget.property("SlicerParameterName") and hasattr(widget, "changedSignal")}
        slots = {}
        for name, widget in widgets.items():
            widget.write(getattr(self, name))
            slots[name] = functools.partial(_gui_changed, self, name, widget)
            widget.connect(widget.changedSignal, slots[name])
        observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: _update_gui(self))
        tag = max(self._guis, default=0) + 1
        self._guis[tag] = ({name: (widgets[name], slot) for name, slot in slots.items()}, observer)
        return tag

    def disconnectGui(self, tag) -> None:
        if tag in self._guis:
            bindings, observer = self._guis.pop(tag)
            for widget, slot in bindings.values():
                widget.disconnect(widget.changedSignal, slot)
            self.parameterNode.RemoveObserver(observer)

    cls._fields = fields
    cls.__init__ = __init__
    cls.connectGui = connectGui
    cls.disconnectGui = disconnectGui
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority)
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    return cls


def _is_node_type(kind) -> bool:
    import slicer

    return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)


def _read_parameter(wrapper, name: str):
    kind, _ = wrapper._fields[name]
    node = wrapper.parameterNode
    if _is_node_type(kind):
        return node.GetNodeReference(name)
    text = node.GetParameter(name)
    if issubclass(kind, enum.Enum):
        return kind(text)
    return text == "True" if kind is bool else kind(text)


def _write_parameter(wrapper, value, name: str) -> None:
    import slicer

    kind, _ = wrapper._fields[name]
    node = wrapper.parameterNode
    with slicer.util.NodeModify(node):
        if _is_node_type(kind):
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        else:
            node.SetParameter(name, str(value.value if isinstance(value, enum.Enum) else value))


def _gui_changed(wrapper, name: str, widget, *args) -> None:
    import slicer

    with slicer.util.NodeModify(wrapper.parameterNode):
        if not wrapper._updatingGui:
            setattr(wrapper, name, widget.read())


def _update_gui(wrapper) -> None:
    import slicer

    if wrapper._updatingGui:
        return
    wrapper._updatingGui = True
    try:
        with slicer.util.NodeModify(wrapper.parameterNode):
            for bindings, _ in list(wrapper._guis.values()):
                for name, (widget, _) in bindings.items():
                    widget.write(getattr(wrapper, name))
    finally:
        wrapper._updatingGui = False


def sample_data_module() -> types.ModuleType:
    """Slicer's SampleData module as the module uses it: sources registered, then loaded by name into the scene
    (from the registered local file, read as Slicer reads a volume)."""
    import slicer

    from AutoDDPMLib.slicer_bridge.results import read_volume

    module = types.ModuleType("SampleData")
    sources: dict[str, dict] = {}

    def download(name: str):
        source = sources[name]
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", source["nodeNames"])
        read_volume(node, urllib.request.url2pathname(urllib.parse.urlparse(source["uris"]).path))
        return node

    module.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kwargs: sources.update(
        {kwargs["sampleName"]: kwargs}))
    module.downloadSample = download
    module.sources = sources
    return module


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
    modules["qt"].QSettings = QSettings
    modules["qt"].Qt = Qt
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
