"""How a model's anomaly map is post-processed: the settings, as a model card holds them.

The steps themselves are in ``map_filters``; ``PostProcessing.none()`` is the
paper's raw map. Imports neither torch nor scipy, so the command line reads it at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..diffusion.polarity import POLARITIES
from ..errors import AutoDDPMError

if TYPE_CHECKING:
    from ..models.bundle import ModelCard

# What `autoddpm run --postprocess` may be: the model card's post-processing, the same with deepbet's brain
# mask as the brain region (volumes.brain_extraction), or none (the paper's raw map).
POSTPROCESS_CHOICES = ("card", "deepbet", "none")
# What `--skull-stripped` may be, and the engine's ``skull_stripped`` for each (None: each input is looked at).
SKULL_STRIPPED_CHOICES = {"auto": None, "yes": True, "no": False}
# Where the map is searched: the head region eroded by brain_erosion_mm (no weights), or deepbet's brain mask.
BRAIN_REGIONS = ("head", "deepbet")

@dataclass(frozen=True)
class PostProcessing:
    """How the raw map becomes the output map and mask; ``None``/0 switches a step off."""

    polarity: str = "both"
    brain_erosion_mm: Optional[float] = None  # None: no brain region; else how far in-plane the region is eroded
    median_mm: Optional[float] = None
    min_component_mm3: float = 0.0
    brain_region: str = "head"
    # For a skull-stripped input (models.fit_checks tells one): the same steps, but a threshold of its own,
    # calibrated on validation volumes stripped the same way (a map of a stripped scan is not scaled as one with skull).
    skull_stripped_input: bool = False

    def __post_init__(self) -> None:
        if self.polarity not in POLARITIES:
            raise AutoDDPMError(f"unknown polarity '{self.polarity}' in the model card: choose one of {', '.join(POLARITIES)}")
        if self.brain_region not in BRAIN_REGIONS:
            raise AutoDDPMError(f"unknown brain region '{self.brain_region}' in the model card: choose one of "
                                f"{', '.join(BRAIN_REGIONS)}")
        if not isinstance(self.skull_stripped_input, bool):
            raise AutoDDPMError(f"post-processing skull_stripped_input must be true or false, not {self.skull_stripped_input!r}")
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

    @classmethod
    def for_option(cls, option: str, card_settings: Optional[dict[str, Any]]) -> "PostProcessing":
        """What ``--postprocess option`` stands for with a card's settings (see ``option_settings``)."""
        return cls.from_dict(option_settings(option, card_settings))

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self)
        if not self.skull_stripped_input:  # as cards and run records stated settings before stripped inputs had their own
            del settings["skull_stripped_input"]
        return settings

    @property
    def is_none(self) -> bool:
        return self == PostProcessing.none()

    def describe(self) -> str:
        """One line for logs and provenance."""
        if self.is_none:
            return "none (the paper's raw map)"
        steps = [f"{self.polarity} deviations"]
        if self.brain_erosion_mm is not None:
            region = "deepbet brain mask" if self.brain_region == "deepbet" else "head region"
            steps.append(region + (f" eroded {self.brain_erosion_mm:g} mm" if self.brain_erosion_mm else ""))
        if self.median_mm:
            steps.append(f"3D median {self.median_mm:g} mm")
        if self.min_component_mm3:
            steps.append(f"components >= {self.min_component_mm3:g} mm3")
        if self.skull_stripped_input:
            steps.append("threshold for skull-stripped inputs")
        return ", ".join(steps)


# `--postprocess deepbet`: the card's post-processing with deepbet's brain mask, not eroded, as the brain region
# (on lgg-dev, eroding or growing it did not help: docs/RESEARCH_LOG.md).
DEEPBET_REGION = {"brain_region": "deepbet", "brain_erosion_mm": 0.0}


def option_settings(option: str, card_settings: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The post-processing settings ``--postprocess option`` stands for, as a card states them (a calibrated
    threshold is found by comparing these): the card's, the card's with DEEPBET_REGION, or none ({})."""
    if option not in POSTPROCESS_CHOICES:
        raise AutoDDPMError(f"--postprocess must be one of {', '.join(POSTPROCESS_CHOICES)}, not '{option}'")
    if option == "none":
        return {}
    settings = dict(card_settings or {})
    if option == "deepbet":
        if PostProcessing.from_dict(settings).is_none:
            raise AutoDDPMError("--postprocess deepbet replaces the brain region of the model card's post-processing, "
                                "and this model's card has none; use --postprocess card or none")
        settings.update(DEEPBET_REGION)
    return settings


def for_skull_stripped_input(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a skull-stripped input is post-processed with instead of ``settings`` (as a card states
    them): the same, marked for the threshold calibrated on stripped validation volumes. The raw map ({})
    has no such threshold and stays as it is."""
    return {**settings, "skull_stripped_input": True} if settings else {}


def stripped_input_threshold(card: "ModelCard", schedule: str, settings: dict[str, Any]) -> Optional[float]:
    """``card``'s threshold for a skull-stripped input post-processed with ``settings`` (calibrated on validation
    volumes stripped the same way, ``autoddpm calibrate --with-stripped``), or None where it has none and such an
    input is thresholded as the others."""
    stripped = for_skull_stripped_input(settings)
    return card.postprocessed_threshold(schedule, stripped) if stripped else None
