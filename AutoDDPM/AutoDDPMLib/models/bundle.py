"""Model bundles: a folder with ``model.safetensors`` (weights) and ``model.json`` (model card).

The card carries everything needed to use the weights correctly: the network
architecture, the noise schedule, the preprocessing, the calibrated thresholds,
the default sampling schedules, what the model is valid for, the training data
and its license, and validation metrics. Reading a card needs only the standard
library, so the Slicer module can list models before PyTorch is installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..diffusion.sampling_schedules import SCHEDULES, SamplingSchedule
from ..errors import AutoDDPMError
from ..resources import resources_dir

if TYPE_CHECKING:
    import torch

    from ..diffusion.scheduler import DDPMScheduler
    from ..diffusion.unet import UNet, UNetConfig

CARD_FORMAT = "autoddpm-model/1"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
DEFAULT_MODEL = "flair-lgg"

# Keys every card must have, with the type each must be.
_REQUIRED = {
    "format": str,
    "name": str,
    "modality": str,
    "unet": dict,
    "scheduler": dict,
    "preprocessing": dict,
    "thresholds": dict,
    "schedules": dict,
}


@dataclass
class ModelCard:
    """A validated ``model.json``; ``data`` is the whole card as written."""

    path: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def image_size(self) -> int:
        return int(self.data["unet"]["image_size"])

    @property
    def covers(self) -> dict[str, bool]:
        """What kinds of input the model was made for, machine-readable (e.g. {"skull_stripped": False});
        a kind it does not name was not recorded. ``valid_for`` says the same in words."""
        return self.data.get("covers", {})

    @property
    def intensity_percentiles(self) -> tuple[float, float]:
        """The foreground intensity percentiles that preprocessing maps to 0 and 1."""
        low, high = self.data["preprocessing"].get("intensity_percentiles", (0.5, 99.5))
        return float(low), float(high)

    @property
    def min_foreground_fraction(self) -> float:
        """Slices with signal in less than this share of their pixels are left out (and passed through)."""
        return float(self.data["preprocessing"].get("min_foreground_fraction", 0.05))

    @property
    def lpips_image_size(self) -> int:
        """The size, in pixels, slices are resized to for LPIPS in the mask step (the model grid unless the card says)."""
        return int(self.data.get("lpips_image_size", self.image_size))

    @property
    def mask_threshold(self) -> float:
        """tau: pixels of the likelihood map M above it are re-sampled."""
        return float(self.data["thresholds"]["mask_tau"])

    @property
    def anomaly_threshold(self) -> float:
        """The threshold on the final anomaly map A that makes the output mask."""
        return float(self.data["thresholds"]["anomaly"])

    def thresholds_for(self, schedule: str) -> tuple[float, float, bool]:
        """(tau, anomaly threshold, whether calibration used ``schedule``) for runs with ``schedule``.

        Both depend on the schedule: a 201-step reconstruction differs from the
        input by other amounts than a 10-step one. A card holds the thresholds of
        the schedule it was calibrated with, and may hold more under
        ``thresholds.schedules``.
        """
        thresholds = self.data["thresholds"]
        own = thresholds.get("schedules", {}).get(schedule)
        if own:
            return float(own["mask_tau"]), float(own["anomaly"]), self._same_lpips_size(own)
        matched = (bool(thresholds.get("calibrated")) and thresholds.get("calibration", {}).get("schedule") == schedule
                   and self._same_lpips_size(thresholds))
        return self.mask_threshold, self.anomaly_threshold, matched

    @property
    def postprocessing(self) -> dict:
        """The card's post-processing settings of the anomaly map (empty: the paper's raw map; see detection.postprocessing)."""
        return dict(self.data.get("postprocessing") or {})

    def postprocessed_threshold(self, schedule: str, settings: dict | None = None) -> float | None:
        """The threshold on the map post-processed with ``settings`` (default: the card's) for runs with
        ``schedule``, or None when none was calibrated for those settings and the current tau (calibration
        writes the card's beside the schedule's raw threshold, and others, e.g. deepbet's brain region, in
        ``postprocessed_alternatives``)."""
        settings = self.postprocessing if settings is None else settings
        thresholds = self.data["thresholds"]
        own = thresholds.get("schedules", {}).get(schedule)
        entry = own if own else (thresholds if thresholds.get("calibration", {}).get("schedule") == schedule else {})
        for postprocessed in [entry.get("postprocessed") or {}] + list(entry.get("postprocessed_alternatives", [])):
            if (postprocessed.get("settings") == settings and "anomaly" in postprocessed
                    and postprocessed.get("mask_tau") == entry.get("mask_tau")):
                return float(postprocessed["anomaly"])
        return None

    def run_threshold(self, schedule: str, settings: dict | None = None) -> float:
        """The threshold a run with ``schedule`` uses unless given one: that of the map post-processed with
        ``settings`` (default: the card's; {}: none) when it was calibrated, else the raw map's."""
        settings = self.postprocessing if settings is None else settings
        postprocessed_threshold = self.postprocessed_threshold(schedule, settings) if settings else None
        return self.thresholds_for(schedule)[1] if postprocessed_threshold is None else postprocessed_threshold

    def _same_lpips_size(self, thresholds: dict) -> bool:
        """Whether ``thresholds`` were calibrated with the LPIPS size the card now sets (tau depends on it)."""
        calibration = thresholds.get("calibration", {})
        return int(calibration.get("lpips_image_size", self.image_size)) == self.lpips_image_size

    def schedule(self, name: str) -> SamplingSchedule:
        """The sampling schedule ``name`` as this model runs it (the card's copy, else the engine's default)."""
        if name not in SCHEDULES:
            raise AutoDDPMError(f"unknown schedule '{name}': choose one of {', '.join(SCHEDULES)}")
        saved = self.data["schedules"].get(name)
        try:
            schedule = SamplingSchedule(**saved) if saved else SCHEDULES[name]
        except (TypeError, ValueError) as exc:
            raise AutoDDPMError(f"model card {self.path} has an invalid '{name}' schedule ({exc})") from None
        if schedule.coarse_start > self.max_timestep:
            raise AutoDDPMError(
                f"the '{name}' schedule starts at noise level {schedule.coarse_start} but model {self.name} "
                f"was trained up to {self.max_timestep} only"
            )
        return schedule

    def noise_scheduler(self) -> "DDPMScheduler":
        """The forward process the network was trained with: the card's number of levels and betas."""
        from ..diffusion.scheduler import DDPMScheduler

        settings = self.data["scheduler"]
        return DDPMScheduler(**{k: settings[k] for k in ("num_train_timesteps", "beta_start", "beta_end") if k in settings})

    @property
    def max_timestep(self) -> int:
        """The highest noise level the network was trained on."""
        return int(self.data["scheduler"].get("max_timestep", self.data["scheduler"]["num_train_timesteps"] - 1))


def bundled_models_dir() -> Path:
    return resources_dir() / "Models"


def list_bundled_models() -> list[ModelCard]:
    """Cards of the models shipped under Resources/Models/, sorted by name."""
    root = bundled_models_dir()
    return [read_card(d) for d in sorted(root.iterdir()) if (d / CARD_FILE).is_file()]


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A bundle folder from a bundled model's name or a folder path (None: the default model)."""
    model = DEFAULT_MODEL if model is None else model
    as_path = Path(model).expanduser()
    if as_path.is_dir():
        return as_path
    candidate = bundled_models_dir() / str(model)
    if (candidate / CARD_FILE).is_file():
        return candidate
    names = ", ".join(card.name for card in list_bundled_models()) or "none"
    raise AutoDDPMError(
        f"unknown model '{model}': give a bundled model name ({names}) or a folder with {CARD_FILE} and {WEIGHTS_FILE}"
    )


def _scheduler_problems(scheduler: dict) -> list[str]:
    """What is wrong with a card's noise schedule (the network only makes sense under the one it learnt)."""
    problems = []
    steps = scheduler.get("num_train_timesteps")
    if not isinstance(steps, int) or steps < 2:
        problems.append("scheduler.num_train_timesteps missing or not an integer above 1")
    betas = [scheduler.get(key, default) for key, default in (("beta_start", 1e-4), ("beta_end", 2e-2))]
    if not all(isinstance(b, (int, float)) for b in betas) or not 0 < betas[0] <= betas[1] < 1:
        problems.append("scheduler.beta_start and beta_end should be numbers with 0 < beta_start <= beta_end < 1")
    top = scheduler.get("max_timestep", 0)
    if not isinstance(top, int) or top < 0 or (isinstance(steps, int) and top >= steps):
        problems.append("scheduler.max_timestep should be an integer below num_train_timesteps")
    if scheduler.get("prediction", "epsilon") != "epsilon":
        problems.append(f"scheduler.prediction is '{scheduler['prediction']}', but this engine runs epsilon-prediction networks only")
    return problems


def read_card(folder: str | os.PathLike) -> ModelCard:
    """Read and validate ``folder/model.json``."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise AutoDDPMError(f"{folder} is not a model bundle: it has no {CARD_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AutoDDPMError(f"model card {path} is not valid JSON ({exc}); restore it from the original bundle") from None
    problems = [f"'{key}' missing" for key in _REQUIRED if key not in data]
    problems += [
        f"'{key}' should be a {kind.__name__}"
        for key, kind in _REQUIRED.items()
        if key in data and not isinstance(data[key], kind)
    ]
    if not problems and data["format"] != CARD_FORMAT:
        problems.append(f"format is '{data['format']}', expected '{CARD_FORMAT}'")
    if not problems:
        per_schedule = data["thresholds"].get("schedules", {})
        if not isinstance(per_schedule, dict):
            problems.append("thresholds.schedules should be a dict")
            per_schedule = {}
        for where, thresholds in [("thresholds", data["thresholds"])] + [
                (f"thresholds.schedules.{name}", entry) for name, entry in per_schedule.items()]:
            for key in ("mask_tau", "anomaly"):
                if not isinstance(thresholds, dict) or not isinstance(thresholds.get(key), (int, float)):
                    problems.append(f"{where}.{key} missing or not a number")
        problems += _scheduler_problems(data["scheduler"])
        covers = data.get("covers", {})
        if not (isinstance(covers, dict) and all(isinstance(v, bool) for v in covers.values())):
            problems.append('covers should map kinds of input to true or false, e.g. {"skull_stripped": false}')
        if not isinstance(data["unet"].get("image_size"), int):
            problems.append("unet.image_size missing or not an integer")
        elif "lpips_image_size" in data and not (isinstance(data["lpips_image_size"], int)
                                                 and data["lpips_image_size"] >= data["unet"]["image_size"]):
            problems.append("lpips_image_size should be an integer no smaller than unet.image_size")
    if problems:
        raise AutoDDPMError(f"model card {path} is invalid: {'; '.join(problems)}; restore it from the original bundle")
    return ModelCard(path=path, data=data)


def new_card(
    name: str,
    modality: str,
    unet: "UNetConfig",
    *,
    max_timestep: int = 499,
    percentiles: tuple[float, float] = (0.5, 99.5),
    min_foreground_fraction: float = 0.05,
    license: str = "see the training data's license",
    description: str = "",
    valid_for: str = "axial slices",
    slice_levels: str = "all",
    covers: dict[str, bool] | None = None,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A card for freshly trained weights; its thresholds are placeholders until calibration."""
    return {
        "format": CARD_FORMAT,
        "name": name,
        "description": description,
        "modality": modality,
        "valid_for": valid_for,
        # "all": any axial slice of a brain volume; "mid-axial": the one slice level the model was trained on.
        "slice_levels": slice_levels,
        # What valid_for says, for programs: {"skull_stripped": false} makes `autoddpm run` warn on a
        # skull-stripped input (models.fit_checks); a kind of input not named here was not recorded.
        "covers": covers or {},
        "license": license,
        "unet": unet.to_dict(),
        "scheduler": {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 2e-2,
                      "prediction": "epsilon", "max_timestep": max_timestep},
        "preprocessing": {"orientation": "axial", "intensity_percentiles": list(percentiles),
                          "min_foreground_fraction": min_foreground_fraction},
        # The reference's tau and a provisional anomaly threshold until `autoddpm calibrate` measures both.
        "thresholds": {"mask_tau": 0.13, "anomaly": 0.1, "calibrated": False},
        "lpips_backbone": "alex",
        "schedules": {name: schedule.to_dict() for name, schedule in SCHEDULES.items()},
        "training": training or {},
    }


def write_card(folder: str | os.PathLike, data: dict[str, Any]) -> ModelCard:
    """Validate and write a card (atomically: a reader never sees half a file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CARD_FILE)
    return read_card(folder)


def load_unet(card: ModelCard, device: "str | torch.device" = "cpu") -> "UNet":
    """Build the card's network and load ``model.safetensors`` into it (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..diffusion.unet import UNet, UNetConfig

    try:
        network = UNet(UNetConfig.from_dict(card.data["unet"]))
    except (TypeError, ValueError) as exc:
        raise AutoDDPMError(f"model card {card.path} has an invalid 'unet' section ({exc})") from None
    weights = card.path.parent / WEIGHTS_FILE
    if not weights.is_file():
        raise AutoDDPMError(f"model bundle {card.path.parent} has no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AutoDDPMError(f"weights {weights} are corrupt ({exc}); restore the file from the original bundle") from None
    try:
        network.load_state_dict(widened(state))
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        raise AutoDDPMError(
            f"weights {weights} do not fit the network of its card ({str(exc).splitlines()[0]}); "
            "the card and weights belong to different models"
        ) from None
    return network.to(device).eval().requires_grad_(False)


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, atomically: a reader never sees a half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_unet(network: "UNet", folder: str | os.PathLike) -> None:
    """Write the network's weights as ``model.safetensors`` (atomically), in half precision.

    Shipped weights are stored as float16 and widened to float32 when loaded
    (:func:`widened`): it halves the extension's download and keeps a shallow
    clone inside the Extensions Index's size limit, while the anomaly maps move
    by less than 1e-4 and the masks not at all (measured in docs/DESIGN.md).
    Training checkpoints keep full precision.
    """
    save_tensors(Path(folder) / WEIGHTS_FILE, halved(network.state_dict()))


def halved(state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """``state`` with its float32 tensors stored as float16."""
    import torch

    return {name: t.half() if t.dtype == torch.float32 else t for name, t in state.items()}


def widened(state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """``state`` with its float16 tensors widened to float32, the precision the networks compute in."""
    import torch

    return {name: t.float() if t.dtype == torch.float16 else t for name, t in state.items()}
