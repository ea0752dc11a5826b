"""What a model card says of its own validation (recorded by benchmark.validation_record)."""

from __future__ import annotations

from .bundle import ModelCard

METHOD = "AutoDDPM fast"  # the schedule `autoddpm run` and the Slicer module use by default


def validation_headline(card: ModelCard, postprocess: str = "card") -> str:
    """One line for `autoddpm models`: what `autoddpm run --postprocess postprocess` achieved on whole validation
    volumes where the card records it (``validation_volumes``, ``validation_volumes_deepbet``), else, for the
    card's own post-processing, calibrated Dice and AUPRC on the first dataset of its slice benchmark."""
    volumes = card.data.get("validation_volumes" if postprocess == "card" else f"validation_volumes_{postprocess}")
    if isinstance(volumes, dict) and volumes.get("dice") is not None:
        return (f"{volumes['patients']} whole volumes: Dice {volumes['dice']:.3f}, AUPRC {volumes['auprc']:.3f}, "
                f"tumour found in {volumes['found']}/{volumes['patients']} (patient Dice > {volumes['found_dice']:g})")
    if postprocess != "card":
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
