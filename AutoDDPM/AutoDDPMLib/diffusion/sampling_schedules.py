"""The sampling schedules: how many reverse steps each AutoDDPM stage takes, and how wide step 1's mask is.

Kept free of torch so that the command line and the Slicer module can name and
validate schedules without loading PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSchedule:
    """How many reverse steps each stage takes, from which noise level, and how far step 1's mask is dilated."""

    coarse_start: int = 200
    coarse_steps: int = 201
    resample_start: int = 50
    resample_steps: int = 50
    resample_jumps: int = 5
    eta: float = 1.0
    # The side of the square (model-grid pixels) that dilates the mask: the paper's 3 x 3, once.
    # A wider one re-samples more of a lesion's rim, which step 1's threshold tends to miss.
    mask_dilation: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.mask_dilation, int) or self.mask_dilation < 1 or self.mask_dilation % 2 == 0:
            raise ValueError(f"mask_dilation must be an odd number of pixels (1, 3, 5, ...), not {self.mask_dilation}")

    @property
    def evaluations(self) -> int:
        """Network evaluations per slice."""
        return self.coarse_steps + self.resample_steps * self.resample_jumps

    def to_dict(self) -> dict:
        return dict(self.__dict__)


SCHEDULES = {
    # The paper: all 201 ancestral steps from 200, then 50 levels x 5 re-samples (451 evaluations).
    "reference": SamplingSchedule(),
    # Strided steps in both stages: 10 + 5 x 3 = 25 evaluations.
    "fast": SamplingSchedule(coarse_steps=10, resample_steps=5, resample_jumps=3),
}

# What `autoddpm run`, the Slicer module and calibration use unless told otherwise.
DEFAULT_SCHEDULE = "fast"
