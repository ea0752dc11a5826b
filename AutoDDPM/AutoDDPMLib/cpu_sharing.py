"""How a run shares the CPU with other work: threads that sleep while they wait, and a lower priority on request.

PyTorch's OpenMP threads and ONNX Runtime's thread pool spin while they wait
for work, by default. Alone that saves microseconds; beside a second job on the
same cores, the spinning threads take the cores the other job's threads need,
and both slow down 2-3x instead of sharing the time (measured with
tools/run_speed.py, Resources/Benchmark/speed/run.md). ONNX Runtime is told
not to spin where its session is made (diffusion/onnx_backend.py); OpenMP
reads its policy from the environment once, when PyTorch loads.
"""

from __future__ import annotations

import os
import sys

# Added to the process's nice value by lower_priority (POSIX: 0 is normal, 19 the lowest).
NICE_INCREMENT = 10
# Windows' BELOW_NORMAL_PRIORITY_CLASS, for SetPriorityClass.
_BELOW_NORMAL_PRIORITY_CLASS = 0x4000


def wait_passively() -> bool:
    """Make PyTorch's OpenMP threads sleep, not spin, while they wait (OMP_WAIT_POLICY=PASSIVE).

    Must run before torch is imported, and keeps a policy the user set. Returns
    whether the threads of this process will wait passively.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def lower_priority() -> None:
    """Run this process below normal CPU priority, so that an interactive application on the same cores
    (Slicer's views and panels) gets the CPU first and the run takes the rest."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        kernel32.SetPriorityClass(kernel32.GetCurrentProcess(), _BELOW_NORMAL_PRIORITY_CLASS)
    else:
        os.nice(NICE_INCREMENT)
