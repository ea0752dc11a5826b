"""Where a result came from: the command that made it and the commit of the code that ran.

Benchmark reports carry both, so that every number the README shows can be traced
and rerun.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPOSITORY = Path(__file__).resolve().parents[2]
# What a result depends on: the engine and the module, the weights they load and the package's pins.
# Edits elsewhere (results being written, the README) do not make a result "uncommitted".
RESULT_INPUTS: tuple[str, ...] = ("AutoDDPM", "Resources/Models", "Resources/LPIPS", "Resources/SampleData", "pyproject.toml")


def git_commit(repository: Path = REPOSITORY) -> str:
    """The short commit of this checkout, "+uncommitted changes" when tracked inputs of a result differ from it,
    or "unknown" outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(repository), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        toplevel, short = commit.stdout.splitlines()  # a folder name may hold spaces
        # An installed package lives in site-packages: a checkout around that (a venv made inside a clone)
        # is not the code that runs.
        if Path(toplevel).resolve() != repository.resolve():
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repository), "status", "--porcelain", "--untracked-files=no", "--",
                                *RESULT_INPUTS], capture_output=True, text=True, timeout=10)
        return short + ("+uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(subcommand: str) -> Optional[str]:
    """The ``autoddpm ...`` command being run, when ``subcommand`` came from the command line (else None)."""
    if subcommand not in sys.argv[1:]:
        return None
    return "autoddpm " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (the weights, card or input a result was made from), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
