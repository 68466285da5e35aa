"""Reading the journal: its blocks through the journal inode's mapping, and a
cursor over the circular log that every recovery pass walks the same way."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from ext4box.ext4.format.blockrun import BlockRun
from ext4box.ext4.format.errors import Corrupt
from ext4box.ext4.journal.superblock import HEADER, JBD2_MAGIC, JournalSuperblock

_MASK32 = 0xFFFFFFFF


def tid_geq(x: int, y: int) -> bool:
    """Transaction id order with u32 wrap-around, as jbd2 compares tids."""
    return ((x - y) & _MASK32) < 0x80000000


class JournalBlocks:
    """Journal block number → device block, from the journal inode's block runs."""

    def __init__(self, runs: list[BlockRun], read_device_block: Callable[[int], bytes],
                 ino: int) -> None:
        self._starts = [r.lblk for r in runs]
        self._runs = runs
        self._read = read_device_block
        self.ino = ino
        for run in runs:
            if run.pblk is None or run.unwritten:
                raise Corrupt("journal inode", f"inode {ino}",
                              f"journal blocks {run.lblk}..{run.end - 1} are not allocated")
        self.count = runs[-1].end if runs else 0
        # Device blocks holding the journal, sorted: replay must never write into them.
        self._device_runs = sorted((r.pblk or 0, r.length) for r in runs)
        for (start, length), (following, _) in zip(self._device_runs, self._device_runs[1:],
                                                   strict=False):
            if start + length > following:
                # Two journal blocks on one device block: writing one log position
                # would overwrite another.
                raise Corrupt("journal inode", f"inode {ino}",
                              f"maps two journal blocks to device block {following}")

    @property
    def device_runs(self) -> list[tuple[int, int]]:
        """(first device block, length) of every run of the journal, sorted."""
        return list(self._device_runs)

    def device_block(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise Corrupt("journal", f"journal block {index}",
                          f"outside the journal's {self.count} blocks")
        run = self._runs[bisect.bisect_right(self._starts, index) - 1]
        assert run.pblk is not None
        return run.pblk + index - run.lblk

    def read(self, index: int) -> bytes:
        return self._read(self.device_block(index))

    def holds_device_block(self, pblk: int) -> bool:
        return self.overlaps(pblk, 1)

    def overlaps(self, start: int, length: int) -> bool:
        """Whether any of the device blocks [start, start + length) holds journal blocks."""
        i = bisect.bisect_right(self._device_runs, (start + length - 1, 1 << 64)) - 1
        return i >= 0 and start < self._device_runs[i][0] + self._device_runs[i][1]


@dataclass(frozen=True, slots=True)
class LogBlock:
    kind: int
    sequence: int
    position: int  # journal block number
    data: bytes


class LogCursor:
    """Walks the log from s_start/s_sequence. It never revisits a block: after
    one full turn of the circular log the walk ends, whatever the blocks say."""

    def __init__(self, blocks: JournalBlocks, jsb: JournalSuperblock) -> None:
        self.blocks = blocks
        self.jsb = jsb
        self.position = jsb.start
        self.sequence = jsb.sequence
        self._left = jsb.log_blocks  # blocks that may still be consumed

    def next_block(self) -> LogBlock | None:
        """The next header block of the expected transaction, or None at the end of the log."""
        if self._left <= 0:
            return None
        position = self.position
        data = self.blocks.read(position)
        self._advance(1)
        magic, kind, sequence = HEADER.unpack_from(data, 0)
        if magic != JBD2_MAGIC or sequence != self.sequence:
            return None
        return LogBlock(kind, sequence, position, data)

    def take(self, count: int) -> list[int] | None:
        """Positions of the next `count` logged blocks; None if they run past one turn."""
        if count > self._left:
            self._left = 0
            return None
        positions = []
        for _ in range(count):
            positions.append(self.position)
            self._advance(1)
        return positions

    def commit(self) -> None:
        self.sequence = (self.sequence + 1) & _MASK32

    def _advance(self, count: int) -> None:
        jsb = self.jsb
        self.position = jsb.first + (self.position - jsb.first + count) % jsb.log_blocks
        self._left -= count
