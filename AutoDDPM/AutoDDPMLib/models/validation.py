"""What a model card says of its own validation (recorded by benchmark.validation_record)."""

from __future__ import annotations

from .bundle import ModelCard

METHOD = "AutoDDPM fast"  # the schedule `autoddpm run` and the Slicer module use by default


def validation_headline(card: ModelCard) -> str:
    """One line for `autoddpm models`: calibrated Dice and AUPRC on the card's first validation dataset."""
    validation = card.data.get("validation")
    if not isinstance(validation, dict) or not validation.get("results"):
        return "not recorded"
    dataset, bins = next(iter(validation["results"].items()))
    pooled = bins.get("all", {})
    if pooled.get("dice") is None:
        return "not recorded"
    run = "quick run" if validation.get("quick") else "full run"
    return f"{dataset}: Dice {pooled['dice']:.3f}, AUPRC {pooled['auprc']:.3f} ({run}, {pooled['slices']} slices)"
