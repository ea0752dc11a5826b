#!/usr/bin/env python3
"""How long `autoddpm run` takes on the 36-slice sample, alone and sharing the CPU, and what it leaves an
interactive application beside it.

    python tools/run_speed.py --output Resources/Benchmark/speed/run.md

Each case starts one or more `autoddpm run` processes at once on the bundled FLAIR
sample (the command a user types, model load and file writing included) and
reports each run's wall time and the volume it flagged (the same in every case
when the results do not depend on the threads). The last cases run a probe
beside it: a process at normal priority that does 20 ms of work every 100 ms, as
a viewer redrawing would, and reports how long each piece of work took; with
`--nice` the run leaves the probe what it needs. Time it on an otherwise quiet
machine: the load average at the start is recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "SampleData" / "TCGA_LGG_FLAIR.nii.gz"
FLAGGED = re.compile(r"([0-9.]+) mL flagged")

# A viewer's work: this much CPU time, then a pause, for as long as the run lasts.
PROBE = """
import sys, time
work, pause, took = float(sys.argv[1]), float(sys.argv[2]), []
def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
while True:
    start = time.perf_counter(); spin(work); took.append(time.perf_counter() - start)
    print(f"{took[-1]:.4f}", flush=True); time.sleep(pause)
"""
PROBE_WORK_S, PROBE_PAUSE_S = 0.02, 0.08


@dataclass(frozen=True)
class Case:
    name: str
    runs: int  # started at once
    threads: int | None  # --threads of each run (None: the default, all cores)
    nice: bool = False
    probe: bool = False


CASES = [
    Case("alone, 1 thread", 1, 1),
    Case("alone, default threads", 1, None),
    Case("two runs at once, default threads", 2, None),
    Case("two runs at once, 1 thread each", 2, 1),
    Case("alone, default threads, beside a viewer", 1, None, probe=True),
    Case("alone, default threads, --nice, beside a viewer", 1, None, nice=True, probe=True),
]


def autoddpm_command(case: Case, output_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "AutoDDPMLib.cli"]
    if case.threads is not None:
        command += ["--threads", str(case.threads)]
    if case.nice:
        command.append("--nice")
    return command + ["run", str(SAMPLE), "--output-dir", str(output_dir)]


def run_case(case: Case, folder: Path) -> tuple[list[float], list[str], list[float]]:
    """Wall seconds and flagged volume of each run, and the probe's work times (empty without one)."""
    probe = None
    if case.probe:
        probe = subprocess.Popen([sys.executable, "-c", PROBE, str(PROBE_WORK_S), str(PROBE_PAUSE_S)],
                                 stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
    started, processes = time.perf_counter(), []
    for index in range(case.runs):
        out = folder / f"{case.name}-{index}".replace(" ", "_").replace(",", "")
        processes.append(subprocess.Popen(autoddpm_command(case, out), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    walls, flagged = [], []
    for process in processes:
        stdout, _ = process.communicate()
        walls.append(time.perf_counter() - started)
        if process.returncode != 0:
            raise SystemExit(f"{case.name}: autoddpm run failed with exit code {process.returncode}")
        found = FLAGGED.search(stdout)
        flagged.append(found.group(1) if found else "?")
    took: list[float] = []
    if probe is not None:
        probe.kill()
        took = [float(line) for line in probe.stdout.read().split()]
    return walls, flagged, took


def probe_alone() -> list[float]:
    probe = subprocess.Popen([sys.executable, "-c", PROBE, str(PROBE_WORK_S), str(PROBE_PAUSE_S)],
                             stdout=subprocess.PIPE, text=True)
    time.sleep(5)
    probe.kill()
    return [float(line) for line in probe.stdout.read().split()]


def milliseconds(values: list[float], quantile: float) -> str:
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, help="write the table here as Markdown (default: print it)")
    parser.add_argument("--without-viewer", action="store_true",
                        help="only the cases without a viewer (they need no --nice, so older commits can run them)")
    args = parser.parse_args()
    cases = [case for case in CASES if not (args.without_viewer and case.probe)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "AutoDDPM"), os.environ.get("PYTHONPATH", "")])
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty=+uncommitted changes"],
                            capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()[0]
    lines = [
        "# `autoddpm run` on the FLAIR sample, alone and sharing the CPU", "",
        f"- Command: `python tools/run_speed.py {shlex.join(sys.argv[1:])}`",
        f"- Commit: `{commit}`",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, load average {load:.2f} at the start",
        f"- Input: `{SAMPLE.relative_to(REPO)}` (36 slices of 256 x 256, 34 with signal), flair-lgg, fast schedule, "
        "the default backend; each time is one run's wall clock from start to exit (imports, model load, writing)", "",
        "| case | runs at once | threads each | --nice | seconds per run | flagged mL |",
        "|---|---|---|---|---|---|",
    ]
    probe_lines = ["", f"A viewer beside the run: a process at normal priority doing {1000 * PROBE_WORK_S:.0f} ms of "
                   f"work every {1000 * (PROBE_WORK_S + PROBE_PAUSE_S):.0f} ms; how long each piece took.", "",
                   "| case | median ms | 95th percentile ms | pieces |", "|---|---|---|---|"]
    alone = [] if args.without_viewer else probe_alone()
    if alone:
        probe_lines.append(f"| the viewer alone | {milliseconds(alone, 0.5)} | {milliseconds(alone, 0.95)} | {len(alone)} |")
    with tempfile.TemporaryDirectory(prefix="autoddpm-speed-") as folder:
        for case in cases:
            walls, flagged, took = run_case(case, Path(folder))
            seconds = ", ".join(f"{wall:.1f}" for wall in walls)
            lines.append(f"| {case.name} | {case.runs} | {case.threads or os.cpu_count()} | {'yes' if case.nice else 'no'} "
                         f"| {seconds} | {', '.join(sorted(set(flagged)))} |")
            if took:
                probe_lines.append(f"| {case.name} | {milliseconds(took, 0.5)} | {milliseconds(took, 0.95)} | {len(took)} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines + (probe_lines if alone else [])) + "\n"
    if args.output:
        args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
