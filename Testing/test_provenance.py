import subprocess
from pathlib import Path

from AutoDDPMLib.provenance import git_commit


def _git(repository: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_a_commit_is_uncommitted_only_when_what_the_result_depends_on_changed(tmp_path):
    (tmp_path / "AutoDDPM").mkdir()
    (tmp_path / "AutoDDPM" / "engine.py").write_text("x = 1\n")
    (tmp_path / "results.md").write_text("old numbers\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "start")
    head = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert git_commit(tmp_path) == head
    # A benchmark writing its own report (or an edited README) does not change what made the numbers.
    (tmp_path / "results.md").write_text("new numbers\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "AutoDDPM" / "engine.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == f"{head}+uncommitted changes"


def test_outside_a_checkout_the_commit_is_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown"


def test_a_package_installed_inside_a_checkout_has_no_commit(tmp_path):
    # pip installs into site-packages, e.g. of a venv made inside a clone: that clone's commit is not what runs.
    site_packages = tmp_path / ".venv" / "lib" / "site-packages"
    site_packages.mkdir(parents=True)
    (tmp_path / "README.md").write_text("a clone\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "README.md")
    _git(tmp_path, "commit", "-qm", "start")
    assert git_commit(tmp_path) != "unknown"
    assert git_commit(site_packages) == "unknown"
