"""Calibrate a model's two thresholds on healthy slices it has not been trained on.

- tau (on the likelihood map M) is the reference's rule: at most 5 % of
  healthy tissue pixels are marked for re-sampling.
- The anomaly threshold (on the final map A) makes the output mask: at most
  ``healthy_fpr`` (1 % by default) of healthy tissue pixels are flagged.
- When the card post-processes its map (detection.map_filters), the threshold on
  the post-processed map follows the same rule on whole volumes run as ``autoddpm
  run`` runs them (training.volume_calibration): a lesion's surroundings are left
  out, its mask is only used to stay away from it.

Both come from the schedule users run by default (``fast``), so what the card
promises is what ``autoddpm run`` does. No lesion is ever looked at.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import torch

from ..detection.inference import AutoDDPM
from ..detection.map_filters import postprocess_map
from ..detection.postprocessing import PostProcessing, for_skull_stripped_input, option_settings
from ..diffusion.pipeline import AutoDDPMPipeline
from ..diffusion.sampling_schedules import DEFAULT_SCHEDULE
from ..errors import AutoDDPMError
from ..models.bundle import ModelCard, read_card, write_card
from ..provenance import command_line
from ..volumes.brain_extraction import deepbet_network_files
from ..volumes.head_region import strip_erosion_mm
from ..volumes.slices import FOREGROUND_LEVEL, AxialStack
from .training_data import find_training_images, load_healthy_slices
from .volume_calibration import HEALTHY_MARGIN_MM, LabelledVolume, calibrate_volume_threshold


def _quantile(values: torch.Tensor, q: float) -> float:
    # torch.quantile refuses very large inputs; a sort is exact and cheap enough here.
    ordered = values.flatten().sort().values
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def healthy_calibration_slices(data: list[str | os.PathLike], card: ModelCard, max_slices: int) -> torch.Tensor:
    """The healthy slices of ``data`` on ``card``'s grid, at most ``max_slices`` spread evenly over patients and levels."""
    slices = load_healthy_slices(data, card.image_size, card.intensity_percentiles, card.min_foreground_fraction)
    if len(slices) > max_slices:
        slices = slices[torch.linspace(0, len(slices) - 1, max_slices).round().long()]
    return slices


def coarse_likelihood(
    pipeline: AutoDDPMPipeline,
    batches: list[torch.Tensor],
    generator: torch.Generator,
    report: Callable[[int, str], None] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step 1 on batches of healthy slices: their coarse reconstructions, and the likelihood map M of all of them."""
    schedule = pipeline.schedule
    reconstructions, likelihoods = [], []
    for i, batch in enumerate(batches):
        reconstructions.append(pipeline.reconstruct(batch, schedule.coarse_start, schedule.coarse_steps, generator))
        likelihoods.append(pipeline.likelihood_map(batch, reconstructions[-1]).cpu())
        if report is not None:
            report(i + 1, "coarse reconstruction")
    return reconstructions, torch.cat(likelihoods)


def healthy_tau(likelihood: torch.Tensor, tissue: torch.Tensor, mask_fraction: float) -> float:
    """tau: flags ``mask_fraction`` of the healthy tissue pixels of the likelihood map M for re-sampling."""
    return _quantile(likelihood[tissue], 1 - mask_fraction)


def healthy_thresholds(
    pipeline: AutoDDPMPipeline,
    slices: torch.Tensor,
    mask_fraction: float,
    healthy_fpr: float,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    progress: Callable[[float, str], None] | None = None,
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(tau, anomaly threshold, M, A) for ``pipeline``'s schedule on healthy ``slices`` [N, 1, S, S].

    tau flags ``mask_fraction`` of their tissue pixels on the likelihood map M, the threshold
    ``healthy_fpr`` of them on the anomaly map A that the pipeline makes with that tau.
    """
    tissue = slices > FOREGROUND_LEVEL
    batches = [batch.to(device) for batch in slices.split(batch_size)]

    def report(done: int, stage: str) -> None:
        if progress is not None:
            progress(done / (2 * len(batches)), stage)

    # tau depends only on the coarse reconstruction (step 1), which does not depend on tau:
    # reconstruct once, choose tau, then stitch and re-sample those same reconstructions.
    reconstructions, likelihood = coarse_likelihood(pipeline, batches, generator, report)
    tau = healthy_tau(likelihood, tissue, mask_fraction)

    pipeline.mask_threshold = tau
    anomalies = []
    for i, (batch, reconstruction) in enumerate(zip(batches, reconstructions)):
        anomalies.append(pipeline(batch, generator, reconstruction=reconstruction).anomaly_map.cpu())
        report(len(batches) + i + 1, "stitch and re-sample")
    anomaly = torch.cat(anomalies)
    return tau, _quantile(anomaly[tissue], 1 - healthy_fpr), likelihood, anomaly


def postprocessed_thresholds(
    engine: AutoDDPM,
    data: list[str | os.PathLike],
    healthy_fpr: float,
    options: tuple[str, ...] = ("card",),
    progress: Callable[[float, str], None] | None = None,
    with_stripped: bool = False,
) -> list[dict]:
    """The card entries of the thresholds on the maps post-processed as each ``--postprocess`` option of
    ``options`` says, from the whole volumes of ``data``. Each volume's map is made once, as `autoddpm run`
    makes it before its post-processing, and post-processed for every option as a run does it.
    ``with_stripped``: the same again for the volumes skull-stripped (LabelledVolume), the thresholds
    of skull-stripped inputs (detection.postprocessing ``for_skull_stripped_input``)."""
    pairs = [pair for source in data for pair in find_training_images(source)]
    kinds = (False, True) if with_stripped else (False,)
    made_with, engine.postprocessing = engine.postprocessing, PostProcessing.none()  # the map before post-processing
    raw_maps, volumes = {kind: [] for kind in kinds}, {kind: [] for kind in kinds}
    try:
        for kind in kinds:
            for i, (image_path, mask_path) in enumerate(pairs):
                volumes[kind].append(LabelledVolume(image_path, mask_path, engine.card, skull_stripped=kind))
                raw_maps[kind].append(AxialStack.from_image(engine.process_volume(volumes[kind][-1].image).anomaly_map).array)
                if progress is not None:
                    progress((kind + (i + 1) / len(pairs)) / len(kinds),
                             "maps of skull-stripped volumes" if kind else "maps of whole volumes")
    finally:
        engine.postprocessing = made_with
    entries = []
    for kind in kinds:
        healthy, spacings = [volume.healthy for volume in volumes[kind]], [volume.spacing for volume in volumes[kind]]
        for option in options:
            # As the card states them (ModelCard.postprocessed_threshold compares the two): a card that leaves a
            # step out would otherwise never match the defaults spelled out.
            stated = option_settings(option, engine.card.postprocessing)
            stated = for_skull_stripped_input(stated) if kind else stated
            settings = PostProcessing.from_dict(stated)
            maps = [postprocess_map(raw, volume.slices01, volume.spacing, settings, volume.array)[0]
                    for raw, volume in zip(raw_maps[kind], volumes[kind])]
            threshold, flagged = calibrate_volume_threshold(maps, healthy, spacings, settings, healthy_fpr)
            entries.append({
                "anomaly": threshold,
                "mask_tau": engine.pipeline.mask_threshold,
                "settings": stated,
                "calibration": {
                    "volumes": len(pairs),
                    **({"skull_stripped": f"0 outside the head eroded {strip_erosion_mm(engine.card.postprocessing):g} mm"}
                       if kind else {}),
                    "healthy_voxels": int(sum(int(h.sum()) for h in healthy)),
                    "lesion_margin_mm": HEALTHY_MARGIN_MM,
                    "healthy_fpr": healthy_fpr,
                    "flagged_healthy_voxels": flagged,
                },
            })
    return entries


def calibrate(
    model_dir: str | os.PathLike,
    data: list[str | os.PathLike],
    schedule: str = DEFAULT_SCHEDULE,
    mask_fraction: float = 0.05,
    healthy_fpr: float = 0.01,
    max_slices: int = 256,
    device: str = "auto",
    seed: int = 0,
    progress: Callable[[float, str], None] | None = None,
    backend: str = "auto",
    coarse_start: int | None = None,
    lpips_size: int | None = None,
    resample_start: int | None = None,
    mask_dilation: int | None = None,
    with_deepbet: bool = False,
    with_stripped: bool = False,
) -> dict:
    """Measure tau and the anomaly threshold for ``schedule`` on healthy ``data`` and write them into the card.

    ``coarse_start`` moves the noise level the schedule's coarse reconstruction starts
    from, ``resample_start`` the level its stitch-and-re-sample stage starts from,
    ``mask_dilation`` the square (in model-grid pixels) that dilates the mask step's
    mask, ``lpips_size`` the size slices are resized to for LPIPS in that step (the
    thresholds depend on each); the card gets the settings and their thresholds together.
    A new LPIPS size applies to every schedule: the thresholds of the others then count
    as not calibrated until they are calibrated again. A card with post-processing also
    gets the threshold on its post-processed map, from the whole volumes of ``data``,
    and ``with_deepbet`` adds the threshold for ``--postprocess deepbet`` (the same
    maps, post-processed with deepbet's brain region). ``with_stripped`` adds the
    thresholds of skull-stripped inputs: the same volumes stripped to the card's
    brain region, their maps made and post-processed the same way.
    """
    if not 0 < mask_fraction < 1 or not 0 < healthy_fpr < 1:
        raise AutoDDPMError("--mask-fraction and --healthy-fpr must be between 0 and 1")
    if max_slices < 1:  # no slice would leave the network an empty batch, which fails deep inside it
        raise AutoDDPMError(f"--max-slices must be at least 1 (got {max_slices})")
    card = read_card(model_dir)
    if with_deepbet:
        option_settings("deepbet", card.postprocessing)  # refuses a card without post-processing
        deepbet_network_files()  # and a missing deepbet, before minutes of work
    if with_stripped and PostProcessing.from_dict(card.postprocessing).is_none:
        raise AutoDDPMError("--with-stripped calibrates thresholds on post-processed maps, and this model's card has no "
                            "post-processing; calibrate without it")
    run_schedule = card.schedule(schedule)
    if coarse_start is not None:
        if not run_schedule.coarse_steps - 1 <= coarse_start <= card.max_timestep:
            raise AutoDDPMError(
                f"--coarse-start must be between {run_schedule.coarse_steps - 1} (the '{schedule}' schedule takes "
                f"{run_schedule.coarse_steps} coarse steps) and {card.max_timestep} (the highest level model {card.name} was trained on)")
        run_schedule = dataclasses.replace(run_schedule, coarse_start=coarse_start)
    if resample_start is not None:
        if not run_schedule.resample_steps <= resample_start <= run_schedule.coarse_start:
            raise AutoDDPMError(
                f"--resample-start must be between {run_schedule.resample_steps} (the '{schedule}' schedule takes "
                f"{run_schedule.resample_steps} re-sampling steps) and {run_schedule.coarse_start} (the level its coarse "
                "reconstruction starts from)")
        run_schedule = dataclasses.replace(run_schedule, resample_start=resample_start)
    if mask_dilation is not None:
        if mask_dilation < 1 or mask_dilation % 2 == 0:
            raise AutoDDPMError(f"--mask-dilation must be an odd number of pixels (1, 3, 5, ...), not {mask_dilation}")
        run_schedule = dataclasses.replace(run_schedule, mask_dilation=mask_dilation)
    if lpips_size is not None and lpips_size < card.image_size:
        raise AutoDDPMError(f"--lpips-size must be at least the model grid's {card.image_size} pixels, not {lpips_size}")
    lpips_size = card.lpips_image_size if lpips_size is None else lpips_size
    slices = healthy_calibration_slices(list(data), card, max_slices)
    # The backend `autoddpm run` takes by default too (see AutoDDPM), recorded below.
    engine = AutoDDPM(model_dir, schedule=schedule, device=device, seed=seed, backend=backend)
    engine.pipeline.schedule, engine.pipeline.lpips_size = run_schedule, lpips_size
    tissue = slices > FOREGROUND_LEVEL
    postprocessing = PostProcessing.from_dict(card.postprocessing)

    def stage_progress(start: float, share: float):
        return None if progress is None else lambda fraction, stage: progress(start + share * fraction, stage)

    slice_share = 1.0 if postprocessing.is_none else 0.5
    engine.pipeline.polarity = "both"  # tau and the raw map's threshold are for the paper's map (`--postprocess none`)
    tau, threshold, likelihood, anomaly = healthy_thresholds(
        engine.pipeline, slices, mask_fraction, healthy_fpr, engine.batch_size, engine.device,
        torch.Generator().manual_seed(seed), stage_progress(0.0, slice_share))
    calibrated = {
        "mask_tau": tau,
        "anomaly": threshold,
        "calibrated": True,
        "calibration": {
            "data": [str(d) for d in data],
            "healthy_slices": len(slices),
            "tissue_pixels": int(tissue.sum()),
            "schedule": schedule,
            "mask_fraction": mask_fraction,
            "healthy_fpr": healthy_fpr,
            "lpips_image_size": lpips_size,
            "flagged_by_tau": float((likelihood[tissue] > tau).float().mean()),
            "flagged_by_anomaly_threshold": float((anomaly[tissue] > threshold).float().mean()),
            "seed": seed,
            "backend": engine.backend_name,
            "date": time.strftime("%Y-%m-%d"),
            **({"command": command} if (command := command_line("calibrate")) else {}),
        },
    }
    if not postprocessing.is_none:
        # The pipeline now holds the new tau and the schedule being calibrated; the maps are made as `autoddpm run` makes them.
        engine.pipeline.polarity = postprocessing.polarity
        options = ("card", "deepbet") if with_deepbet else ("card",)
        own, *alternatives = postprocessed_thresholds(engine, list(data), healthy_fpr, options, stage_progress(0.5, 0.5),
                                                      with_stripped)
        calibrated["postprocessed"] = own
        if alternatives:
            calibrated["postprocessed_alternatives"] = alternatives
    # The card's main thresholds are those of the schedule `autoddpm run` uses by default;
    # other schedules keep theirs beside them (see ModelCard.thresholds_for).
    current = card.data["thresholds"]
    if schedule == DEFAULT_SCHEDULE:
        thresholds = dict(calibrated, **({"schedules": current["schedules"]} if "schedules" in current else {}))
    else:
        thresholds = dict(current, schedules={**current.get("schedules", {}), schedule: calibrated})
    schedules = {**card.data["schedules"], schedule: run_schedule.to_dict()}
    write_card(model_dir, dict(card.data, thresholds=thresholds, schedules=schedules, lpips_image_size=lpips_size))
    return calibrated
