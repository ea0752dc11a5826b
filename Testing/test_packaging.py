"""Packaging of the Slicer extension: what CMake installs, and the extension descriptions."""

from __future__ import annotations

import json
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
    for folder in ("Models", "LPIPS", "SampleData"):
        assert f"${{_shared_resources_dir}}/{folder}/*" in text
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


def test_top_level_cmake_has_the_extension_metadata() -> None:
    text = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "add_subdirectory(AutoDDPM)" in text


def s4ext_fields() -> dict[str, str]:
    fields = {}
    for line in (ROOT / "AutoDDPM.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def test_s4ext_carries_the_required_fields() -> None:
    fields = s4ext_fields()
    for key in ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled"):
        assert fields.get(key), key
    assert fields["scm"] == "git" and fields["depends"] == "PyTorch" and fields["enabled"] == "1"
    assert fields["iconurl"].endswith(".png") and fields["screenshoturls"].endswith(".png")


def test_extensions_index_json_carries_the_required_fields() -> None:
    entry = json.loads((ROOT / "AutoDDPM.json").read_text())
    for key in ("$schema", "category", "scm_url", "scm_revision", "build_dependencies", "tier"):
        assert entry.get(key) not in (None, "", []), key
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["tier"] in (1, 3, 5)
    # The schema allows no other keys.
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "build_subdirectory", "enabled", "tier"}


def test_descriptions_agree() -> None:
    fields, entry = s4ext_fields(), json.loads((ROOT / "AutoDDPM.json").read_text())
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert fields["category"] == entry["category"] and f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    assert fields["scmurl"] == entry["scm_url"]
    assert f'set(EXTENSION_ICONURL "{fields["iconurl"]}")' in cmake


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
