"""How well a model did on its validation data, recorded in its card from a benchmark run.

The card's ``validation`` field holds the default schedule's results of one
``autoddpm benchmark`` run (pooled Dice at the card's calibrated threshold and at
the oracle threshold, AUPRC, false positives on lesion-free slices, healthy-tissue
MAE, per dataset and lesion-size bin) with the command and commit that made them,
so that a card never states a number no command produced. A run is only accepted
if it was made with the thresholds the card holds now.

The card's ``validation_volumes`` field holds what users get from ``autoddpm run``:
one ``autoddpm benchmark-volumes`` run's pooled Dice, AUPRC, median patient Dice
and the share of patients whose tumour was found, at the post-processed map's
calibrated threshold; ``validation_volumes_deepbet`` the same for ``--postprocess deepbet``, and
``validation_volumes_stripped`` / ``validation_volumes_deepbet_stripped`` for skull-stripped validation
volumes thresholded as `autoddpm run` thresholds stripped inputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..detection.postprocessing import PostProcessing, for_skull_stripped_input, option_settings
from ..errors import AutoDDPMError
from ..models.bundle import ModelCard, read_card, write_card
from ..models.validation import METHOD, validation_field
from .report import read_run


def _made_by(meta: dict, source: str) -> dict[str, Any]:
    """Where a recorded run is and what made it: its folder, command, commit and date."""
    return {"benchmark": source, "command": meta.get("command"), "commit": meta.get("commit"), "date": meta.get("date")}


def validation_summary(results: list[dict], meta: dict, source: str) -> dict[str, Any]:
    """The card's ``validation`` entry for one benchmark run (its results.json rows and meta.json)."""
    by_dataset: dict[str, dict[str, dict]] = {}
    for row in results:
        if row["method"] != METHOD or "[" in row["dataset"]:  # "[reference subset]" rows repeat a subset
            continue
        entry = by_dataset.setdefault(row["dataset"], {}).setdefault(row["size_bin"], {"slices": row["n_slices"]})
        if row["threshold_kind"] == "oracle":
            entry["dice_oracle"] = row["dice"]
        else:
            entry.update(dice=row["dice"], auprc=row["auprc"], threshold=row["threshold"],
                         fpr_pixels=row["fpr_pixels"], mae_healthy=row["mae_healthy"], mae_lesion=row["mae_lesion"])
    if not by_dataset:
        raise AutoDDPMError(f"{source} has no '{METHOD}' rows: it is not a benchmark of this model's default schedule")
    return {
        **_made_by(meta, source),
        "device": meta.get("device"),
        "quick": meta.get("quick"),
        "datasets": meta.get("datasets"),
        "results": by_dataset,
    }


def _run_of(run_dir: Path, model_dir: str | os.PathLike) -> tuple[list[dict], dict, ModelCard]:
    """A finished run's rows and meta.json, and the card it is to be recorded in; refused when it benchmarks another model."""
    rows, meta = read_run(run_dir)
    card = read_card(model_dir)
    if meta.get("model") != card.name:
        raise AutoDDPMError(f"{run_dir} benchmarks model '{meta.get('model')}', not '{card.name}'")
    return rows, meta, card


def record_validation(run_dir: str | os.PathLike, model_dir: str | os.PathLike) -> ModelCard:
    """Write the benchmark run in ``run_dir`` into the card in ``model_dir`` as its ``validation``."""
    run_dir = Path(run_dir)
    results, meta, card = _run_of(run_dir, model_dir)
    if meta.get("thresholds") != card.data["thresholds"]:
        raise AutoDDPMError(
            f"{run_dir} was made with other thresholds than {card.path} holds now (the model was calibrated again "
            "since): rerun the benchmark before recording it")
    summary = validation_summary(results, meta, str(run_dir))
    return write_card(model_dir, dict(card.data, validation=summary))


def volume_validation_summary(rows: list[dict], meta: dict, source: str) -> dict[str, Any]:
    """The card's ``validation_volumes`` entry for one ``autoddpm benchmark-volumes`` run."""
    row = next((r for r in rows if r["method"] == METHOD), None)
    if row is None:
        raise AutoDDPMError(f"{source} has no '{METHOD}' row: it is not a whole-volume benchmark of this model")
    return {
        **_made_by(meta, source),
        "data": meta.get("data"),
        "schedule": meta.get("schedule"),
        "threshold": row["threshold"],
        "patients": row["patients"],
        "dice": row["dice"],
        "auprc": row["auprc"],
        "patient_dice_median": row["patient_dice_median"],
        "found": row["found"],
        "found_dice": meta.get("found_dice"),
        "healthy_fpr": row["healthy_fpr"],
    }


def record_volume_validation(run_dir: str | os.PathLike, model_dir: str | os.PathLike) -> ModelCard:
    """Write the ``autoddpm benchmark-volumes`` run in ``run_dir`` into the card in ``model_dir``: as its
    ``validation_volumes`` when the run used the card's post-processing, as ``validation_volumes_deepbet`` when
    it used ``--postprocess deepbet``, with ``_stripped`` added when its volumes were skull-stripped ones
    thresholded as such; refused unless the run's post-processing and threshold are the card's now."""
    run_dir = Path(run_dir)
    rows, meta, card = _run_of(run_dir, model_dir)
    summary = volume_validation_summary(rows, meta, str(run_dir))
    run_settings = PostProcessing.from_dict(meta.get("postprocessing"))
    stated = {(option, stripped): for_skull_stripped_input(settings) if stripped else settings
              for option in ("card", "deepbet") for stripped in (False, True)
              if (settings := option_settings(option, card.postprocessing))}
    made_as = next((key for key, settings in stated.items() if run_settings == PostProcessing.from_dict(settings)), None)
    if made_as is None or summary["threshold"] != card.run_threshold(meta.get("schedule"), stated[made_as]):
        raise AutoDDPMError(
            f"{run_dir} was made with other post-processing or thresholds than {card.path} holds now (the model was "
            "calibrated again since): rerun the benchmark before recording it")
    return write_card(model_dir, dict(card.data, **{validation_field(*made_as): summary}))
