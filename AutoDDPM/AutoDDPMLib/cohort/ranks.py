"""Sharing a cohort among the processes ``torchrun`` starts (one per GPU, on one node or several).

torchrun tells each process its place in the environment (WORLD_SIZE, RANK, LOCAL_RANK). Every process
makes the same checks on the whole cohort, runs its share of the inputs on its own GPU and writes their
outputs and sidecars; rank 0 gathers what happened to every input and writes the summary. The processes
talk only at that gather, over gloo (CPU, so the same code runs without GPUs), and only when there are several.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import AutoDDPMError

Item = TypeVar("Item")

# A rank that finished its share waits at the gather for the slowest one, which may still have hours of
# volumes ahead of it: far longer than torch.distributed's default of 30 minutes.
GATHER_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes: ``rank`` in all, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Ranks:
        """What torchrun set; a single process where it set nothing."""
        try:
            ranks = cls(*(int(os.environ.get(name, default)) for name, default in
                          (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))))
        except ValueError:
            raise AutoDDPMError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them); "
                                "unset them to run a single process") from None
        if not 0 <= ranks.rank < ranks.world:
            raise AutoDDPMError(f"RANK {ranks.rank} is not below WORLD_SIZE {ranks.world}; start the processes with "
                                "torchrun, or unset both to run a single process")
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if ranks.world > 1 and not os.environ.get(name)]
        if missing:  # the processes could not find each other at the end, after all the work
            raise AutoDDPMError(f"WORLD_SIZE is {ranks.world} but {' and '.join(missing)} not set; start the processes "
                                "with torchrun, or unset WORLD_SIZE to run a single process")
        return ranks

    @property
    def is_first(self) -> bool:
        """Whether this process says what concerns the whole cohort and writes its summary."""
        return self.rank == 0

    def share(self, items: Sequence[Item]) -> list[Item]:
        """This process's items: every world-th one, from its rank on (neighbours in the list go to different
        processes, so that a cohort sorted by size keeps the processes evenly busy)."""
        return list(items[self.rank::self.world])

    def device(self, requested: str) -> str:
        """The device to run on: under torchrun on a machine with GPUs, ``auto`` and ``cuda`` become this
        process's own GPU, cuda:LOCAL_RANK."""
        if self.world > 1 and requested in ("auto", "cuda"):
            import torch

            if torch.cuda.is_available():
                return f"cuda:{self.local_rank}"
        return requested

    def gather(self, items: list[Any]) -> list[Any] | None:
        """Every process's ``items`` on rank 0, in rank order (None on the others); waits for all processes."""
        if self.world == 1:
            return list(items)
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
        try:
            gathered: list[Any] | None = [None] * self.world if self.is_first else None
            dist.gather_object(items, gathered, dst=0)
        finally:
            dist.destroy_process_group()
        return None if gathered is None else [item for share in gathered for item in share]
