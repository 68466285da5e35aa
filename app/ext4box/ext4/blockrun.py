"""The unit of the mapping contract: a run of logical blocks and where it lives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Raises Corrupt when (pblk, length) is not a place file data may live.
RunChecker = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class BlockRun:
    lblk: int
    length: int
    pblk: int | None  # None: a hole
    unwritten: bool = False

    @property
    def is_hole(self) -> bool:
        return self.pblk is None

    @property
    def end(self) -> int:
        return self.lblk + self.length
