"""The flat module paths of AutoDDPM 0.1.0 (``AutoDDPMLib.inference`` ...), kept importable for one release.

The engine moved into subpackages (``AutoDDPMLib.detection.inference`` ...). A script
that imports an old path gets the moved module itself, with a DeprecationWarning
naming the new path. Remove this file in the release after 0.2.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Optional, Sequence

MOVED = {
    "benchmark_datasets": "benchmark.datasets", "benchmark_merge": "benchmark.merge",
    "benchmark_methods": "benchmark.methods", "benchmark_parts": "benchmark.parts",
    "benchmark_prepared_data": "benchmark.prepared_data", "benchmark_report": "benchmark.report",
    "benchmark_scoring": "benchmark.scoring", "bundle": "models.bundle", "calibrate": "training.calibrate",
    "devices": "diffusion.devices", "figures": "benchmark.figures", "fit_checks": "models.fit_checks",
    "inference": "detection.inference", "lesions": "benchmark.lesions", "lpips": "diffusion.lpips",
    "metrics": "benchmark.metrics", "model_validation": "benchmark.validation_record",
    "networks": "models.networks", "onnx_backend": "diffusion.onnx_backend", "pipeline": "diffusion.pipeline",
    "sampling_schedules": "diffusion.sampling_schedules", "scheduler": "diffusion.scheduler",
    "slice_file": "training.slice_file", "slicer_process": "slicer_bridge.process",
    "slicer_results": "slicer_bridge.results", "slices": "volumes.slices", "speed": "benchmark.speed",
    "train": "training.train", "training_data": "training.training_data", "unet": "diffusion.unet",
    "volume_io": "volumes.volume_io",
}
# `AutoDDPMLib.benchmark` was a module and is now the benchmark's package; its
# functions moved to `AutoDDPMLib.benchmark.runner` (see benchmark/__init__.py).
PACKAGE = __name__.rpartition(".")[0]


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module path with the module at its new one."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None, target: Optional[ModuleType] = None):
        package, _, name = fullname.rpartition(".")
        if package != PACKAGE or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> None:
        return None  # a placeholder module; exec_module puts the real one in its place

    def exec_module(self, module: ModuleType) -> None:
        new_path = f"{PACKAGE}.{MOVED[module.__name__.rpartition('.')[2]]}"
        warnings.warn(f"{module.__name__} moved to {new_path}; the old path will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        # The import system returns whatever sys.modules holds under the old name
        # once this returns, so the caller gets the moved module itself (its
        # __spec__ untouched), and both names share one module object.
        sys.modules[module.__name__] = importlib.import_module(new_path)


def install() -> None:
    """Put the finder after the normal ones: it only answers names no file answers."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
