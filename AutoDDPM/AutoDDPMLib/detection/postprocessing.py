"""How a model's anomaly map is post-processed: the settings, as a model card holds them.

The steps themselves are in ``map_filters``; ``PostProcessing.none()`` is the
paper's raw map. Imports neither torch nor scipy, so the command line reads it at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ..diffusion.polarity import POLARITIES
from ..errors import AutoDDPMError

# What `autoddpm run --postprocess` may be: the model card's post-processing, or none (the paper's raw map).
POSTPROCESS_CHOICES = ("card", "none")

@dataclass(frozen=True)
class PostProcessing:
    """How the raw map becomes the output map and mask; ``None``/0 switches a step off."""

    polarity: str = "both"
    brain_erosion_mm: Optional[float] = None
    median_mm: Optional[float] = None
    min_component_mm3: float = 0.0

    def __post_init__(self) -> None:
        if self.polarity not in POLARITIES:
            raise AutoDDPMError(f"unknown polarity '{self.polarity}' in the model card: choose one of {', '.join(POLARITIES)}")
        for name in ("brain_erosion_mm", "median_mm", "min_component_mm3"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise AutoDDPMError(f"post-processing {name} must be a distance or volume >= 0, not {value}")

    @classmethod
    def none(cls) -> "PostProcessing":
        """The paper's map: |x - x_ph| * M as the pipeline makes it, thresholded as it is."""
        return cls()

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]]) -> "PostProcessing":
        """The card's ``postprocessing`` entry (missing: none)."""
        if not data:
            return cls.none()
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise AutoDDPMError(f"unknown post-processing settings in the model card: {', '.join(sorted(unknown))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_none(self) -> bool:
        return self == PostProcessing.none()

    def describe(self) -> str:
        """One line for logs and provenance."""
        if self.is_none:
            return "none (the paper's raw map)"
        steps = [f"{self.polarity} deviations"]
        if self.brain_erosion_mm is not None:
            steps.append(f"head region eroded {self.brain_erosion_mm:g} mm")
        if self.median_mm:
            steps.append(f"3D median {self.median_mm:g} mm")
        if self.min_component_mm3:
            steps.append(f"components >= {self.min_component_mm3:g} mm3")
        return ", ".join(steps)
