"""Progress of ``autoddpm run``: a bar for people, JSON lines for programs (the Slicer module).

JSON events, one object per stdout line:
``start`` (input, evaluations_per_slice, schedule, device, backend, backend_note, model, threshold),
``progress`` (input, fraction 0..1 of that input, stage: reading | mask | resample | writing),
``warning`` (message), ``done`` (input, outputs, threshold, anomalous_voxels, anomalous_volume_ml, repeats, seconds),
``skipped`` (input, reason: ``--resume`` found its outputs), ``finished`` (seconds).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import AutoDDPMError


class Reporter:
    """Says nothing; the base of the other reporters (``--progress none``)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def loading(self, model: str) -> None:
        pass

    @contextmanager
    def working_on(self, path: Path) -> Iterator[None]:
        """Around the work on one input: what is printed after it (an error) starts on a line of its own."""
        yield

    def skipped(self, path: Path, reason: str) -> None:
        print(f"{path.name}: skipped, {reason}", file=sys.stderr)

    def start(self, path: Path, engine: Any, image: Any) -> None:
        pass

    def stage(self, path: Path, stage: str, fraction: float) -> None:
        pass

    def warning(self, message: str) -> None:
        print(f"autoddpm: warning: {message}", file=sys.stderr)

    def done(self, path: Path, outputs: dict[str, Path], engine: Any, result: Any) -> None:
        pass

    def finished(self) -> None:
        pass


class BarReporter(Reporter):
    """A tqdm bar per input, and the evaluation count up front."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = None

    def loading(self, model: str) -> None:
        # Loading takes seconds (PyTorch, the network, LPIPS) before the first bar can show anything.
        print(f"loading model {model} ...", file=sys.stderr, flush=True)

    @contextmanager
    def working_on(self, path: Path) -> Iterator[None]:
        try:
            yield
        finally:
            self._close_bar()

    def _close_bar(self) -> None:
        # A bar's line ends only when it closes: anything printed while it is open would be glued to it.
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def warning(self, message: str) -> None:
        if self._bar is None:
            super().warning(message)
        else:
            self._bar.write(f"autoddpm: warning: {message}", file=sys.stderr)

    def start(self, path: Path, engine: Any, image: Any) -> None:
        from tqdm import tqdm

        print(f"{path.name}: model {engine.card.name}, schedule {engine.schedule_name} "
              f"({engine.evaluations_per_slice} network evaluations per slice), device {engine.device}, "
              f"backend {engine.backend_name}; post-processing: {engine.postprocessing.describe()}", file=sys.stderr)
        self._bar = tqdm(total=100, desc=path.name, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")

    def stage(self, path: Path, stage: str, fraction: float) -> None:
        if self._bar is not None:
            self._bar.update(int(100 * fraction) - self._bar.n)
            self._bar.set_postfix_str(stage, refresh=False)

    def done(self, path: Path, outputs: dict[str, Path], engine: Any, result: Any) -> None:
        if self._bar is not None:
            self._bar.update(100 - self._bar.n)
        self._close_bar()
        print(f"{path.name}: {result.anomalous_volume_ml:.2f} mL flagged at threshold {result.threshold:.4g} "
              f"({result.slices_with_signal} of {result.slices} slices, {result.seconds:.1f} s); "
              f"outputs in {outputs['mask'].parent}", file=sys.stderr)


class JsonReporter(Reporter):
    """One JSON object per line on stdout, flushed at once so a reader sees it live."""

    def _emit(self, event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    def start(self, path: Path, engine: Any, image: Any) -> None:
        self._emit("start", input=str(path), evaluations_per_slice=engine.evaluations_per_slice,
                   schedule=engine.schedule_name, device=str(engine.device), backend=engine.backend_name,
                   backend_note=engine.backend_note, model=engine.card.name,
                   threshold=engine.threshold)

    def stage(self, path: Path, stage: str, fraction: float) -> None:
        self._emit("progress", input=str(path), fraction=round(fraction, 4), stage=stage)

    def warning(self, message: str) -> None:
        self._emit("warning", message=message)

    def skipped(self, path: Path, reason: str) -> None:
        self._emit("skipped", input=str(path), reason=reason)

    def done(self, path: Path, outputs: dict[str, Path], engine: Any, result: Any) -> None:
        self._emit("done", input=str(path), outputs={k: str(v) for k, v in outputs.items()}, threshold=result.threshold,
                   slices=result.slices, slices_with_signal=result.slices_with_signal,
                   anomalous_voxels=result.anomalous_voxels, anomalous_volume_ml=result.anomalous_volume_ml,
                   repeats=result.repeats, seconds=round(result.seconds, 3),
                   postprocessing=result.postprocessing_settings, skull_stripped=result.skull_stripped)

    def finished(self) -> None:
        self._emit("finished", seconds=round(time.perf_counter() - self.started, 3))


def make_reporter(kind: str) -> Reporter:
    reporters = {"bar": BarReporter, "json": JsonReporter, "none": Reporter}
    if kind not in reporters:
        raise AutoDDPMError(f"unknown --progress '{kind}': choose bar, json or none")
    return reporters[kind]()
