"""``pip install .`` gives a working tool: the wheel carries the models, LPIPS weights and sample data.

The wheel is built from a copy of the tracked files (what a user's checkout holds) and installed into a
fresh virtual environment that sees neither the repository nor the editable install; the tool then runs
from a folder outside the repository. About a minute, so those tests are marked slow:
``python -m pytest -m slow`` runs them (CI does).
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("Resources/Models", "Resources/LPIPS", "Resources/SampleData")


def test_pyproject_lists_every_subpackage() -> None:
    # setuptools gets an explicit package list (the shipped files are mapped in as AutoDDPMLib.Resources.*,
    # which package discovery cannot combine with); a subpackage missing from it would be missing from the wheel.
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(AutoDDPMLib[\w.]*)"', re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)))
    library = ROOT / "AutoDDPM" / "AutoDDPMLib"
    on_disk = {"AutoDDPMLib"} | {"AutoDDPMLib." + init.parent.relative_to(library).as_posix().replace("/", ".")
                                 for init in library.glob("*/**/__init__.py")}
    listed -= {"AutoDDPMLib.Resources." + folder.split("/")[1] for folder in SHIPPED}
    assert listed == on_disk, f"[tool.setuptools] packages in pyproject.toml should list {sorted(on_disk)}"


def tracked_files() -> list[str]:
    """The files git tracks in this checkout (the test needs one: it builds what a clone would)."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip(f"not a git checkout: {listing.stderr.strip()}")
    return [name for name in listing.stdout.split("\0") if name]


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """The wheel built from the tracked files, and a fresh venv with it installed: (wheel, venv, environment)."""
    work = tmp_path_factory.mktemp("wheel")
    # A copy, not the checkout itself: an in-place build leaves build/ behind, whose stale files would
    # reach later wheels; and only tracked files are what a clone holds.
    source = work / "source"
    for name in tracked_files():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "AUTODDPM_RESOURCES")}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(work / "dist"), str(source)], work, env)
    (wheel,) = (work / "dist").glob("autoddpm-*.whl")

    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], work, env)
    python = venv / "bin" / "python"
    venv_site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         work, env).stdout.strip())
    # torch and the other dependencies come from this test's environment instead of a second download: its
    # site-packages folders go on the new venv's path. A path line in a .pth file does not run the .pth
    # files of that folder, so the editable install (a .pth or a finder it installs) stays out; the test
    # checks below that AutoDDPMLib is imported from the new venv.
    (venv_site / "test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], work, env)
    return wheel, venv, env


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_the_shipped_files(installed: tuple[Path, Path, dict[str, str]]) -> None:
    import zipfile

    wheel, _, _ = installed
    names = {name for name in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in name}
    tracked = tracked_files()
    code = {name.removeprefix("AutoDDPM/") for name in tracked
            if name.startswith("AutoDDPM/AutoDDPMLib/") and name.endswith(".py")}
    data = {"AutoDDPMLib/" + name for name in tracked if name.startswith(SHIPPED)}
    # Every module (a subpackage missing from pyproject's list would be missing here), every shipped file,
    # and nothing else: no benchmark results, screenshots or Slicer module files.
    assert names == code | data, (sorted((code | data) - names), sorted(names - code - data))


@pytest.mark.slow
def test_the_installed_tool_finds_its_models_outside_the_repository(installed: tuple[Path, Path, dict[str, str]],
                                                                   tmp_path: Path) -> None:
    _, venv, env = installed
    where = run([str(venv / "bin" / "python"), "-c",
                 "import AutoDDPMLib; from AutoDDPMLib.resources import resources_dir; "
                 "print(AutoDDPMLib.__file__); print(resources_dir())"], tmp_path, env).stdout.split()
    assert all(Path(path).is_relative_to(venv) for path in where), where
    models = run([str(venv / "bin" / "autoddpm"), "models"], tmp_path, env).stdout
    assert "flair-lgg" in models and "t1-ixi-midaxial" in models, models


@pytest.mark.slow
def test_the_installed_tool_runs_the_t1_demo(installed: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    # The T1 demo: three single-slice samples, a few seconds; it loads a shipped model, the LPIPS weights
    # and the sample data from the installed package.
    _, venv, env = installed
    run([str(venv / "bin" / "autoddpm"), "--threads", "1", "demo", "--model", "t1-ixi-midaxial",
         "--output-dir", "out", "--progress", "none"], tmp_path, env)
    assert (tmp_path / "out" / "autoddpm-demo.png").is_file()
    assert len(list((tmp_path / "out").glob("*_anomaly.nii.gz"))) == 3
