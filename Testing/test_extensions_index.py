"""The Slicer Extensions Index's checks of this extension, run offline, and the extension descriptions.

The Index's checker (scripts/check_description_files.py in Slicer/ExtensionsIndex) clones the repository
the catalog entry (AutoDDPM.json) names, with ``git clone --depth 1`` when the entry pins no
``scm_revision`` (the whole history otherwise), fails when the clone folder holds more than 100 MB, and
then checks the entry, the top-level CMakeLists.txt and the licence file. Here the clone is of this
checkout's HEAD; what needs the network (the JSON schema download, fetching the icon and screenshot URLs)
is checked against the files those URLs name instead. AutoDDPM.s4ext, the older description format, must
say what the JSON entry and CMakeLists.txt say.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_FILE = ROOT / "AutoDDPM.json"
EXTENSION = ENTRY_FILE.stem
# The checker's limit on the clone folder, and the share of it this repository may fill: the rest is
# room for future models.
CLONE_LIMIT_BYTES = 100 * 10**6
CLONE_SHARE = 0.70
# The branch the catalog builds when the entry pins no revision, and the one the icon URLs read from.
DEFAULT_BRANCH = "main"
# Some of the categories the checker accepts (its ACCEPTED_EXTENSION_CATEGORIES); the ones that fit here.
ACCEPTED_CATEGORIES = {"Segmentation", "Neuroimaging", "Analysis", "Quantification"}
# Extensions in the Index this one may depend on (PyTorch is SlicerPyTorch's entry, PyTorch.json).
INDEX_EXTENSIONS = {"PyTorch"}
LICENSE_FILE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")
# The JSON schema the entry names (slicer-extension-catalog-entry-schema-v1.0.2): its keys, required ones first.
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
SCHEMA_KEYS = SCHEMA_REQUIRED | {"scm_revision", "scm_type", "build_dependencies", "dicom_support_rule",
                                 "build_subdirectory", "enabled", "tier"}


def entry() -> dict:
    return json.loads(ENTRY_FILE.read_text())


def cmake_metadata() -> dict[str, str]:
    """The top-level CMakeLists.txt's ``set(EXTENSION_<KEY> "value")`` lines, by key."""
    text = (ROOT / "CMakeLists.txt").read_text()
    return dict(re.findall(r'set\s*\(EXTENSION_(\w+)\s*"([^"]*)"\s*\)', text))


def s4ext_fields() -> dict[str, str]:
    """AutoDDPM.s4ext as the Index's older tooling reads it: first word the key, the rest of the line the value."""
    fields = {}
    for line in (ROOT / f"{EXTENSION}.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    return fields


def image_urls() -> list[str]:
    metadata = cmake_metadata()
    return [metadata["ICONURL"], *metadata["SCREENSHOTURLS"].split()]


def url_path(url: str) -> str:
    """The repository path an image URL of this repository's default branch names."""
    owner_repo = urllib.parse.urlsplit(entry()["scm_url"]).path.removesuffix(".git").strip("/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/{DEFAULT_BRANCH}/"
    assert url.startswith(prefix), f"{url} is not a file of {owner_repo}'s {DEFAULT_BRANCH} branch"
    return url.removeprefix(prefix)


def folder_bytes(folder: Path) -> int:
    """Everything in a folder, .git included, as the checker counts it: the sizes of all files."""
    return sum(os.lstat(Path(parent) / name).st_size for parent, _, names in os.walk(folder) for name in names)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of this checkout's HEAD made as the checker makes it for an entry without ``scm_revision``."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    folder = tmp_path_factory.mktemp("index") / EXTENSION
    # file:// makes git honour --depth as a remote would (a plain path would hard-link the whole history).
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", ROOT.as_uri(), str(folder)],
                   check=True, capture_output=True, timeout=300)
    return folder


def test_the_entry_pins_no_revision_so_the_index_clones_one_commit() -> None:
    # With scm_revision the checker clones the whole history, every retrained model included (docs/DESIGN.md).
    assert "scm_revision" not in entry()


def test_a_depth_one_clone_fits_the_index_limit_with_margin(clone: Path) -> None:
    size = folder_bytes(clone)
    assert size <= CLONE_SHARE * CLONE_LIMIT_BYTES, (
        f"a depth-1 clone holds {size / 1e6:.1f} MB ({size / CLONE_LIMIT_BYTES:.0%} of the Index's 100 MB limit; "
        f"at most {CLONE_SHARE:.0%} leaves room for future models)")


def test_the_clone_holds_the_files_the_checks_read(clone: Path) -> None:
    assert (clone / "CMakeLists.txt").is_file() and (clone / ENTRY_FILE.name).is_file()
    assert any((clone / name).is_file() for name in LICENSE_FILE_NAMES)
    for url in image_urls():
        assert (clone / url_path(url)).is_file(), url


def test_the_entry_follows_its_schema() -> None:
    description = entry()
    assert SCHEMA_REQUIRED <= set(description) <= SCHEMA_KEYS, sorted(set(description) ^ SCHEMA_REQUIRED)
    assert description["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert all(isinstance(description[key], str) for key in ("category", "scm_url", "build_subdirectory"))
    assert isinstance(description["build_dependencies"], list)
    assert description["tier"] in range(1, 6)


def test_category_scm_url_and_repository_name() -> None:
    description = entry()
    assert description["category"] in ACCEPTED_CATEGORIES
    url = urllib.parse.urlsplit(description["scm_url"])
    assert "://" in description["scm_url"] and url.scheme in ("git", "https")
    # The Index asks that the repository's name say it is a Slicer extension.
    assert "slicer" in Path(url.path).stem.lower()


def test_dependencies_are_extensions_of_the_index() -> None:
    dependencies = entry()["build_dependencies"]
    assert set(dependencies) <= INDEX_EXTENSIONS
    assert cmake_metadata()["DEPENDS"].split() == dependencies


def test_cmake_project_and_metadata() -> None:
    text = (ROOT / "CMakeLists.txt").read_text()
    # The checker takes the first project() name; it must be the entry's file name.
    assert re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", text, re.I)[0].strip("\"'") == EXTENSION
    metadata = cmake_metadata()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert metadata.get(key), key
    assert metadata["CATEGORY"] == entry()["category"]
    assert "add_subdirectory(AutoDDPM)" in text


def test_icon_and_screenshot_urls_name_images_in_the_repository() -> None:
    # Offline stand-in for the checker's download: the URL points into this repository, at an image file.
    for url in image_urls():
        assert url.startswith("https://") and url.lower().endswith((".png", ".jpg", ".jpeg", ".gif")), url
        assert (ROOT / url_path(url)).read_bytes().startswith(IMAGE_MAGIC), url


def test_a_licence_file_at_the_root() -> None:
    assert any((ROOT / name).is_file() for name in LICENSE_FILE_NAMES)


def test_s4ext_carries_the_required_fields() -> None:
    fields = s4ext_fields()
    for key in ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled"):
        assert fields.get(key), key
    assert fields["scm"] == "git"
    assert fields["homepage"].startswith("https://") and fields["iconurl"].startswith("https://")


def test_s4ext_says_what_the_entry_and_cmake_say() -> None:
    fields, description, metadata = s4ext_fields(), entry(), cmake_metadata()
    assert fields["scmurl"] == description["scm_url"]
    # The entry without a revision builds the default branch; the s4ext names it.
    assert fields["scmrevision"] == description.get("scm_revision", DEFAULT_BRANCH)
    assert fields["depends"] == (" ".join(description["build_dependencies"]) or "NA")
    assert fields["build_subdirectory"] == description.get("build_subdirectory", ".")
    assert fields["enabled"] == ("1" if description.get("enabled", True) else "0")
    assert fields["category"] == description["category"] == metadata["CATEGORY"]
    for s4ext_key, cmake_key in (("homepage", "HOMEPAGE"), ("contributors", "CONTRIBUTORS"),
                                 ("description", "DESCRIPTION"), ("iconurl", "ICONURL"),
                                 ("screenshoturls", "SCREENSHOTURLS")):
        assert fields[s4ext_key] == metadata[cmake_key], s4ext_key
