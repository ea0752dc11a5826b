"""Does an input fit the model? Warnings a reader should see before trusting the maps.

A diffusion model trained on healthy brains only knows the contrast and the
slice levels it was trained on: given anything else it "heals" healthy anatomy
and reports it as anomalous. Whatever a file name or a card says about the input
is checked here, before the maps are read, and so is one thing the image itself
shows: whether it was skull-stripped.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional

from .bundle import ModelCard

if TYPE_CHECKING:
    import numpy as np

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

# Above this share of exactly-lowest values just outside the head, an input looks skull-stripped. Air on a
# scanner is noise; a stripping pipeline sets all it removes to one value, right up to the brain. Measured:
# 0.001-0.115 on 8 LGG FLAIR volumes and 4 IXI T1 slices with skull, 0.47-0.90 on the same stripped to the
# brain region of flair-lgg's post-processing (12 mm).
STRIPPED_BACKGROUND_SHARE = 0.35
# The shell around the head that is looked at, in pixels of the input.
BACKGROUND_SHELL_PIXELS = 2


def modality_from_name(name: str) -> Optional[str]:
    """The contrast a name announces ("FLAIR", "T1", ...), or None when it names none or several."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    if any("flair" in w for w in words):
        return "FLAIR"
    found = {modality for modality, names in _MODALITY_WORDS for w in words if w in names}
    return found.pop() if len(found) == 1 else None


def constant_background_share(volume: "np.ndarray", slices01: "np.ndarray") -> float:
    """The share of a thin shell just outside each slice's head region that is exactly the volume's lowest
    value (``volume``: the input's intensities, ``slices01``: the same slices normalised)."""
    # Imported here: the command line reads this module for its option choices, without numpy or scipy.
    import numpy as np
    from scipy import ndimage

    from ..volumes.head_region import head_region

    head = head_region(slices01)
    shell = np.stack([ndimage.binary_dilation(h, iterations=BACKGROUND_SHELL_PIXELS) & ~h for h in head])
    return float((volume[shell] == volume.min()).mean()) if shell.any() else 0.0


def looks_skull_stripped(background_share: Optional[float]) -> bool:
    """Whether an input with this ``constant_background_share`` looks skull-stripped (None: not looked at)."""
    return background_share is not None and background_share > STRIPPED_BACKGROUND_SHARE


def fit_warnings(card: ModelCard, input_name: str, slices_with_signal: int,
                 background_share: Optional[float] = None, stripped_threshold_used: bool = False) -> list[str]:
    """What is known, before running, to make the model's maps unreliable for this input. With the
    ``constant_background_share`` of its slices with signal, also whether it looks skull-stripped where the
    card says the model does not cover that (``stripped_threshold_used``: and the card's threshold for
    stripped inputs was used)."""
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
    if card.covers.get("skull_stripped") is False and looks_skull_stripped(background_share):
        looks = (f"'{input_name or 'the input'}' looks skull-stripped ({100 * background_share:.0f}% of the background "
                 f"around the head is exactly one value, as a stripping pipeline leaves it) but {model} does not cover "
                 "skull-stripped scans")
        if stripped_threshold_used:
            warnings.append(f"{looks}: its threshold for skull-stripped inputs was used (calibrated on validation "
                            "volumes stripped the same way); expect fewer tumours found than on scans with skull, "
                            "and give the scan with skull if there is one")
        else:
            warnings.append(f"{looks}: expect the brain's edge to be flagged; give the scan with skull if there is one")
    return warnings
