"""ext2/ext3 indirect block maps, write side: map holes, punch and truncate.

`BlockMapWriter` has the same operations and commit rules as
`ExtentTreeWriter`: changes stay in memory until the operation succeeds, then
the indirect blocks it changed are written through `write_meta` (lower levels
first, so a pointer never reaches the device before the block it names), the
indirect blocks it emptied go to `free_block`, and `i_block` holds the new 15
pointers for the caller to store in the inode. A failed operation writes
nothing and hands its new indirect blocks back through `free_block`.

Indirect blocks are allocated on demand with the data block they will map as
the allocation goal (so they land beside the data, as ext2/ext3 place them),
start zeroed, and are freed as soon as every pointer in them is zero. Block
maps cannot mark blocks unwritten: inserting unwritten blocks is refused and
`mark_written` has nothing to convert.

Accounting as in the extent writer: `tree_blocks_delta` is the net count of
indirect blocks allocated minus freed, for i_blocks; data blocks are the
caller's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ext4box.ext4.format.blockmap import DIRECT_BLOCKS, INDIRECT_LEVELS, POINTER_SIZE
from ext4box.ext4.format.blockrun import RunChecker, append_physical_run
from ext4box.ext4.format.errors import Corrupt, Unsupported, block_where, inode_where
from ext4box.ext4.format.extents import I_BLOCK_SIZE, LBLK_LIMIT

ReadMeta = Callable[[int], bytes]
WriteMeta = Callable[[int, bytes], None]
AllocBlock = Callable[[int], int]
FreeBlock = Callable[[int], None]

_I_BLOCK_POINTERS = struct.Struct(f"<{I_BLOCK_SIZE // POINTER_SIZE}I")
_ROOT = -1  # owner key of pointers held in the inode itself


@dataclass(slots=True)
class _Indirect:
    """One indirect block being edited: its pointers and its place in the map."""

    block: int
    height: int  # 1: pointers to data; 2, 3: pointers to indirect blocks
    pointers: list[int]


@dataclass(frozen=True, slots=True)
class _Tree:
    slot: int  # which i_block word holds the tree's root
    height: int
    first: int  # first logical block the tree maps
    span: int  # logical blocks it can map


class BlockMapWriter:
    """Mutates the indirect block map of one inode; see the module docstring."""

    def __init__(self, *, ino: int, i_block: bytes, block_size: int, read_meta: ReadMeta,
                 write_meta: WriteMeta, alloc_block: AllocBlock, free_block: FreeBlock,
                 check_run: RunChecker) -> None:
        if len(i_block) != I_BLOCK_SIZE:
            raise ValueError(f"i_block must be {I_BLOCK_SIZE} bytes, got {len(i_block)}")
        self.ino = ino
        self.block_size = block_size
        self._read_meta = read_meta
        self._write_meta = write_meta
        self._alloc_block = alloc_block
        self._free_block = free_block
        self._check_run = check_run
        self.per_block = block_size // POINTER_SIZE
        self._layout = struct.Struct(f"<{self.per_block}I")
        trees = []
        first = DIRECT_BLOCKS
        for height in range(1, INDIRECT_LEVELS + 1):
            span = self.per_block**height
            trees.append(_Tree(DIRECT_BLOCKS + height - 1, height, first, span))
            first += span
        self._trees = tuple(trees)
        # Logical blocks from here on cannot be mapped.
        self.limit = min(first, LBLK_LIMIT)
        self._root_bytes = bytes(i_block)
        self._root = list(_I_BLOCK_POINTERS.unpack(i_block))
        self._tree_blocks_delta = 0
        # Per-operation state.
        self._blocks: dict[int, _Indirect] = {}
        self._owners: dict[int, tuple[int, int]] = {}  # block -> (holder block, slot)
        self._dirty: set[int] = set()
        self._allocated: list[int] = []
        self._dropped: list[int] = []

    # -- public API --------------------------------------------------------------------------

    @property
    def i_block(self) -> bytes:
        """The current 15 pointers (60 bytes) to store in the inode."""
        return self._root_bytes

    @property
    def tree_blocks_delta(self) -> int:
        """Indirect blocks allocated minus indirect blocks freed by this writer so far."""
        return self._tree_blocks_delta

    def insert(self, lblk: int, pblk: int, length: int, unwritten: bool = False) -> None:
        """Map [lblk, lblk+length) to [pblk, ...); the range must be a hole (else ValueError)."""
        if unwritten:
            raise Unsupported("unwritten extents", inode_where(self.ino),
                              "indirect block maps have no unwritten state")
        self._check_range(lblk, length)
        if pblk <= 0 or pblk + length > 1 << 32:
            raise ValueError(f"bad physical run {pblk}+{length} for a 32-bit block map")
        self._check_run(pblk, length)
        with self._operation():
            done = 0
            while done < length:  # each pass fills at least one pointer
                pointers, owner, index = self._pointer_slot(lblk + done, pblk + done)
                # In the root only the direct pointers hold data: words 12..14
                # are the indirect roots.
                end = DIRECT_BLOCKS if owner == _ROOT else len(pointers)
                count = min(length - done, end - index)
                if any(pointers[index:index + count]):
                    raise ValueError(f"inode {self.ino}: [{lblk}, {lblk + length}) "
                                     "is not a hole")
                pointers[index:index + count] = range(pblk + done, pblk + done + count)
                self._dirty.add(owner)
                done += count

    def mark_written(self, lblk: int, length: int) -> None:
        """Nothing to convert: block maps have no unwritten blocks."""
        self._check_range(lblk, length)

    def punch(self, lblk: int, length: int) -> list[tuple[int, int]]:
        """Unmap [lblk, lblk+length); returns the data runs (pblk, count) for the caller to free."""
        self._check_range(lblk, length)
        freed: list[tuple[int, int]] = []
        end = lblk + length
        with self._operation():
            if lblk < DIRECT_BLOCKS:
                self._clear_data(self._root, _ROOT, lblk, min(end, DIRECT_BLOCKS), freed)
            for tree in self._trees:
                lo = max(lblk, tree.first)
                hi = min(end, tree.first + tree.span)
                if lo < hi and self._root[tree.slot]:
                    self._punch_below(self._root, _ROOT, tree.slot, tree.height, tree.first,
                                      tree.span, lo, hi, freed)
        return freed

    def truncate(self, lblk: int) -> list[tuple[int, int]]:
        """Unmap everything from `lblk` on; returns the freed data runs."""
        if not 0 <= lblk <= self.limit:
            raise ValueError(f"bad logical block {lblk}")
        if lblk == self.limit:
            return []
        return self.punch(lblk, self.limit - lblk)

    # -- operations ---------------------------------------------------------------------------

    def _check_range(self, lblk: int, length: int) -> None:
        if lblk < 0 or length <= 0 or lblk + length > self.limit:
            raise ValueError(f"bad logical range {lblk}+{length} (map limit {self.limit})")

    @contextmanager
    def _operation(self) -> Iterator[None]:
        """Commit everything the body changed, or undo it all when the body raises."""
        self._reset()
        try:
            yield
            self._commit()
        except BaseException:
            self._root = list(_I_BLOCK_POINTERS.unpack(self._root_bytes))
            for block in self._allocated:
                self._free_block(block)
            raise
        finally:
            self._reset()

    def _reset(self) -> None:
        self._blocks.clear()
        self._owners.clear()
        self._dirty.clear()
        self._allocated.clear()
        self._dropped.clear()

    def _commit(self) -> None:
        dropped = set(self._dropped)
        live = [self._blocks[b] for b in self._dirty if b != _ROOT and b not in dropped]
        for indirect in sorted(live, key=lambda item: item.height):
            self._write_meta(indirect.block, self._layout.pack(*indirect.pointers))
        self._root_bytes = _I_BLOCK_POINTERS.pack(*self._root)
        for block in self._dropped:
            self._free_block(block)
        self._tree_blocks_delta += len(self._allocated) - len(self._dropped)

    def _pointer_slot(self, lblk: int, goal: int) -> tuple[list[int], int, int]:
        """The pointer array holding `lblk`'s data pointer (created on the way when missing),
        its owner key for dirty tracking, and the index in it."""
        if lblk < DIRECT_BLOCKS:
            return self._root, _ROOT, lblk
        tree = next(t for t in self._trees if lblk < t.first + t.span)
        holder, owner, slot = self._root, _ROOT, tree.slot
        offset = lblk - tree.first
        span = tree.span
        for height in range(tree.height, 0, -1):
            indirect = self._indirect(holder, owner, slot, height, goal=goal)
            span //= self.per_block
            holder, owner, slot = indirect.pointers, indirect.block, offset // span
            offset %= span
        return holder, owner, slot

    def _indirect(self, holder: list[int], owner: int, slot: int, height: int, *,
                  goal: int) -> _Indirect:
        """The indirect block `holder[slot]` points at, allocating a zeroed one for a hole."""
        block = holder[slot]
        if block:
            return self._load(block, owner, slot, height)
        block = self._alloc_block(goal)
        self._allocated.append(block)  # before anything can fail, so a rollback frees it
        self._check_run(block, 1)
        if block in self._blocks:
            raise Corrupt("indirect block", block_where(block, self.ino),
                          "allocator returned a block already in the map")
        indirect = _Indirect(block, height, [0] * self.per_block)
        self._blocks[block] = indirect
        self._owners[block] = (owner, slot)
        self._dirty.add(block)
        holder[slot] = block
        self._dirty.add(owner)
        return indirect

    def _load(self, block: int, owner: int, slot: int, height: int) -> _Indirect:
        known = self._owners.get(block)
        if known is not None:
            if known != (owner, slot) or block in self._dropped:
                raise Corrupt("indirect block", block_where(block, self.ino),
                              "block referenced twice in the map")
            return self._blocks[block]
        self._check_run(block, 1)
        raw = self._read_meta(block)
        if len(raw) != self.block_size:
            raise Corrupt("indirect block", block_where(block, self.ino),
                          f"read {len(raw)} bytes, expected {self.block_size}")
        indirect = _Indirect(block, height, list(self._layout.unpack(raw)))
        self._blocks[block] = indirect
        self._owners[block] = (owner, slot)
        return indirect

    def _clear_data(self, pointers: list[int], owner: int, lo: int, hi: int,
                    freed: list[tuple[int, int]]) -> None:
        """Zero data pointers [lo, hi) of one array, collecting what they pointed at."""
        changed = False
        for index in range(lo, hi):
            pblk = pointers[index]
            if pblk:
                self._check_run(pblk, 1)
                append_physical_run(freed, pblk, 1)
                pointers[index] = 0
                changed = True
        if changed:
            self._dirty.add(owner)

    def _punch_below(self, holder: list[int], owner: int, slot: int, height: int, first: int,
                     span: int, lo: int, hi: int, freed: list[tuple[int, int]]) -> None:
        """Unmap [lo, hi) inside the subtree `holder[slot]` mapping [first, first+span)."""
        indirect = self._load(holder[slot], owner, slot, height)
        pointers = indirect.pointers
        if height == 1:
            self._clear_data(pointers, indirect.block, lo - first, hi - first, freed)
        else:
            child_span = span // self.per_block
            for child in range((lo - first) // child_span, (hi - 1 - first) // child_span + 1):
                if not pointers[child]:
                    continue  # a hole covering the whole child range
                child_first = first + child * child_span
                self._punch_below(pointers, indirect.block, child, height - 1, child_first,
                                  child_span, max(lo, child_first),
                                  min(hi, child_first + child_span), freed)
        if not any(pointers):
            holder[slot] = 0
            self._dirty.add(owner)
            self._dropped.append(indirect.block)
            self._dirty.discard(indirect.block)
