"""Running the engine as a separate process for the Slicer module.

The model runs in its own process (Slicer's Python running ``AutoDDPMLib.cli``)
so the application stays responsive and a cancel can stop it at once. This
file imports neither slicer nor Qt: reader threads only queue the lines, and
whoever owns the scene (the module's Logic, on Slicer's main thread) drains the
queue and touches MRML.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from ..diffusion.sampling_schedules import DEFAULT_SCHEDULE

# The folder that holds the AutoDDPMLib package: it goes on the engine's PYTHONPATH.
MODULE_DIR = Path(__file__).resolve().parents[2]

ERROR_PREFIX = "autoddpm: error: "


def python_executable() -> str:
    """The Python that runs the engine: Slicer's PythonSlicer launcher, or this interpreter outside Slicer.

    Inside Slicer ``sys.executable`` is the application itself, not a Python
    interpreter, so the launcher (on Slicer's PATH) comes first.
    """
    return shutil.which("PythonSlicer") or sys.executable


def engine_command(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    model: Optional[str] = None,
    schedule: str = DEFAULT_SCHEDULE,
    device: str = "auto",
    seed: int = 0,
    threshold: Optional[float] = None,
    repeats: int = 1,
    postprocess: str = "card",
    skull_stripped: Optional[bool] = None,
) -> list[str]:
    """The ``autoddpm run`` command line with machine-readable progress.

    It runs below normal priority (``--nice``) on all cores: Slicer's views and
    panels get the CPU when they need it, the run takes the rest. ``postprocess``
    is the engine's ``--postprocess`` (``card``, its default, is left out);
    ``skull_stripped`` its ``--skull-stripped`` (True: yes, False: no; None:
    auto, its default, left out: the engine looks at the input).
    """
    args = [python_executable(), "-m", "AutoDDPMLib.cli", "--nice", "run", str(input_path),
            "--output-dir", str(output_dir), "--schedule", schedule, "--device", device,
            "--seed", str(int(seed)), "--progress", "json"]
    if model is not None:
        args += ["--model", str(model)]
    if threshold is not None:
        args += ["--threshold", repr(float(threshold))]
    if repeats != 1:
        args += ["--repeats", str(int(repeats))]
    if postprocess != "card":
        args += ["--postprocess", str(postprocess)]
    if skull_stripped is not None:
        args += ["--skull-stripped", "yes" if skull_stripped else "no"]
    return args


def engine_environment(device: str = "auto", base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with AutoDDPMLib importable, unbuffered output and the device choice."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # Progress lines must arrive as they are printed, not when a pipe buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    if device == "cpu":
        # A CPU run must not touch (or wait for) a busy GPU at all.
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


def parse_event(line: str) -> Optional[dict[str, Any]]:
    """The progress event a stdout line carries, or None for any other output."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


def make_temp_dir(root: Optional[str | os.PathLike] = None) -> Path:
    """A fresh private folder for one run's input and outputs (under ``root``, else the system temp folder)."""
    return Path(tempfile.mkdtemp(prefix="AutoDDPM-", dir=None if root is None else str(root)))


def input_file_name(node_name: str) -> str:
    """The file the engine reads a node from: named like the node, because the engine reads what a
    name says about the contrast (e.g. "T1" given to a FLAIR model) to warn about it."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", node_name).strip("._") or "input"
    return stem[:100] + ".nrrd"


def remove_temp_dir(folder: Optional[Path]) -> None:
    """Delete a run's folder and everything in it; a folder already gone is fine."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def kill_process_tree(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Kill a process and all its descendants, and wait until they are gone.

    PythonSlicer is a launcher that starts the real interpreter as a child on
    some platforms, and PyTorch may start workers: killing only the process we
    started would leave the computation running and its files open.
    """
    try:
        import psutil
    except ImportError:
        # Without psutil (not yet installed) only the direct child can be stopped.
        process.kill()
        process.wait()
        return
    try:
        parent = psutil.Process(process.pid)
        processes = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for member in processes:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=timeout)


class EngineProcess:
    """One running ``autoddpm run``: its output lines, events and exit status.

    Two daemon threads read stdout and stderr into a queue as they arrive (so
    the engine never blocks on a full pipe); :meth:`poll` hands the parsed
    events to the caller's thread.
    """

    def __init__(self, args: Sequence[str], env: Optional[dict[str, str]] = None) -> None:
        creationflags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console window pops up on Windows
        self.process = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, encoding="utf-8", errors="replace", bufsize=1, env=env, creationflags=creationflags,
        )
        self._lines: queue.Queue[tuple[str, Optional[str]]] = queue.Queue()
        self._open_streams = 2
        self.stderr_lines: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        try:
            for line in stream:
                self._lines.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass  # the pipe closed under us: the process was killed
        finally:
            self._lines.put((name, None))

    def poll(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """New events since the last call, waiting up to ``timeout`` seconds for the first one.

        Lines that are not progress events come as ``{"event": "log", "stream":
        "stdout" or "stderr", "message": line}``; stderr is also kept for
        :meth:`error_message`.
        """
        new_events = []
        block = timeout > 0
        while True:
            try:
                name, line = self._lines.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                break
            block = False
            if line is None:
                self._open_streams -= 1
                continue
            event = parse_event(line) if name == "stdout" else None
            if event is None:
                if name == "stderr":
                    self.stderr_lines.append(line)
                event = {"event": "log", "stream": name, "message": line}
            new_events.append(event)
        return new_events

    @property
    def finished(self) -> bool:
        """The process has exited and all its output has been read."""
        return self._open_streams == 0 and self.process.poll() is not None

    @property
    def returncode(self) -> Optional[int]:
        return self.process.poll()

    def error_message(self) -> str:
        """What went wrong, in the engine's own words: its error line, else the end of its stderr."""
        for line in reversed(self.stderr_lines):
            if line.startswith(ERROR_PREFIX):
                return line[len(ERROR_PREFIX):]
        tail = [line for line in self.stderr_lines if line.strip()][-5:]
        return "\n".join(tail) if tail else f"the engine exited with code {self.returncode}"

    def kill(self) -> None:
        """Stop the engine and every process it started, and release the pipes (harmless once it has exited)."""
        if self.process.poll() is None:
            kill_process_tree(self.process)
        self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


class RunClock:
    """Elapsed time of a run and an estimate of what is left, from the engine's progress fractions.

    The rate is measured from the first progress event, not from the start: loading PyTorch and the model takes
    seconds that say nothing about how fast the slices go. Between events the estimate counts down, so a panel that
    shows it every second stays right while a slow schedule works on one batch.
    """

    def __init__(self, now: float) -> None:
        self.started = now
        self._first: Optional[tuple[float, float]] = None  # (time, fraction) of the first progress event
        self._estimate: Optional[tuple[float, float]] = None  # (time, seconds left then) at the last event

    def progress(self, now: float, fraction: float) -> None:
        """The engine reports ``fraction`` done at ``now``."""
        if self._first is None:
            self._first = (now, fraction)
            return
        first_time, first_fraction = self._first
        if fraction > first_fraction and now > first_time:
            rate = (fraction - first_fraction) / (now - first_time)
            self._estimate = (now, (1.0 - fraction) / rate)

    def elapsed(self, now: float) -> float:
        return now - self.started

    def remaining(self, now: float) -> Optional[float]:
        """Seconds left (None until the rate is known)."""
        if self._estimate is None:
            return None
        at, left = self._estimate
        return max(0.0, left - (now - at))


def format_duration(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss`` from an hour on) for the panel."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
