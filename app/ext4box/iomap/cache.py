"""A bounded cache of block runs already walked, per inode.

Sequential reads ask for neighbouring ranges over and over; keeping the runs a
walk produced lets the next request skip the extent tree (or block map)
entirely. The cache is an LRU over inodes; each inode keeps its runs sorted by
logical block and non-overlapping, so a lookup is one bisect.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict

from ext4box.ext4.format.blockrun import BlockRun


class InodeRuns:
    """The runs known for one inode: sorted, non-overlapping, possibly with gaps."""

    __slots__ = ("runs", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.runs: list[BlockRun] = []

    def __len__(self) -> int:
        return len(self.runs)

    def covering(self, lblk: int, end: int) -> tuple[list[BlockRun], list[tuple[int, int]]]:
        """Runs overlapping [lblk, end) and the gaps (start, end) nothing covers yet."""
        found: list[BlockRun] = []
        gaps: list[tuple[int, int]] = []
        index = bisect.bisect_right(self.starts, lblk) - 1
        if index < 0 or self.runs[index].end <= lblk:
            index += 1
        cursor = lblk
        runs = self.runs
        while cursor < end and index < len(runs):
            run = runs[index]
            if run.lblk >= end:
                break
            if run.lblk > cursor:
                gaps.append((cursor, run.lblk))
            found.append(run)
            cursor = run.end
            index += 1
        if cursor < end:
            gaps.append((cursor, end))
        return found, gaps

    def forget(self, lblk: int, end: int) -> None:
        """Drop what is known about [lblk, end); runs reaching outside keep those parts."""
        index = bisect.bisect_right(self.starts, lblk) - 1
        if index < 0 or self.runs[index].end <= lblk:
            index += 1
        stop = index
        kept: list[BlockRun] = []
        while stop < len(self.runs) and self.runs[stop].lblk < end:
            run = self.runs[stop]
            if run.lblk < lblk:
                kept.append(_piece(run, run.lblk, lblk))
            if run.end > end:
                kept.append(_piece(run, end, run.end))
            stop += 1
        self.runs[index:stop] = kept
        self.starts[index:stop] = [run.lblk for run in kept]

    def insert(self, new_runs: list[BlockRun]) -> None:
        """Add runs that fill gaps previously reported by `covering`."""
        for run in new_runs:
            index = bisect.bisect_left(self.starts, run.lblk)
            self.starts.insert(index, run.lblk)
            self.runs.insert(index, run)


def _piece(run: BlockRun, lblk: int, end: int) -> BlockRun:
    """The part [lblk, end) of `run` (inside it)."""
    pblk = None if run.pblk is None else run.pblk + (lblk - run.lblk)
    return BlockRun(lblk, end - lblk, pblk, run.unwritten)


class MappingCache:
    """LRU over inodes of `InodeRuns`, bounded in inodes and in runs per inode."""

    def __init__(self, max_inodes: int = 1024, max_runs_per_inode: int = 8192) -> None:
        if max_inodes < 1 or max_runs_per_inode < 1:
            raise ValueError("mapping cache bounds must be positive")
        self.max_inodes = max_inodes
        self.max_runs_per_inode = max_runs_per_inode
        self._inodes: OrderedDict[int, InodeRuns] = OrderedDict()
        # Request handlers may later run in worker threads; the lock keeps the
        # LRU order and the per-inode lists consistent.
        self.lock = threading.Lock()

    def runs_for(self, ino: int) -> InodeRuns:
        """The (possibly new, empty) run list of `ino`; caller holds `lock`."""
        entry = self._inodes.get(ino)
        if entry is not None:
            self._inodes.move_to_end(ino)
            return entry
        entry = InodeRuns()
        self._inodes[ino] = entry
        while len(self._inodes) > self.max_inodes:
            self._inodes.popitem(last=False)
        return entry

    def trim(self, ino: int, entry: InodeRuns) -> None:
        """Forget an inode's runs once they exceed the per-inode bound; caller holds `lock`.

        Dropping everything is crude but keeps memory bounded for hugely
        fragmented files; a sequential reader refills what it needs.
        """
        if len(entry) > self.max_runs_per_inode:
            entry.starts.clear()
            entry.runs.clear()

    def invalidate(self, ino: int) -> None:
        """Forget what is known about `ino` (its mapping changed)."""
        with self.lock:
            self._inodes.pop(ino, None)

    def invalidate_range(self, ino: int, lblk: int, end: int) -> None:
        """Forget blocks [lblk, end) of `ino` (only their mapping changed)."""
        with self.lock:
            entry = self._inodes.get(ino)
            if entry is not None:
                entry.forget(lblk, end)

    def clear(self) -> None:
        with self.lock:
            self._inodes.clear()

    def __len__(self) -> int:
        return len(self._inodes)
