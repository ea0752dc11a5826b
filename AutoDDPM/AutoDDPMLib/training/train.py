"""Train a healthy-brain DDPM and write it as a model bundle.

The recipe follows the reference (MSE on epsilon, uniform timesteps, small
random affine + horizontal flip, best checkpoint by reconstruction error from
level 200 on held-out healthy slices) with what makes a small network train
well on a CPU: AdamW, EMA weights, and only the noise levels the product uses
(AutoDDPM never goes above 200; the fixed-noise baselines need up to 500).
On request it also simulates other scanners and skull-stripped inputs
(``acquisition_augmentation``).
Checkpoints every few minutes make a run resumable (``--resume``); snapshots of the
EMA weights every so many steps (``--snapshot-steps``) keep the run's checkpoints for
choosing one on the development sets afterwards; under ``torchrun`` it trains with
DistributedDataParallel on all GPUs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from ..diffusion.devices import select_device
from ..diffusion.pipeline import SCHEDULES
from ..diffusion.scheduler import DDPMScheduler, gaussian_noise, strided_levels
from ..diffusion.unet import UNet, UNetConfig
from ..errors import AutoDDPMError
from ..models.bundle import ModelCard, load_unet, new_card, save_tensors, save_unet, write_card
from .acquisition_augmentation import AcquisitionAugmentation, augment_acquisition, strip_regions
from .slice_file import is_slice_file, read_slice_file

CHECKPOINT_DIR = "checkpoint"
SNAPSHOT_DIR = "snapshots"


def snapshot_folder(output: str | os.PathLike, step: int) -> Path:
    """Where a run's snapshot of step ``step`` is: a model bundle of its own (``output/snapshots/step-001000``)."""
    return Path(output) / SNAPSHOT_DIR / f"step-{step:06d}"


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in the checkpoint and the model card."""

    data: list[str]
    name: str = "custom"
    modality: str = "unknown"
    unet: UNetConfig = field(default_factory=UNetConfig)
    max_timestep: int = 500
    steps: int = 20000
    batch_size: int = 16
    learning_rate: float = 2e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    percentiles: tuple[float, float] = (0.5, 99.5)
    min_foreground_fraction: float = 0.05
    validation_slices: int = 32
    validation_data: list[str] = field(default_factory=list)
    checkpoint_minutes: float = 5.0
    # 0: none. Else every this many steps the EMA weights are also kept as a bundle of their own: the
    # validation MSE that picks the run's bundle is a poor guide to detection (RESEARCH_LOG.md), so the
    # checkpoint to ship is chosen on the development sets among these.
    snapshot_steps: int = 0
    max_minutes: float = 0.0  # 0: no limit; otherwise checkpoint and stop after this long
    seed: int = 0
    initialised_from: str = ""
    earlier_training: dict = field(default_factory=dict)  # the start model's card "training", when continued
    valid_for: str = "axial slices"
    slice_levels: str = "all"
    license: str = "see the training data's license"
    description: str = ""
    augmentation: AcquisitionAugmentation = field(default_factory=AcquisitionAugmentation)
    # Whether the model is meant for skull-stripped inputs (the card's covers); None: yes when trained with
    # the skull-strip augmentation, else not recorded (the trainer cannot tell what the data itself is).
    covers_skull_stripped: Optional[bool] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["unet"] = self.unet.to_dict()
        return d

    def covers(self) -> dict:
        """The card's machine-readable ``covers``: what kinds of input the model was made for."""
        skull_stripped = self.covers_skull_stripped
        if skull_stripped is None and self.augmentation.skull_strip > 0:
            skull_stripped = True
        return {} if skull_stripped is None else {"skull_stripped": skull_stripped}


def read_checkpoint_config(output: str | os.PathLike) -> TrainConfig:
    """The configuration of the run whose checkpoint is in ``output`` (for ``--resume``)."""
    state = Path(output) / CHECKPOINT_DIR / "state.json"
    if not state.is_file():
        raise AutoDDPMError(f"--resume: no checkpoint in {state.parent}; start without --resume")
    saved = json.loads(state.read_text())["config"]
    saved["unet"] = UNetConfig.from_dict(saved["unet"])
    saved["percentiles"] = tuple(saved["percentiles"])
    saved["augmentation"] = AcquisitionAugmentation(**saved.get("augmentation", {}))  # none before it existed
    return TrainConfig(**saved)


def steps_in_all(training: dict) -> int:
    """Optimiser steps behind a model card's weights, counting the runs it was continued from."""
    return training.get("steps_in_all", training.get("steps", 0))


def load_training_slices(
    sources: list[str],
    image_size: int,
    percentiles: tuple[float, float],
    min_foreground_fraction: float,
) -> torch.Tensor:
    """Healthy slices on the model grid, [N, 1, size, size], from slice files and image folders alike."""
    parts = []
    for source in sources:
        if is_slice_file(source):
            parts.append(read_slice_file(source, image_size, percentiles, min_foreground_fraction))
        else:
            # Imported here: training from slice files alone needs no SimpleITK (a GPU node without the data stack).
            from .training_data import load_healthy_slices

            parts.append(load_healthy_slices([source], image_size, percentiles, min_foreground_fraction))
    return torch.cat(parts)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The reference's augmentation: rotation +-10 deg, translation +-10 %, scale 0.9..1.1, horizontal flip."""
    b = x.shape[0]
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=generator)  # noqa: E731
    angle = uniform(-10, 10) * math.pi / 180
    scale = uniform(0.9, 1.1)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    # affine_grid maps output to input coordinates in [-1, 1]: 0.2 there is 10 % of the image.
    tx, ty = uniform(-0.2, 0.2), uniform(-0.2, 0.2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Trainer:
    """One training run: data, network, EMA, optimiser, checkpoints, the best bundle."""

    def __init__(self, config: TrainConfig, output: Path, device: str = "auto") -> None:
        self.config = config
        self.output = Path(output)
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if self.world_size > 1:
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        else:
            self.device = select_device(device)
        self.scheduler = DDPMScheduler()
        if config.max_timestep > self.scheduler.num_train_timesteps:
            raise AutoDDPMError(f"--max-timestep must be at most {self.scheduler.num_train_timesteps}")

        grid = config.unet.image_size
        slices = load_training_slices(config.data, grid, config.percentiles, config.min_foreground_fraction)
        generator = torch.Generator().manual_seed(config.seed)
        if config.validation_data:
            self.validation = load_training_slices(
                config.validation_data, grid, config.percentiles, config.min_foreground_fraction
            )[: config.validation_slices]
        else:  # hold a few training slices aside, never more than a quarter of them
            held = max(1, min(config.validation_slices, len(slices) // 4))
            order = torch.randperm(len(slices), generator=generator)
            self.validation = slices[order[:held]]
            slices = slices[order[held:]]
        self.slices = slices.to(self.device)
        # Computed once: the region each slice is stripped to whenever the skull-strip augmentation picks it.
        self.strip_regions = strip_regions(slices, config.augmentation).to(self.device) \
            if config.augmentation.skull_strip else None
        self.validation = self.validation.to(self.device)

        self.network = UNet(config.unet).to(self.device)
        if self.device.type == "cpu":
            # Measured with tools/training_cost.py: 1.1x faster training steps on a CPU at the shipped size.
            self.network = self.network.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.network).requires_grad_(False)
        self.model = self.network
        if self.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=config.learning_rate, weight_decay=0.0)
        # Mixed precision on CUDA only: bfloat16 where the GPU has it, else float16 with loss scaling
        # (float16 gradients underflow without it). On CPUs without bfloat16 units it is ~100x slower.
        self.amp_dtype = None
        if self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.best_validation = math.inf
        self.history: list[dict] = []
        self._stop_requested = False

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Network, EMA and optimiser moments as safetensors, counters as JSON (nothing pickled)."""
        folder = self.output / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"network.{k}": v for k, v in self.network.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = value.reshape(-1) if value.ndim == 0 else value
        save_tensors(folder / "state.safetensors", tensors)
        meta = {"step": self.step, "best_validation": self.best_validation, "history": self.history,
                "config": self.config.to_dict()}
        (folder / "state.json.tmp").write_text(json.dumps(meta, indent=1))
        os.replace(folder / "state.json.tmp", folder / "state.json")

    def initialise_from(self, card: ModelCard) -> None:
        """Start from a trained bundle's weights (fine-tuning on one's own cohort), fresh optimiser."""
        weights = load_unet(card)
        self.network.load_state_dict(weights.state_dict())
        self.ema.load_state_dict(weights.state_dict())
        earlier = card.data.get("training", {})
        self.config.initialised_from = f"{card.name} ({card.path.parent}, {steps_in_all(earlier)} steps)"
        self.config.earlier_training = earlier

    def load_checkpoint(self) -> None:
        folder = self.output / CHECKPOINT_DIR
        if not (folder / "state.json").is_file():
            raise AutoDDPMError(f"--resume: no checkpoint in {folder}; start without --resume")
        meta = json.loads((folder / "state.json").read_text())
        if meta["config"]["unet"] != self.config.unet.to_dict():
            raise AutoDDPMError(f"--resume: the checkpoint in {folder} has a different network; use a new --output")
        tensors = load_file(str(folder / "state.safetensors"))
        self.network.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("network.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        optimizer_state = self.optimizer.state_dict()
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[key] = value.reshape(()) if key == "step" else value
        self.optimizer.load_state_dict(optimizer_state)
        self.step = meta["step"]
        self.best_validation = meta["best_validation"]
        self.history = meta["history"]

    # -- training ------------------------------------------------------------------------------

    def learning_rate(self) -> float:
        return self.config.learning_rate * min(1.0, (self.step + 1) / self.config.warmup_steps)

    def train_step(self, generator: torch.Generator) -> float:
        c = self.config
        index = torch.randint(len(self.slices), (c.batch_size,), generator=generator)
        index = index.to(self.device)
        brains = None if self.strip_regions is None else self.strip_regions[index]
        # The scanner and the pipeline first, then the reference's geometric augmentation (the head's pose).
        x0 = augment(augment_acquisition(self.slices[index], brains, generator, c.augmentation), generator)
        t = torch.randint(c.max_timestep, (c.batch_size,), generator=generator).to(self.device)
        noise = gaussian_noise(x0, generator)
        x_t = self.scheduler.add_noise(x0, noise, t)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = F.mse_loss(self.model(x_t, t).float(), noise)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # The EMA's warm-up counts the steps behind the start weights: a run continued from a trained model
        # averages at the full decay from its first step, as the start model's own EMA did, rather than
        # following the first few hundred steps of the continuation almost one for one.
        steps = self.step + steps_in_all(c.earlier_training)
        decay = min(c.ema_decay, (1 + steps) / (10 + steps))
        with torch.no_grad():
            for ema_p, p in zip(self.ema.parameters(), self.network.parameters()):
                ema_p.lerp_(p, 1 - decay)
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def validate(self) -> float:
        """Reconstruction MSE from level 200 with the fast schedule's strided steps, EMA weights."""
        generator = torch.Generator().manual_seed(1234)
        fast = SCHEDULES["fast"]
        x = self.validation
        x_t = self.scheduler.add_noise(x, gaussian_noise(x, generator), fast.coarse_start)
        levels = strided_levels(fast.coarse_start, fast.coarse_steps)
        for t, s in zip(levels[:-1], levels[1:]):
            eps = self.ema(x_t, torch.full((len(x),), t, device=self.device))
            x_t = self.scheduler.step(eps, t, x_t, s, generator)
        return float(F.mse_loss(x_t.clamp(0, 1), x))

    def write_bundle(self, validation_mse: float, folder: Optional[Path] = None) -> None:
        """The EMA weights and their card in ``folder`` (default: the run's output, its best bundle)."""
        c = self.config
        folder = self.output if folder is None else folder
        save_unet(self.ema, folder)
        write_card(folder, new_card(
            c.name, c.modality, c.unet, max_timestep=c.max_timestep - 1, percentiles=c.percentiles,
            min_foreground_fraction=c.min_foreground_fraction, license=c.license, description=c.description, valid_for=c.valid_for,
            slice_levels=c.slice_levels, covers=c.covers(),
            training={"data": c.data, "slices": len(self.slices), "steps": self.step,
                      "steps_in_all": self.step + steps_in_all(c.earlier_training),
                      "validation_mse_t200": validation_mse, "config": c.to_dict()},
        ))

    def _request_stop(self, *_: object) -> None:
        self._stop_requested = True

    def run(self) -> None:
        c = self.config
        signal.signal(signal.SIGTERM, self._request_stop)
        generator = torch.Generator().manual_seed(c.seed * 1000 + self.rank + self.step)
        started = last_checkpoint = time.monotonic()
        bar = tqdm(total=c.steps, initial=self.step, disable=self.rank != 0, desc=f"training {c.name}")
        while self.step < c.steps:
            loss = self.train_step(generator)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if c.snapshot_steps and self.step % c.snapshot_steps == 0 and self.rank == 0:
                self.write_bundle(self.validate(), snapshot_folder(self.output, self.step))
            now = time.monotonic()
            stop = self._all_agree_to_stop(self._stop_requested or (c.max_minutes > 0 and now - started > 60 * c.max_minutes))
            if now - last_checkpoint > 60 * c.checkpoint_minutes or self.step == c.steps or stop:
                self.checkpoint(loss)
                last_checkpoint = now
            if stop:
                break
        bar.close()
        if self.world_size > 1:
            torch.distributed.destroy_process_group()

    def _all_agree_to_stop(self, stop: bool) -> bool:
        """Under torchrun all processes stop after the same step: one that left early would leave
        the others waiting forever in their next gradient all-reduce."""
        if self.world_size == 1:
            return stop
        flag = torch.tensor([float(stop)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def checkpoint(self, loss: float) -> None:
        if self.rank != 0:
            return
        validation_mse = self.validate()
        self.history.append({"step": self.step, "loss": loss, "validation_mse_t200": validation_mse,
                             "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        if validation_mse < self.best_validation:
            self.best_validation = validation_mse
            self.write_bundle(validation_mse)
        self.save_checkpoint()
        tqdm.write(f"step {self.step}: loss {loss:.4f}, validation MSE(t=200) {validation_mse:.5f}"
                   f" (best {self.best_validation:.5f})")
