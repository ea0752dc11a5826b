"""The sampling schedules: how many reverse steps each AutoDDPM stage takes.

Kept free of torch so that the command line and the Slicer module can name and
validate schedules without loading PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingSchedule:
    """How many reverse steps each stage takes, and from which noise level."""

    coarse_start: int = 200
    coarse_steps: int = 201
    resample_start: int = 50
    resample_steps: int = 50
    resample_jumps: int = 5
    eta: float = 1.0

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
