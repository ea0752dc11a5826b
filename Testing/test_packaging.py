"""Packaging of the Slicer extension: what CMake installs. The extension descriptions: test_extensions_index.py."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "AutoDDPM"


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return [item.replace("${MODULE_NAME}", "AutoDDPM") for item in match.group(1).split()]


def test_every_module_resource_is_installed_and_exists() -> None:
    listed = cmake_list((MODULE_DIR / "CMakeLists.txt").read_text(), "MODULE_PYTHON_RESOURCES")
    for resource in listed:
        assert (MODULE_DIR / resource).is_file(), resource
    for required in ("Resources/Icons/AutoDDPM.png", "Resources/UI/AutoDDPM.ui", "Resources/requirements.txt"):
        assert required in listed


def test_shared_resources_are_installed_beside_the_module() -> None:
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    # What a run needs, and nothing else: benchmark results and screenshots are for the README, not for Slicer.
    assert set(re.findall(r"\$\{_shared_resources_dir\}/(\w+)/", text)) == {"Models", "LPIPS", "SampleData"}
    assert "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources" in text


def test_module_requirements_never_include_torch() -> None:
    lines = [line.split("#")[0].strip() for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()]
    names = [re.split(r"[<>=!~ ]", line)[0].lower() for line in lines if line]
    assert "torch" not in names and "simpleitk" not in names
    assert {"numpy", "scipy", "safetensors", "tqdm"} <= set(names)
    assert all(">=" in line for line in lines if line)


def test_icons_are_128_pixel_pngs() -> None:
    for icon in (MODULE_DIR / "Resources" / "Icons" / "AutoDDPM.png", ROOT / "Resources" / "Icons" / "AutoDDPM.png"):
        header = icon.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n", icon
        assert (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")) == (128, 128), icon


def test_the_panel_has_every_widget_the_module_uses() -> None:
    import xml.etree.ElementTree as ElementTree

    ui = ElementTree.parse(MODULE_DIR / "Resources" / "UI" / "AutoDDPM.ui")
    widgets = {widget.get("name") for widget in ui.iter("widget")}
    source = (MODULE_DIR / "AutoDDPM.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and used <= widgets, sorted(used - widgets)
    # Widgets bound to the parameter node name one of its fields.
    bound = {prop.find("string").text for prop in ui.iter("property") if prop.get("name") == "SlicerParameterName"}
    parameter_class = source[source.index("class AutoDDPMParameterNode"):source.index("class AutoDDPMWidget")]
    fields = set(re.findall(r"^    (\w+): ", parameter_class, re.M))
    assert bound and bound <= fields, sorted(bound - fields)
