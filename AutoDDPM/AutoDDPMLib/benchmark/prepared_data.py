"""The benchmark's cases in one safetensors file, to run the benchmark where the data is not.

``autoddpm benchmark --prepare-data FILE`` loads what a run would load (every
dataset's cases on the model grid, the healthy slices that set the baselines'
thresholds, which dataset the card was calibrated on) and writes it;
``autoddpm benchmark --data FILE`` then runs from the file with nothing but
PyTorch and safetensors: the full benchmark on a GPU node that has neither the
volumes nor SimpleITK. The file belongs to one model: its grid, preprocessing
and calibration data made the cases, and are checked when it is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import AutoDDPMError
from ..models.bundle import save_tensors

PREPARED_SUFFIX = ".safetensors"


def is_prepared_data(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(PREPARED_SUFFIX)


def _identity(card) -> dict[str, Any]:
    """What made the cases: a file prepared for one model is refused by another."""
    return {"model": card.name, "image_size": card.image_size,
            "intensity_percentiles": list(card.intensity_percentiles),
            "min_foreground_fraction": card.min_foreground_fraction}


@dataclass
class PreparedData:
    """A prepared file, read: EvalSet fields, calibration family and overlap per dataset, calibration slices per family."""

    datasets: dict[str, dict[str, Any]]
    families: dict[str, str]
    overlaps: dict[str, Optional[str]]
    calibrations: dict[str, tuple[Any, str]]
    sizes: dict[str, Any]
    seed: int


def write_prepared_data(path: str | os.PathLike, card, evalsets: dict, families: dict[str, str],
                        overlaps: dict[str, Optional[str]], calibrations: dict[str, tuple[Any, str]],
                        sizes: dict[str, Any], seed: int) -> Path:
    """Write the loaded cases of ``evalsets`` (name -> EvalSet) and the baselines' calibration slices."""
    import torch

    path = Path(path)
    if not is_prepared_data(path):
        raise AutoDDPMError(f"the prepared benchmark data must be a {PREPARED_SUFFIX} file: {path}")
    tensors, datasets = {}, {}
    for name, evalset in evalsets.items():
        tensors[f"{name}/x"] = evalset.x.float()
        tensors[f"{name}/truth"] = torch.from_numpy(evalset.truth.astype(np.uint8))
        if evalset.healthy is not None:
            tensors[f"{name}/healthy"] = torch.from_numpy(np.ascontiguousarray(evalset.healthy, dtype=np.float32))
        datasets[name] = {"volumes": evalset.volumes, "bins": evalset.bins, "description": evalset.description,
                          "per_volume": evalset.per_volume, "family": families[name], "overlap": overlaps[name]}
    for family, (slices, _) in calibrations.items():
        tensors[f"calibration/{family}"] = slices.float()
    header = {"made_for": _identity(card), "sizes": sizes, "seed": seed, "datasets": datasets,
              "calibration_sources": {family: source for family, (_, source) in calibrations.items()}}
    save_tensors(path, tensors, {"autoddpm_benchmark": json.dumps(header)})
    return path


def read_prepared_data(path: str | os.PathLike, card) -> PreparedData:
    """The cases of a prepared file, after checking that they were made for ``card``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AutoDDPMError(f"prepared benchmark data {path} does not exist: make it with `autoddpm benchmark --prepare-data`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {})["autoddpm_benchmark"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, KeyError, ValueError) as error:
        raise AutoDDPMError(f"{path} is not benchmark data written by `autoddpm benchmark --prepare-data` ({error})") from None
    if header["made_for"] != _identity(card):
        raise AutoDDPMError(f"{path} was prepared for {header['made_for']}, not for model {card.name} "
                            f"({_identity(card)}): prepare it again with --model {card.name}")
    datasets = {}
    for name, info in header["datasets"].items():
        healthy = tensors.get(f"{name}/healthy")
        datasets[name] = {"name": name, "x": tensors[f"{name}/x"], "truth": tensors[f"{name}/truth"].numpy() > 0,
                          "healthy": None if healthy is None else healthy.numpy(), "volumes": info["volumes"],
                          "bins": info["bins"], "description": info["description"], "per_volume": info["per_volume"]}
    return PreparedData(
        datasets=datasets,
        families={name: info["family"] for name, info in header["datasets"].items()},
        overlaps={name: info["overlap"] for name, info in header["datasets"].items()},
        calibrations={family: (tensors[f"calibration/{family}"], source)
                      for family, source in header["calibration_sources"].items()},
        sizes=header["sizes"],
        seed=header["seed"],
    )
