"""The Slicer module's process helpers (pure Python: no Slicer needed)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

from AutoDDPMLib.slicer_bridge.process import (
    MODULE_DIR,
    EngineProcess,
    RunClock,
    engine_command,
    engine_environment,
    format_duration,
    input_file_name,
    make_temp_dir,
    parse_event,
    remove_temp_dir,
)
from AutoDDPMLib.slicer_bridge.results import summarize


def test_engine_command_asks_for_json_progress() -> None:
    command = engine_command("in.nrrd", "out", model="m", schedule="reference", device="cpu", seed=3, threshold=0.25,
                             repeats=4, postprocess="deepbet")
    # Below normal priority, so Slicer's views and panels get the CPU when they need it.
    assert command[1:6] == ["-m", "AutoDDPMLib.cli", "--nice", "run", "in.nrrd"]
    pairs = dict(zip(command[6::2], command[7::2]))
    assert pairs == {"--output-dir": "out", "--schedule": "reference", "--device": "cpu", "--seed": "3",
                     "--progress": "json", "--model": "m", "--threshold": "0.25", "--repeats": "4",
                     "--postprocess": "deepbet"}
    # No threshold: the engine takes the model card's; one run: no spread asked for; the card's post-processing is
    # the engine's own default.
    assert "--threshold" not in engine_command("in.nrrd", "out")
    assert "--repeats" not in engine_command("in.nrrd", "out")
    assert "--postprocess" not in engine_command("in.nrrd", "out", postprocess="card")


def test_engine_environment() -> None:
    env = engine_environment("cpu", base={"PYTHONPATH": "elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(MODULE_DIR), "elsewhere"]
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and env["PYTHONUNBUFFERED"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in engine_environment("auto", base={})
    assert (MODULE_DIR / "AutoDDPMLib" / "cli.py").is_file()


@pytest.mark.parametrize("line, event", [
    ('{"event": "progress", "fraction": 0.5}', {"event": "progress", "fraction": 0.5}),
    ("  Loading model...", None),
    ('{"not": "an event"}', None),
    ("{broken json", None),
    ("[1, 2]", None),
])
def test_parse_event(line: str, event) -> None:
    assert parse_event(line) == event


def run_to_end(engine: EngineProcess) -> list[dict]:
    events = []
    deadline = time.monotonic() + 30
    while not engine.finished and time.monotonic() < deadline:
        events += engine.poll(0.1)
    engine.kill()
    return events


def test_engine_process_separates_events_logs_and_the_error_line() -> None:
    script = ("import json, sys\n"
              "print('plain output')\n"
              "print(json.dumps({'event': 'progress', 'fraction': 1.0}))\n"
              "print('autoddpm: error: the input has no brain in it', file=sys.stderr)\n"
              "sys.exit(2)\n")
    engine = EngineProcess([sys.executable, "-c", script])
    events = run_to_end(engine)
    assert {"event": "progress", "fraction": 1.0} in events
    assert {"event": "log", "stream": "stdout", "message": "plain output"} in events
    assert engine.returncode == 2
    assert engine.error_message() == "the input has no brain in it"


def test_engine_process_kill_stops_the_whole_tree(tmp_path) -> None:
    psutil = pytest.importorskip("psutil")  # Testing/slicer_module/requirements.txt; Slicer gets it through pip_ensure
    # A launcher that starts the real worker as a child, as PythonSlicer does on some platforms.
    marker = tmp_path / "child.pid"
    child = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    engine = EngineProcess([sys.executable, "-c", launcher])
    deadline = time.monotonic() + 20
    while not (marker.is_file() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int(marker.read_text())
    engine.kill()
    assert engine.process.poll() is not None
    assert not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("node_name, file_name", [
    ("TCGA_LGG_FLAIR", "TCGA_LGG_FLAIR.nrrd"),
    ("IXI012 T1/brain", "IXI012_T1_brain.nrrd"),
    ("../..", "input.nrrd"),
    ("", "input.nrrd"),
])
def test_input_file_is_named_like_the_node(node_name: str, file_name: str) -> None:
    assert input_file_name(node_name) == file_name


def test_temp_dir_is_private_and_removed(tmp_path) -> None:
    folder = make_temp_dir(tmp_path)
    (folder / "output").mkdir()
    (folder / "output" / "x.nii.gz").write_bytes(b"x")
    assert folder.parent == tmp_path and folder.name.startswith("AutoDDPM-")
    remove_temp_dir(folder)
    assert list(tmp_path.iterdir()) == []
    remove_temp_dir(folder)  # already gone: fine


def test_summary_in_millilitres_and_largest_part() -> None:
    mask = np.zeros((4, 10, 10), bool)
    mask[0, :2, :2] = True  # 4 voxels
    mask[3, 5:8, 5:8] = True  # 9 voxels, apart from the first
    mask[2, 4, 4] = True  # touches the 9 only at a corner: one part with 26-connectivity
    summary = summarize(mask, (1.0, 2.0, 0.5), threshold=0.3)
    assert (summary.voxels, summary.components) == (14, 2)
    assert summary.volume_ml == pytest.approx(14 / 1000) and summary.largest_component_ml == pytest.approx(10 / 1000)
    assert summarize(np.zeros((2, 2, 2)), (1, 1, 1), 0.1).largest_component_ml == 0


def test_the_run_clock_estimates_from_the_rate_after_start_up_and_counts_down_between_events() -> None:
    clock = RunClock(now=100.0)
    # Start-up (PyTorch, the model) takes 20 s and says nothing about the rate: no estimate at the first event.
    clock.progress(120.0, 0.05)
    assert clock.remaining(120.0) is None and clock.elapsed(125.0) == 25.0
    # 10% more in 10 s: 85% left is 85 s, counting down until the next event.
    clock.progress(130.0, 0.15)
    assert clock.remaining(130.0) == pytest.approx(85.0)
    assert clock.remaining(140.0) == pytest.approx(75.0)
    assert clock.remaining(1000.0) == 0.0
    clock.progress(150.0, 0.35)  # faster now: 30% in 30 s overall
    assert clock.remaining(150.0) == pytest.approx(65.0)


def test_durations_read_as_clocks() -> None:
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 3600, 7322, -3)] == [
        "0:00", "0:59", "1:01", "59:59", "1:00:00", "2:02:02", "0:00"]
