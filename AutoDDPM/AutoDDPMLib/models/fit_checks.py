"""Does an input fit the model? Warnings a reader should see before trusting the maps.

A diffusion model trained on healthy brains only knows the contrast and the
slice levels it was trained on: given anything else it "heals" healthy anatomy
and reports it as anomalous. Whatever a file name or a card says about the input
is checked here, before the maps are read.
"""

from __future__ import annotations

import re
from typing import Optional

from .bundle import ModelCard

# Words that name a contrast in file names, series descriptions and Slicer node names.
# T2-FLAIR names often carry "t2" too, so FLAIR is looked for first.
_MODALITY_WORDS = (
    ("FLAIR", ("flair", "tirm", "darkfluid")),
    ("T1c", ("t1c", "t1ce", "t1gd", "t1post")),
    ("T1", ("t1", "t1w", "mprage", "spgr")),
    ("T2", ("t2", "t2w")),
    ("PD", ("pd", "pdw")),
    ("DWI", ("dwi", "adc", "dti")),
    ("SWI", ("swi",)),
)

SLICE_LEVELS = ("all", "mid-axial")


def modality_from_name(name: str) -> Optional[str]:
    """The contrast a name announces ("FLAIR", "T1", ...), or None when it names none or several."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    if any("flair" in w for w in words):
        return "FLAIR"
    found = {modality for modality, names in _MODALITY_WORDS for w in words if w in names}
    return found.pop() if len(found) == 1 else None


def fit_warnings(card: ModelCard, input_name: str, slices_with_signal: int) -> list[str]:
    """What is known, before running, to make the model's maps unreliable for this input."""
    warnings = []
    model = f"model {card.name} ({card.data.get('valid_for', card.data['modality'])})"
    announced = modality_from_name(input_name)
    expected = str(card.data["modality"])
    if announced is not None and expected.upper() in {m.upper() for m, _ in _MODALITY_WORDS} \
            and announced.upper() != expected.upper():
        warnings.append(
            f"'{input_name}' looks like a {announced} image but {model} was trained on {expected}: "
            f"expect healthy anatomy to be flagged; pick a {announced} model (autoddpm models) if there is one"
        )
    if card.data.get("slice_levels", "all") == "mid-axial" and slices_with_signal > 1:
        warnings.append(
            f"{model} was trained on one mid-axial slice per subject; {slices_with_signal - 1} of the "
            f"{slices_with_signal} slices of this input are at other levels, where it flags anatomy it has never seen"
        )
    return warnings
