"""ext2/ext3 indirect block maps: which physical blocks hold a range of a file.

i_block holds 15 little-endian 32-bit block numbers: 12 direct data blocks,
then the roots of a single, double and triple indirect tree. Each indirect
block is an array of block_size/4 pointers to the next level; a zero pointer
at any level is a hole covering everything below it. The trees have a fixed
height, so walks are bounded by construction; a walk still refuses an
indirect block reached twice, which would otherwise let a crafted map repeat
one block's pointers billions of times.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from functools import lru_cache

from ext4box.ext4.format.blockrun import BlockRun, RunChecker, append_merged
from ext4box.ext4.format.errors import Corrupt, block_where
from ext4box.ext4.format.extents import I_BLOCK_SIZE, LBLK_LIMIT

DIRECT_BLOCKS = 12
INDIRECT_LEVELS = 3  # single, double, triple
POINTER_SIZE = 4

_I_BLOCK_POINTERS = struct.Struct("<15I")

# How many parsed indirect blocks a mapper keeps: one per level plus one.
_POINTER_CACHE_SIZE = INDIRECT_LEVELS + 1


@lru_cache(maxsize=8)
def _pointer_block_layout(block_size: int) -> struct.Struct:
    return struct.Struct(f"<{block_size // POINTER_SIZE}I")


class BlockMapMapper:
    """Maps logical blocks of one indirect-mapped inode to block runs."""

    def __init__(self, *, ino: int, i_block: bytes, read_block: Callable[[int], bytes],
                 block_size: int, check_run: RunChecker) -> None:
        if len(i_block) != I_BLOCK_SIZE:
            raise ValueError(f"i_block must be {I_BLOCK_SIZE} bytes, got {len(i_block)}")
        self.ino = ino
        self.block_size = block_size
        self._read_block = read_block
        self._check_run = check_run
        self._layout = _pointer_block_layout(block_size)
        self.per_block = block_size // POINTER_SIZE
        pointers = _I_BLOCK_POINTERS.unpack(i_block)
        self.direct: tuple[int, ...] = pointers[:DIRECT_BLOCKS]
        # (root pointer, tree height, first logical block, blocks covered) per tree.
        trees = []
        first = DIRECT_BLOCKS
        for height in range(1, INDIRECT_LEVELS + 1):
            span = self.per_block**height
            trees.append((pointers[DIRECT_BLOCKS + height - 1], height, first, span))
            first += span
        self.trees: tuple[tuple[int, int, int, int], ...] = tuple(trees)
        # Logical blocks beyond this cannot be addressed and read as holes.
        self.limit = min(first, LBLK_LIMIT)
        self._pointer_cache: dict[int, tuple[int, ...]] = {}

    def invalidate(self) -> None:
        """Forget cached indirect blocks (for a future writer)."""
        self._pointer_cache.clear()

    def _pointers(self, block: int, seen: set[int]) -> tuple[int, ...]:
        if block in seen:
            raise Corrupt("indirect block", block_where(block, self.ino),
                          "block referenced twice in the map")
        seen.add(block)
        self._check_run(block, 1)
        cached = self._pointer_cache.get(block)
        if cached is not None:
            return cached
        raw = self._read_block(block)
        if len(raw) != self.block_size:
            raise Corrupt("indirect block", block_where(block, self.ino),
                          f"read {len(raw)} bytes, expected {self.block_size}")
        pointers = self._layout.unpack(raw)
        if len(self._pointer_cache) >= _POINTER_CACHE_SIZE:
            del self._pointer_cache[next(iter(self._pointer_cache))]
        self._pointer_cache[block] = pointers
        return pointers

    def _data_runs(self, pointers: tuple[int, ...], slot: int, lblk: int,
                   count: int) -> Iterator[BlockRun]:
        """Coalesce `count` data pointers from `slot` (mapping from `lblk`) into runs."""
        run_lblk = lblk
        run_pblk = pointers[slot]
        run_len = 1
        for offset in range(1, count):
            pblk = pointers[slot + offset]
            if (pblk == 0 and run_pblk == 0) or (run_pblk and pblk == run_pblk + run_len):
                run_len += 1
                continue
            yield self._checked(run_lblk, run_len, run_pblk)
            run_lblk = lblk + offset
            run_pblk = pblk
            run_len = 1
        yield self._checked(run_lblk, run_len, run_pblk)

    def _checked(self, lblk: int, length: int, pblk: int) -> BlockRun:
        if pblk == 0:
            return BlockRun(lblk, length, None)
        self._check_run(pblk, length)
        return BlockRun(lblk, length, pblk)

    def _tree_runs(self, block: int, height: int, first: int, span: int, cur: int, stop: int,
                   seen: set[int]) -> Iterator[BlockRun]:
        """Runs for [cur, stop) inside the tree rooted at `block` covering [first, first+span)."""
        if block == 0:
            yield BlockRun(cur, stop - cur, None)
            return
        pointers = self._pointers(block, seen)
        if height == 1:
            yield from self._data_runs(pointers, cur - first, cur, stop - cur)
            return
        child_span = span // self.per_block
        slot = (cur - first) // child_span
        while cur < stop:
            child_first = first + slot * child_span
            child_stop = min(stop, child_first + child_span)
            yield from self._tree_runs(pointers[slot], height - 1, child_first, child_span,
                                       cur, child_stop, seen)
            cur = child_stop
            slot += 1

    def _runs(self, lblk: int, end: int) -> Iterator[BlockRun]:
        seen: set[int] = set()
        cur = lblk
        if cur < DIRECT_BLOCKS:
            stop = min(end, DIRECT_BLOCKS)
            yield from self._data_runs(self.direct, cur, cur, stop - cur)
            cur = stop
        for root, height, first, span in self.trees:
            if cur >= end or cur >= self.limit:
                break
            tree_end = min(first + span, self.limit)
            if cur >= tree_end:
                continue
            stop = min(end, tree_end)
            yield from self._tree_runs(root, height, first, span, cur, stop, seen)
            cur = stop
        if cur < end:
            yield BlockRun(cur, end - cur, None)

    def map(self, lblk: int, count: int) -> list[BlockRun]:
        """Runs tiling [lblk, lblk + count) exactly, holes included, merged when contiguous."""
        if lblk < 0 or count < 0:
            raise ValueError(f"bad range {lblk}+{count}")
        runs: list[BlockRun] = []
        if count:
            for run in self._runs(lblk, lblk + count):
                append_merged(runs, run)
        return runs

    def extents(self) -> Iterator[BlockRun]:
        """Every mapped run in logical order, physically contiguous pointers merged."""
        pending: list[BlockRun] = []
        for run in self._runs(0, self.limit):
            if run.pblk is None:
                continue
            append_merged(pending, run)
            if len(pending) > 1:
                yield pending.pop(0)
        yield from pending

    def tree_blocks(self) -> list[int]:
        """The indirect blocks (single, double, triple trees) in logical order."""
        seen: set[int] = set()
        blocks: list[int] = []
        for root, height, _first, _span in self.trees:
            self._collect_tree(root, height, seen, blocks)
        return blocks

    def _collect_tree(self, block: int, height: int, seen: set[int], blocks: list[int]) -> None:
        if block == 0:
            return
        if height == 1:
            # Leaf-level indirect blocks are named, not read: their pointers are data.
            if block in seen:
                raise Corrupt("indirect block", block_where(block, self.ino),
                              "block referenced twice in the map")
            seen.add(block)
            self._check_run(block, 1)
            blocks.append(block)
            return
        pointers = self._pointers(block, seen)
        blocks.append(block)
        for child in pointers:
            self._collect_tree(child, height - 1, seen, blocks)
