"""Where a result came from: the command that made it and the commit of the code that ran.

Benchmark reports carry both, so that every number the README shows can be traced
and rerun.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional


def git_commit() -> str:
    """The short commit of this checkout, "+uncommitted changes" when tracked files differ, or "unknown"."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("+uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(subcommand: str) -> Optional[str]:
    """The ``autoddpm ...`` command being run, when ``subcommand`` came from the command line (else None)."""
    if subcommand not in sys.argv[1:]:
        return None
    return "autoddpm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
