"""How a run shares the CPU: threads that sleep while they wait, and `--nice` below normal priority."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from AutoDDPMLib.diffusion.onnx_backend import missing_onnx_packages, session_options


def run_python(code: str, env_changes: dict[str, str | None] | None = None) -> str:
    env = dict(os.environ)
    for name, value in (env_changes or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


AFTER_CLI = ("import os, sys; from AutoDDPMLib.cli import main; code = main(sys.argv[1:] or {argv}); "
             "import torch; print(code, os.environ.get('OMP_WAIT_POLICY'), os.nice(0) if os.name != 'nt' else 0)")


def test_the_command_line_makes_openmp_threads_wait_passively() -> None:
    code, policy, _ = run_python(AFTER_CLI.format(argv=["models"]), {"OMP_WAIT_POLICY": None}).split()
    assert (code, policy) == ("0", "PASSIVE")


def test_a_wait_policy_the_user_set_is_kept() -> None:
    _, policy, _ = run_python(AFTER_CLI.format(argv=["models"]), {"OMP_WAIT_POLICY": "ACTIVE"}).split()
    assert policy == "ACTIVE"


@pytest.mark.skipif(os.name == "nt", reason="POSIX nice values")
def test_nice_lowers_the_priority_of_the_run_only_when_asked() -> None:
    start = os.nice(0)
    _, _, plain = run_python(AFTER_CLI.format(argv=["models"])).split()
    _, _, nice = run_python(AFTER_CLI.format(argv=["--nice", "models"])).split()
    assert int(plain) == start
    assert int(nice) == min(start + 10, 19)


@pytest.mark.skipif(bool(missing_onnx_packages()), reason="needs autoddpm[onnx]")
def test_onnx_runtime_threads_sleep_while_they_wait() -> None:
    options = session_options(3)
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
