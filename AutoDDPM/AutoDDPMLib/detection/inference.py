"""AutoDDPM on whole volumes: any size, spacing and orientation in, the same geometry out.

A volume is cut into canonical axial slices, each normalised and resampled to
the model grid exactly as during training, processed in batches by the
pipeline, and mapped back. Outside the re-sampled region the pseudo-healthy
volume is the input voxel for voxel.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from ..diffusion.devices import is_out_of_memory, select_device
from ..diffusion.lpips import load_lpips
from ..diffusion.pipeline import AutoDDPMOutput, AutoDDPMPipeline
from ..diffusion.sampling_schedules import DEFAULT_SCHEDULE
from ..errors import AutoDDPMError
from ..models.bundle import read_card, resolve_model
from ..models.fit_checks import constant_background_share, fit_warnings, looks_skull_stripped
from ..models.networks import load_network
from ..volumes.brain_extraction import deepbet_network_files
from ..volumes.slices import FOREGROUND_LEVEL, AxialStack, denormalize, has_signal, intensity_window, normalize, to_model_grid
from .map_filters import anomaly_mask, postprocess_map
from .postprocessing import PostProcessing, for_skull_stripped_input, option_settings, stripped_input_threshold

# Called with (fraction done in [0, 1], stage name).
VolumeProgress = Callable[[float, str], None]

# More flagged tissue than this almost always means the input does not fit the model.
SUSPICIOUS_ANOMALY_FRACTION = 0.2

# Repeat r of a run draws its noise from seed + r * REPEAT_SEED_STRIDE (+ the batch index): far
# from the seeds of the batches of any other repeat, and repeat 0 is the single run with that seed.
REPEAT_SEED_STRIDE = 1_000_003


@dataclass
class VolumeResult:
    """The output volumes, in the input's geometry, and what it took to make them.

    ``spread`` (runs with repeats only) is the per-voxel standard deviation of the
    anomaly map (before post-processing) over the repeats: where it is high,
    another seed would draw another map. The other outputs are the repeats' mean.
    """

    pseudo_healthy: sitk.Image
    anomaly_map: sitk.Image
    mask: sitk.Image
    slices: int
    slices_with_signal: int
    evaluations_per_slice: int
    seconds: float
    anomalous_voxels: int
    anomalous_volume_ml: float
    threshold: float  # on the anomaly map, as the mask was made
    warnings: list[str] = field(default_factory=list)
    spread: sitk.Image | None = None
    repeats: int = 1
    brain_region: sitk.Image | None = None  # where the map was searched (post-processing with a brain region only)
    postprocessing: str = "none (the paper's raw map)"
    postprocessing_settings: dict = field(default_factory=dict)  # PostProcessing.to_dict() of the above
    skull_stripped: bool = False  # whether the input was taken for a skull-stripped one (told or seen)


class AutoDDPM:
    """A loaded model bundle, ready to run AutoDDPM on slices or volumes.

    ``threshold`` (on the anomaly map) and ``mask_threshold`` (tau, on the
    likelihood map) default to the model card's calibrated values. ``postprocess``
    is ``card`` (the card's post-processing: polarity, brain region, 3D median,
    small components; see detection.map_filters), ``deepbet`` (the same with
    deepbet's brain mask as the region; ``pip install --no-deps deepbet==1.0.2``)
    or ``none`` (the paper's raw map, with its own calibrated threshold). ``backend``
    runs the network with ``torch``, ``onnxruntime`` (CPU only, ``pip install
    "autoddpm[onnx]"``) or, by default, ``auto``: ONNX Runtime where it can run,
    else torch. ``backend_name`` says which runs and ``backend_note`` why torch
    runs under ``auto`` (None otherwise).

    ``skull_stripped`` says whether inputs are skull-stripped (None: each volume
    is looked at; see models.fit_checks). A stripped input's map is thresholded
    with the card's threshold for stripped inputs, calibrated on validation
    volumes stripped the same way (``autoddpm calibrate --with-stripped``), where
    the card has one and no ``threshold`` is given; ``threshold`` and
    ``postprocessing`` are those of inputs with skull, and each VolumeResult
    says which were used.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        schedule: str = DEFAULT_SCHEDULE,
        device: str = "auto",
        seed: int = 0,
        batch_size: int | None = None,
        threshold: float | None = None,
        mask_threshold: float | None = None,
        backend: str = "auto",
        postprocess: str = "card",
        skull_stripped: bool | None = None,
    ) -> None:
        self.card = read_card(resolve_model(model))
        settings = option_settings(postprocess, self.card.postprocessing)
        self.postprocessing = PostProcessing.from_dict(settings)
        self.skull_stripped = skull_stripped
        if self.postprocessing.brain_region == "deepbet":
            deepbet_network_files()  # missing or other networks: say so now, not after the first volume
        self.schedule_name = schedule
        self.device = select_device(device)
        self.seed = seed
        self.batch_size = batch_size or (64 if self.device.type == "cuda" else 16)
        if self.batch_size < 1:
            raise AutoDDPMError("--batch-size must be at least 1")
        tau, _, calibrated = self.card.thresholds_for(schedule)
        self.threshold_warning = None
        if not calibrated and (threshold is None or mask_threshold is None):
            self.threshold_warning = (
                f"model {self.card.name} has no thresholds calibrated for the {schedule} schedule, so its mask and "
                f"anomaly threshold are not what its card promises; run `autoddpm calibrate MODEL_DIR --schedule {schedule} "
                "--data HEALTHY_DATA` or give --threshold")
        if (settings and self.card.postprocessed_threshold(schedule, settings) is None and threshold is None
                and self.threshold_warning is None):
            with_deepbet = " --with-deepbet" if self.postprocessing.brain_region == "deepbet" else ""
            self.threshold_warning = (
                f"model {self.card.name} has no threshold calibrated for its post-processed map "
                f"({self.postprocessing.describe()}) with the {schedule} schedule, so the mask uses the raw map's; run "
                f"`autoddpm calibrate MODEL_DIR --schedule {schedule} --data VOLUMES_WITH_MASKS{with_deepbet}`, give "
                "--threshold, or run with --postprocess none")
        self.threshold = self.card.run_threshold(schedule, settings) if threshold is None else threshold
        # (post-processing, threshold) for skull-stripped inputs, or None where they are thresholded as the others.
        stripped_threshold = stripped_input_threshold(self.card, schedule, settings)
        self.stripped_input = (None if threshold is not None or stripped_threshold is None
                               else (PostProcessing.from_dict(for_skull_stripped_input(settings)), stripped_threshold))
        if skull_stripped and threshold is None and self.stripped_input is None:
            raise AutoDDPMError(
                f"model {self.card.name} has no threshold calibrated for skull-stripped inputs with --postprocess "
                f"{postprocess} and the {schedule} schedule; run `autoddpm calibrate MODEL_DIR --schedule {schedule} "
                "--data VOLUMES_WITH_MASKS --with-stripped`, give --threshold, or leave out --skull-stripped")
        unet, self.backend_name, self.backend_note = load_network(self.card, self.device, backend)
        self.pipeline = AutoDDPMPipeline(
            unet,
            self.card.noise_scheduler(),
            load_lpips(self.device),
            tau if mask_threshold is None else mask_threshold,
            self.card.schedule(schedule),
            lpips_size=self.card.lpips_image_size,
            polarity=self.postprocessing.polarity,
        )

    @property
    def evaluations_per_slice(self) -> int:
        return self.pipeline.schedule.evaluations

    def _fall_back_to_cpu(self) -> None:
        # Only a GPU runs out of memory, and only the torch backend runs there: the network is a module.
        self.device = torch.device("cpu")
        self.pipeline.unet = self.pipeline.unet.to(self.device, memory_format=torch.channels_last)
        self.pipeline.lpips = load_lpips(self.device)

    def process_slices(self, x: torch.Tensor, progress: VolumeProgress | None = None, repeat: int = 0) -> AutoDDPMOutput:
        """AutoDDPM on model-grid slices [B, 1, N, N] in [0, 1], in batches.

        Batch ``i`` draws its noise from seed ``seed + i`` (plus ``repeat *
        REPEAT_SEED_STRIDE``): the same seed and batch size give the same result,
        bit for bit on the CPU. On running out of GPU memory the batch is halved,
        and at one slice the run moves to the CPU.
        """
        schedule = self.pipeline.schedule
        outputs: list[AutoDDPMOutput] = []
        start = batch_index = 0
        while start < len(x):
            batch = x[start : start + self.batch_size]

            def report(done: int, total: int, start: int = start, size: int = len(batch)) -> None:
                if progress is not None:
                    stage = "mask" if done <= schedule.coarse_steps else "resample"
                    progress((start + size * done / total) / len(x), stage)

            generator = torch.Generator().manual_seed(self.seed + repeat * REPEAT_SEED_STRIDE + batch_index)
            try:
                outputs.append(self.pipeline(batch.to(self.device), generator, report))
            except RuntimeError as error:
                if not is_out_of_memory(error) or self.device.type == "cpu":
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.batch_size > 1:
                    self.batch_size //= 2
                else:
                    self._fall_back_to_cpu()
                continue
            start += len(batch)
            batch_index += 1
        return AutoDDPMOutput(
            **{name: torch.cat([getattr(o, name).cpu() for o in outputs])
               for name in ("pseudo_healthy", "anomaly_map", "likelihood_map", "mask", "reconstruction")},
            evaluations=schedule.evaluations,
        )

    def process_volume(self, image: sitk.Image, progress: VolumeProgress | None = None, name: str = "",
                       repeats: int = 1) -> VolumeResult:
        """AutoDDPM on every axial slice with signal; outputs in the input's exact geometry.

        ``name`` (a file or node name) is only read for what it says about the input's contrast.
        ``repeats`` > 1 runs the whole pipeline that many times with different seeds
        (that many times the time): the pseudo-healthy volume and the anomaly map are
        the mean over the runs (the map post-processed and thresholded after
        averaging), and their spread, the per-voxel standard deviation of the maps
        before post-processing, is added to the result.
        """
        if repeats < 1:
            raise AutoDDPMError("--repeats must be at least 1")
        started = time.perf_counter()
        stack = AxialStack.from_image(image)
        rows, cols = stack.array.shape[1:]
        size = self.card.image_size
        if max(rows, cols) < size:
            raise AutoDDPMError(
                f"the slices are {rows} x {cols} pixels, smaller than the model grid of {size} x {size}; "
                "this model needs larger images"
            )
        window = intensity_window(stack.array, self.card.intensity_percentiles)
        slices01 = normalize(stack.array, window)
        with_signal = np.array([has_signal(s, self.card.min_foreground_fraction) for s in slices01], dtype=bool)
        if not with_signal.any():
            raise AutoDDPMError("no slice of the volume has enough signal to process; check that this is a brain MRI")
        grid, transform = to_model_grid(slices01[with_signal], stack.pixel_spacing, size)

        runs = []
        for repeat in range(repeats):
            def report(fraction: float, stage: str, repeat: int = repeat) -> None:
                if progress is not None:
                    progress((repeat + fraction) / repeats, stage)

            runs.append(self.process_slices(grid, report, repeat))

        def pseudo_healthy_of(run: AutoDDPMOutput) -> np.ndarray:
            # The input voxel for voxel, but where the run re-sampled.
            resampled = transform.from_model_grid(run.mask) > 0
            volume = stack.array.copy()
            kept = volume[with_signal]
            kept[resampled] = denormalize(transform.from_model_grid(run.pseudo_healthy), window)[resampled]
            volume[with_signal] = kept
            return volume

        raw_maps = [self.raw_anomaly_in_volume(run.anomaly_map, transform, with_signal, slices01) for run in runs]
        pseudo_healthy = pseudo_healthy_of(runs[0])
        raw_map, spread = raw_maps[0], None
        if repeats > 1:  # the outputs are the mean over the runs, their spread the standard deviation of the maps
            pseudo_healthy = np.mean([pseudo_healthy] + [pseudo_healthy_of(run) for run in runs[1:]], axis=0)
            raw_map, spread = np.mean(raw_maps, axis=0), np.std(raw_maps, axis=0)
        # Is the input skull-stripped? Looked at only where it changes the threshold or earns a warning.
        stripped_share = None
        if self.skull_stripped is None and (self.stripped_input or self.card.covers.get("skull_stripped") is False):
            stripped_share = constant_background_share(stack.array[with_signal], slices01[with_signal])
        stripped = looks_skull_stripped(stripped_share) if self.skull_stripped is None else self.skull_stripped
        postprocessing, threshold = self.stripped_input if stripped and self.stripped_input else (self.postprocessing, self.threshold)
        anomaly, brain = postprocess_map(raw_map, slices01, stack.spacing, postprocessing, stack.array)
        mask = anomaly_mask(anomaly, threshold, stack.spacing, postprocessing).astype(np.uint8)

        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        flagged = int(mask.sum())
        tissue = slices01 > FOREGROUND_LEVEL
        flagged_tissue = float(mask[tissue].mean()) if tissue.any() else 0.0
        warnings = fit_warnings(self.card, name, int(with_signal.sum()), stripped_share, postprocessing.skull_stripped_input)
        if self.threshold_warning:
            warnings.append(self.threshold_warning)
        if flagged_tissue > SUSPICIOUS_ANOMALY_FRACTION:
            warnings.append(
                f"{100 * flagged_tissue:.0f}% of the tissue was flagged as anomalous; this usually means the "
                f"input does not fit model {self.card.name} ({self.card.data['modality']}, "
                f"{self.card.data.get('valid_for', 'axial slices')})"
            )
        return VolumeResult(
            pseudo_healthy=stack.to_image(pseudo_healthy.astype(np.float32)),
            anomaly_map=stack.to_image(anomaly.astype(np.float32)),
            mask=stack.to_image(mask),
            slices=len(slices01),
            slices_with_signal=int(with_signal.sum()),
            evaluations_per_slice=self.evaluations_per_slice,
            seconds=time.perf_counter() - started,
            anomalous_voxels=flagged,
            anomalous_volume_ml=flagged * voxel_ml,
            threshold=threshold,
            warnings=warnings,
            spread=None if spread is None else stack.to_image(spread.astype(np.float32)),
            repeats=repeats,
            brain_region=None if brain is None else stack.to_image(brain.astype(np.uint8)),
            postprocessing=postprocessing.describe(),
            postprocessing_settings=postprocessing.to_dict(),
            skull_stripped=bool(stripped),
        )

    @staticmethod
    def raw_anomaly_in_volume(grid_map: torch.Tensor, transform, with_signal: np.ndarray, slices01: np.ndarray) -> np.ndarray:
        """The pipeline's map on the model grid in the volume's canonical slices (zero on slices without signal),
        before post-processing."""
        anomaly = np.zeros_like(slices01)
        anomaly[with_signal] = np.clip(transform.from_model_grid(grid_map), 0, None)
        return anomaly
