"""Which departures from the pseudo-healthy image are anomalous.

The paper's map counts |x - x_ph| both ways; in FLAIR and T2 lesions are
hyperintense, so a darker pseudo-healthy voxel is all that counts there
(``bright``), and a model card can say so. Plain tensor arithmetic, no torch
import: the command line reads the choices without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Which departures from the pseudo-healthy image count as anomalous: the paper's
# |x - x_ph| (both), or only brighter (FLAIR, T2: lesions are hyperintense) or darker.
POLARITIES = ("both", "bright", "dark")


def deviation(x: torch.Tensor, x_ph: torch.Tensor, polarity: str = "both") -> torch.Tensor:
    """How far ``x`` departs from ``x_ph`` in the direction ``polarity`` counts (zero in the other)."""
    if polarity == "bright":
        return (x - x_ph).clamp(min=0)
    if polarity == "dark":
        return (x_ph - x).clamp(min=0)
    if polarity == "both":
        return (x - x_ph).abs()
    raise ValueError(f"unknown polarity '{polarity}': choose one of {', '.join(POLARITIES)}")
