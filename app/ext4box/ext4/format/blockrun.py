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


def append_merged(runs: list[BlockRun], run: BlockRun) -> None:
    """Append `run`, merging it into the last run when both are one contiguous piece."""
    if runs:
        last = runs[-1]
        if last.end == run.lblk and last.unwritten == run.unwritten:
            if last.pblk is None and run.pblk is None:
                runs[-1] = BlockRun(last.lblk, last.length + run.length, None, last.unwritten)
                return
            if (last.pblk is not None and run.pblk is not None
                    and last.pblk + last.length == run.pblk):
                runs[-1] = BlockRun(last.lblk, last.length + run.length, last.pblk,
                                    last.unwritten)
                return
    runs.append(run)


def append_physical_run(runs: list[tuple[int, int]], pblk: int, count: int) -> None:
    """Add a (pblk, count) run, merging it with the previous one when physically contiguous."""
    if runs and runs[-1][0] + runs[-1][1] == pblk:
        runs[-1] = (runs[-1][0], runs[-1][1] + count)
    else:
        runs.append((pblk, count))
