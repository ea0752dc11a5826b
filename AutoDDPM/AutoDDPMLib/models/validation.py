"""What a model card says of its own validation (recorded by benchmark.validation_record)."""

from __future__ import annotations

from .bundle import ModelCard

METHOD = "AutoDDPM fast"  # the schedule `autoddpm run` and the Slicer module use by default


def validation_field(postprocess: str, skull_stripped: bool = False) -> str:
    """The card field of the whole-volume validation of runs with ``--postprocess postprocess`` (on skull-stripped
    volumes, thresholded as such: ``skull_stripped``)."""
    return "validation_volumes" + ("" if postprocess == "card" else f"_{postprocess}") + ("_stripped" if skull_stripped else "")


def validation_headline(card: ModelCard, postprocess: str = "card", skull_stripped: bool = False) -> str:
    """One line for `autoddpm models`: what `autoddpm run --postprocess postprocess` achieved on whole validation
    volumes (skull-stripped ones with ``skull_stripped``) where the card records it (``validation_field``), else, for the
    card's own post-processing, calibrated Dice and AUPRC on the first dataset of its slice benchmark."""
    volumes = card.data.get(validation_field(postprocess, skull_stripped))
    if isinstance(volumes, dict) and volumes.get("dice") is not None:
        return (f"{volumes['patients']} whole volumes: Dice {volumes['dice']:.3f}, AUPRC {volumes['auprc']:.3f}, "
                f"tumour found in {volumes['found']}/{volumes['patients']} (patient Dice > {volumes['found_dice']:g})")
    if postprocess != "card" or skull_stripped:
        return "not recorded"
    validation = card.data.get("validation")
    if not isinstance(validation, dict) or not validation.get("results"):
        return "not recorded"
    dataset, bins = next(iter(validation["results"].items()))
    pooled = bins.get("all", {})
    if pooled.get("dice") is None:
        return "not recorded"
    run = "quick run" if validation.get("quick") else "full run"
    return f"{dataset}: Dice {pooled['dice']:.3f}, AUPRC {pooled['auprc']:.3f} ({run}, {pooled['slices']} slices)"
