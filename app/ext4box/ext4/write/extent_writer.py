"""Extent trees, write side: map holes, convert unwritten extents, punch and truncate.

`ExtentTreeWriter` edits the tree of one inode in memory and commits each
operation as a whole: the tree blocks it changed are written through
`write_meta` (children before the index blocks that point at them), the
blocks it dropped go to `free_block`, and the new 60-byte root is available
as `i_block` for the caller to store in the inode (after the blocks, so the
inode never points at an unwritten node). When an operation fails half-way
(`NoSpace` from the allocator, `Corrupt` from a node read on the way) nothing
has been written: the blocks it allocated are handed back through
`free_block` and the tree is as before the call.

Shape rules kept after every operation, which e2fsck checks:
- every index key equals the first logical block of its child;
- nodes other than the root are never empty (an emptied node is freed and its
  index entry removed; an emptied root becomes an empty depth-0 leaf);
- a tree gets shallower only where the kernel's ext4 makes it so, for the
  same i_blocks: after an insert or a conversion, a depth-1 tree whose only
  leaf fits in the root moves back into the inode (ext4_ext_try_to_merge_up);
  removals leave the depth alone;
- an overfull node is split where the kernel splits it: the entries after the
  ones just inserted or changed move to a fresh node, and when those were the
  last entries only the last one moves (so appending packs leaves, and a
  file punched or converted left to right fills them as the kernel's does);
  a full root moves its entries into a new block and becomes an index with
  one entry (the tree grows one level).

Accounting: tree blocks are allocated only through `alloc_block` and freed
only through `free_block`; `tree_blocks_delta` is the running net count
(allocated minus freed) so the caller can adjust i_blocks by
`delta * block_size // 512`. Data blocks are the caller's: it allocates what it
inserts and frees what `punch` returns.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter

from ext4box.ext4.format.blockrun import RunChecker, append_physical_run
from ext4box.ext4.format.errors import Corrupt, NoSpace, block_where, inode_where
from ext4box.ext4.format.extents import (
    I_BLOCK_SIZE,
    INIT_MAX_LEN,
    LBLK_LIMIT,
    MAX_DEPTH,
    PBLK_LIMIT,
    ROOT_MAX_ENTRIES,
    UNWRITTEN_MAX_LEN,
    Extent,
    ExtentHeader,
    ExtentIndex,
    NodeParser,
    block_max_entries,
    extent_tail_checksum,
    parse_extent_node,
    tail_offset,
)

ReadMeta = Callable[[int], bytes]
WriteMeta = Callable[[int, bytes], None]
AllocBlock = Callable[[int], int]
FreeBlock = Callable[[int], None]

_TAIL = struct.Struct("<I")
_ENTRY_KEY = attrgetter("lblk")


@dataclass(slots=True)
class _Node:
    """A tree node being edited: the root (block None) or one tree block."""

    block: int | None
    depth: int
    capacity: int  # eh_max
    generation: int
    entries: list  # list[Extent] in a leaf, list[ExtentIndex] in an index node


# One step of a root-to-leaf path: the node and the slot of the child taken
# (-1 in the leaf).
_Path = list[tuple[_Node, int]]


def max_extent_length(unwritten: bool) -> int:
    return UNWRITTEN_MAX_LEN if unwritten else INIT_MAX_LEN


def _mergeable(left: Extent, right: Extent) -> bool:
    return (left.end == right.lblk and left.unwritten == right.unwritten
            and left.pblk + left.length == right.pblk
            and left.length + right.length <= max_extent_length(left.unwritten))


def _remover(freed: list[tuple[int, int]]) -> Callable[[Extent, int, int], list[Extent]]:
    """An _edit_range transform unmapping [lo, hi); the data runs it drops go to `freed`."""

    def remove(extent: Extent, lo: int, hi: int) -> list[Extent]:
        start = max(extent.lblk, lo)
        stop = min(extent.end, hi)
        append_physical_run(freed, extent.pblk + (start - extent.lblk), stop - start)
        kept = []
        if extent.lblk < start:
            kept.append(Extent(extent.lblk, start - extent.lblk, extent.pblk, extent.unwritten))
        if stop < extent.end:
            kept.append(Extent(stop, extent.end - stop, extent.pblk + (stop - extent.lblk),
                               extent.unwritten))
        return kept

    return remove


def _to_unwritten(extent: Extent, lo: int, hi: int) -> list[Extent]:
    """The _edit_range transform of mark_unwritten (an unwritten extent holds one
    block less than a written one, so a full-length extent becomes two)."""
    if extent.unwritten:
        return [extent]
    start = max(extent.lblk, lo)
    stop = min(extent.end, hi)
    pieces = []
    if extent.lblk < start:
        pieces.append(Extent(extent.lblk, start - extent.lblk, extent.pblk, False))
    at = start
    while at < stop:  # each pass converts at least one block
        count = min(UNWRITTEN_MAX_LEN, stop - at)
        pieces.append(Extent(at, count, extent.pblk + (at - extent.lblk), True))
        at += count
    if stop < extent.end:
        pieces.append(Extent(stop, extent.end - stop, extent.pblk + (stop - extent.lblk), False))
    return pieces


def _split_at(extent: Extent, lo: int, _hi: int) -> list[Extent]:
    """The _edit_range transform of insert_gap: cut the extent holding `lo` at `lo`."""
    if not extent.lblk < lo < extent.end:
        return [extent]
    head = lo - extent.lblk
    return [Extent(extent.lblk, head, extent.pblk, extent.unwritten),
            Extent(lo, extent.length - head, extent.pblk + head, extent.unwritten)]


class ExtentTreeWriter:
    """Mutates the extent tree of one inode; see the module docstring for the rules."""

    def __init__(self, *, ino: int, i_block: bytes, block_size: int, csum_seed: int | None,
                 read_meta: ReadMeta, write_meta: WriteMeta, alloc_block: AllocBlock,
                 free_block: FreeBlock, check_run: RunChecker,
                 max_depth: int = MAX_DEPTH, parse: NodeParser = parse_extent_node) -> None:
        if len(i_block) != I_BLOCK_SIZE:
            raise ValueError(f"i_block must be {I_BLOCK_SIZE} bytes, got {len(i_block)}")
        if not 1 <= max_depth <= MAX_DEPTH:
            raise ValueError(f"max_depth must be in [1, {MAX_DEPTH}], got {max_depth}")
        self.ino = ino
        self.block_size = block_size
        self._csum_seed = csum_seed
        self._read_meta = read_meta
        self._write_meta = write_meta
        self._alloc_block = alloc_block
        self._free_block = free_block
        self._check_run = check_run
        self._parse = parse  # parse_extent_node, or a shared ExtentNodeCache's
        self._max_depth = max_depth
        self._block_max = block_max_entries(block_size)
        self._root = self._parse_root(i_block)
        self._root_bytes = bytes(i_block)
        self._tree_blocks_delta = 0
        # Per-operation state: nodes read or changed, blocks allocated and dropped.
        self._nodes: dict[int, _Node] = {}
        self._dirty: set[int] = set()
        self._allocated: list[int] = []
        self._dropped: list[int] = []

    # -- public API --------------------------------------------------------------------------

    @property
    def i_block(self) -> bytes:
        """The current 60-byte root to store in the inode."""
        return self._root_bytes

    @property
    def depth(self) -> int:
        return self._root.depth

    @property
    def tree_blocks_delta(self) -> int:
        """Tree blocks allocated minus tree blocks freed by this writer so far."""
        return self._tree_blocks_delta

    def insert(self, lblk: int, pblk: int, length: int, unwritten: bool = False) -> None:
        """Map [lblk, lblk+length) to [pblk, ...); the range must be a hole (else ValueError).

        Longer runs than one extent can hold become several extents. A new
        extent merges with its neighbours in the same leaf when logically and
        physically contiguous and of the same written-ness.
        """
        self._check_range(lblk, length)
        if pblk <= 0 or pblk + length > PBLK_LIMIT:
            raise ValueError(f"bad physical run {pblk}+{length}")
        self._check_run(pblk, length)
        limit = max_extent_length(unwritten)
        with self._operation():
            done = 0
            while done < length:  # each pass maps at least one block
                count = min(limit, length - done)
                self._insert_extent(Extent(lblk + done, count, pblk + done, unwritten))
                done += count
            self._merge_up()

    def mark_written(self, lblk: int, length: int) -> None:
        """Convert the unwritten parts of [lblk, lblk+length) to written (holes stay holes)."""
        self._check_range(lblk, length)
        with self._operation():
            if self._edit_range(lblk, lblk + length, self._to_written, merge=True):
                self._merge_up()

    def mark_unwritten(self, lblk: int, length: int) -> None:
        """Convert the written parts of [lblk, lblk+length) to unwritten (holes stay holes).

        FALLOC_FL_ZERO_RANGE: the blocks stay allocated but read as zeros.
        """
        self._check_range(lblk, length)
        with self._operation():
            if self._edit_range(lblk, lblk + length, _to_unwritten, merge=True):
                self._merge_up()

    def punch(self, lblk: int, length: int) -> list[tuple[int, int]]:
        """Unmap [lblk, lblk+length); returns the data runs (pblk, count) for the caller to free."""
        self._check_range(lblk, length)
        freed: list[tuple[int, int]] = []
        with self._operation():
            self._punch_range(lblk, lblk + length, freed)
        return freed

    def collapse(self, lblk: int, length: int) -> list[tuple[int, int]]:
        """Unmap [lblk, lblk+length) and move every extent after it `length` blocks
        down (FALLOC_FL_COLLAPSE_RANGE); returns the freed data runs. An extent
        that comes to touch its neighbour in the same leaf merges with it when
        they are contiguous on disk too, as the kernel's shift does."""
        self._check_range(lblk, length)
        freed: list[tuple[int, int]] = []
        with self._operation():
            self._punch_range(lblk, lblk + length, freed)
            self._shift(lblk + length, -length)
        return freed

    def insert_gap(self, lblk: int, length: int) -> None:
        """Split the extent holding `lblk` there and move everything from `lblk` on
        `length` blocks up, leaving [lblk, lblk+length) a hole (FALLOC_FL_INSERT_RANGE).
        ValueError when the last extent would end past block 2^32 - 2 (the kernel
        keeps 2^32 - 1 unmapped; its shift answers EINVAL there)."""
        self._check_range(lblk, length)
        with self._operation():
            last_leaf = self._descend(LBLK_LIMIT - 1)[0][-1][0]
            if last_leaf.entries and last_leaf.entries[-1].end + length > LBLK_LIMIT - 1:
                raise ValueError(f"inode {self.ino}: extents would move past block "
                                 f"{LBLK_LIMIT - 2}, the last one the kernel maps")
            self._edit_range(lblk, lblk + 1, _split_at, merge=False)
            self._shift(lblk, length)

    def truncate(self, lblk: int) -> list[tuple[int, int]]:
        """Unmap everything from `lblk` on; returns the freed data runs."""
        if not 0 <= lblk <= LBLK_LIMIT:
            raise ValueError(f"bad logical block {lblk}")
        if lblk == LBLK_LIMIT:
            return []
        return self.punch(lblk, LBLK_LIMIT - lblk)

    # -- operations ---------------------------------------------------------------------------

    @staticmethod
    def _check_range(lblk: int, length: int) -> None:
        if lblk < 0 or length <= 0 or lblk + length > LBLK_LIMIT:
            raise ValueError(f"bad logical range {lblk}+{length}")

    @contextmanager
    def _operation(self) -> Iterator[None]:
        """Commit everything the body changed, or undo it all when the body raises."""
        self._nodes.clear()
        self._dirty.clear()
        self._allocated.clear()
        self._dropped.clear()
        try:
            yield
            self._commit()
        except BaseException:
            self._root = self._parse_root(self._root_bytes)
            for block in self._allocated:
                self._free_block(block)
            raise
        finally:
            self._nodes.clear()
            self._dirty.clear()
            self._allocated.clear()
            self._dropped.clear()

    def _commit(self) -> None:
        dropped = set(self._dropped)
        live = [self._nodes[block] for block in self._dirty if block not in dropped]
        # Deepest first: a node is on the device before the index entry pointing at it.
        for node in sorted(live, key=attrgetter("depth")):
            assert node.block is not None
            self._write_meta(node.block, self._encode(node))
        self._root_bytes = self._encode(self._root)
        for block in self._dropped:
            self._free_block(block)
        self._tree_blocks_delta += len(self._allocated) - len(self._dropped)

    def _insert_extent(self, extent: Extent) -> None:
        path, limit = self._descend(extent.lblk)
        leaf = path[-1][0]
        entries = leaf.entries
        pos = bisect_right(entries, extent.lblk, key=_ENTRY_KEY)
        if ((pos > 0 and entries[pos - 1].end > extent.lblk)
                or (pos < len(entries) and entries[pos].lblk < extent.end)
                or extent.end > limit):
            raise ValueError(f"inode {self.ino}: [{extent.lblk}, {extent.end}) is not a hole")
        entries.insert(pos, extent)
        self._merge_span(entries, pos, pos + 1)
        self._mark_dirty(leaf)
        self._settle(path, changed_end=min(pos + 1, len(entries)))

    def _to_written(self, extent: Extent, lo: int, hi: int) -> list[Extent]:
        if not extent.unwritten:
            return [extent]
        start = max(extent.lblk, lo)
        stop = min(extent.end, hi)
        pieces = []
        if extent.lblk < start:
            pieces.append(Extent(extent.lblk, start - extent.lblk, extent.pblk, True))
        pieces.append(Extent(start, stop - start, extent.pblk + (start - extent.lblk), False))
        if stop < extent.end:
            pieces.append(Extent(stop, extent.end - stop, extent.pblk + (stop - extent.lblk),
                                 True))
        return pieces

    def _edit_range(self, lo: int, hi: int,
                    transform: Callable[[Extent, int, int], list[Extent]], *,
                    merge: bool) -> bool:
        """Replace each extent overlapping [lo, hi) by `transform(extent, lo, hi)`, per leaf;
        whether anything changed."""
        changed = False
        cur = lo
        while cur < hi:  # each pass moves cur to the end of a leaf's key range
            path, limit = self._descend(cur)
            leaf = path[-1][0]
            stop = min(hi, limit)
            entries = leaf.entries
            first = bisect_right(entries, cur, key=_ENTRY_KEY) - 1
            if first < 0 or entries[first].end <= cur:
                first += 1
            last = first
            replacement: list[Extent] = []
            while last < len(entries) and entries[last].lblk < stop:
                replacement.extend(transform(entries[last], cur, stop))
                last += 1
            if last > first and replacement != entries[first:last]:
                entries[first:last] = replacement
                if merge:
                    self._merge_span(entries, first, first + len(replacement))
                self._mark_dirty(leaf)
                self._settle(path, changed_end=first + len(replacement))
                changed = True
            cur = stop
        return changed

    def _punch_range(self, lo: int, hi: int, freed: list[tuple[int, int]]) -> None:
        """Unmap [lo, hi) inside an operation, the freed data runs going to `freed`.

        In the kernel's order, for the same tree shape: first the extent
        reaching past `hi` is split there (which may grow the tree, and never
        merges it up: ext4_force_split_extent_at), then [lo, hi) is removed.
        """
        path, _ = self._descend(hi - 1)
        leaf = path[-1][0]
        slot = bisect_right(leaf.entries, hi - 1, key=_ENTRY_KEY) - 1
        if slot >= 0 and leaf.entries[slot].lblk < hi < leaf.entries[slot].end:
            self._edit_range(hi, hi + 1, _split_at, merge=False)
        self._edit_range(lo, hi, _remover(freed), merge=False)

    @staticmethod
    def _merge_span(entries: list[Extent], start: int, stop: int) -> None:
        """Merge contiguous neighbours among entries[start-1 : stop+1]."""
        slot = max(start - 1, 0)
        end = min(stop, len(entries) - 1)
        while slot < end:  # every pass merges one pair or moves on
            if _mergeable(entries[slot], entries[slot + 1]):
                left, right = entries[slot], entries[slot + 1]
                entries[slot] = Extent(left.lblk, left.length + right.length, left.pblk,
                                       left.unwritten)
                del entries[slot + 1]
                end -= 1
            else:
                slot += 1

    def _shift(self, start: int, delta: int) -> None:
        """Add `delta` to the logical start of every extent at or after `start`.

        The caller has made sure nothing lands on anything else: [start + delta,
        start) is a hole for a move down, and no extent straddles `start`. Keys
        keep their order, so only keys change: leaves in place, index keys
        recomputed from their children.
        """
        self._shift_node(self._root, 0, LBLK_LIMIT, start, delta)

    def _shift_node(self, node: _Node, first: int, limit: int, start: int, delta: int) -> None:
        entries = node.entries
        if node.depth == 0:
            at = bisect_left(entries, start, key=_ENTRY_KEY)
            if at == len(entries):
                return
            entries[at:] = [Extent(e.lblk + delta, e.length, e.pblk, e.unwritten)
                            for e in entries[at:]]
            if delta < 0:
                self._merge_span(entries, at, len(entries))
            self._mark_dirty(node)
            return
        # Child ranges come from the keys as they were before this shift (a
        # child is validated against them when read).
        moved: list[tuple[int, _Node, int, int]] = []
        for slot, index in enumerate(entries):
            child_limit = entries[slot + 1].lblk if slot + 1 < len(entries) else limit
            if child_limit <= start:
                continue  # everything below this entry lies before `start`
            child_first = max(first, index.lblk)
            child = self._child(index.child, node.depth - 1, child_first, child_limit)
            moved.append((slot, child, child_first, child_limit))
        for _slot, child, child_first, child_limit in moved:
            self._shift_node(child, child_first, child_limit, start, delta)
        for slot, child, _first, _limit in moved:
            key = child.entries[0].lblk
            if entries[slot].lblk != key:
                entries[slot] = ExtentIndex(key, entries[slot].child)
                self._mark_dirty(node)

    # -- tree shape ---------------------------------------------------------------------------

    def _descend(self, lblk: int) -> tuple[_Path, int]:
        """The path to the leaf whose key range holds `lblk` (or the first leaf), and the
        end of that range."""
        path: _Path = []
        node = self._root
        first, limit = 0, LBLK_LIMIT
        for _level in range(MAX_DEPTH + 1):  # depths strictly decrease on the way down
            if node.depth == 0:
                path.append((node, -1))
                return path, limit
            entries = node.entries
            slot = max(bisect_right(entries, lblk, key=_ENTRY_KEY) - 1, 0)
            first = max(first, entries[slot].lblk)
            if slot + 1 < len(entries):
                limit = min(limit, entries[slot + 1].lblk)
            path.append((node, slot))
            node = self._child(entries[slot].child, node.depth - 1, first, limit)
        raise Corrupt("extent tree", inode_where(self.ino), f"deeper than {MAX_DEPTH}")

    def _settle(self, path: _Path, *, changed_end: int) -> None:
        """Restore the shape rules bottom-up along `path` after its leaf changed;
        `changed_end` is the slot after the leaf's last new or changed entry."""
        for level in range(len(path) - 1, 0, -1):
            node = path[level][0]
            parent, slot = path[level - 1]
            assert node.block is not None
            if not node.entries:
                del parent.entries[slot]
                self._drop(node.block)
                self._mark_dirty(parent)
                continue
            key = node.entries[0].lblk
            if parent.entries[slot].lblk != key:
                parent.entries[slot] = ExtentIndex(key, node.block)
                self._mark_dirty(parent)
            if len(node.entries) > node.capacity:
                sibling = self._split(node, changed_end)
                parent.entries.insert(slot + 1, ExtentIndex(sibling.entries[0].lblk,
                                                            self._block_of(sibling)))
                self._mark_dirty(parent)
                changed_end = slot + 2  # the new index entry is the parent's change
        root = self._root
        if root.depth > 0 and not root.entries:
            root.depth = 0  # everything was removed: back to an empty in-inode leaf
        elif len(root.entries) > root.capacity:
            self._grow()

    def _split(self, node: _Node, changed_end: int) -> _Node:
        """Move the entries after the changed ones (or, when the change was at the
        end, the last entry) of an overfull node into a new block; returns it."""
        count = len(node.entries)
        at = changed_end if changed_end < count else count - 1
        at = min(max(at, count - node.capacity, 1), node.capacity)
        assert node.block is not None
        sibling = self._new_node(node.depth, goal=node.block + 1)
        sibling.entries = node.entries[at:]
        del node.entries[at:]
        self._mark_dirty(node)
        return sibling

    def _grow(self) -> None:
        """Move the root's entries into a new block below it; the tree grows one level."""
        root = self._root
        if root.depth + 1 > self._max_depth:
            raise NoSpace(f"inode {self.ino}: extent tree would exceed depth {self._max_depth}")
        child = self._new_node(root.depth, goal=self._goal_below(root))
        child.entries = root.entries
        root.entries = [ExtentIndex(child.entries[0].lblk, self._block_of(child))]
        root.depth += 1

    def _merge_up(self) -> None:
        """A depth-1 tree whose only leaf fits in the root moves back into the inode
        and the leaf is freed: the kernel's ext4_ext_try_to_merge_up, which runs
        after inserts and conversions (never after removals, so a punched or
        truncated tree keeps its depth, as the kernel's does)."""
        root = self._root
        if root.depth != 1 or len(root.entries) != 1:
            return
        index = root.entries[0]
        child = self._child(index.child, 0, index.lblk, LBLK_LIMIT)
        if len(child.entries) > root.capacity:
            return
        root.entries = list(child.entries)
        root.depth = 0
        assert child.block is not None
        self._drop(child.block)

    def _goal_below(self, node: _Node) -> int:
        """Where a new tree block under `node` should go: near what the node maps."""
        last = node.entries[-1]
        return last.pblk if node.depth == 0 else last.child

    # -- nodes --------------------------------------------------------------------------------

    def _parse_root(self, i_block: bytes) -> _Node:
        parsed = parse_extent_node(
            i_block, ino=self.ino, block=None, max_entries=ROOT_MAX_ENTRIES, expect_depth=None,
            first=0, limit=LBLK_LIMIT, csum_seed=self._csum_seed, check_run=self._check_run)
        if parsed.depth > self._max_depth:
            raise Corrupt("extent header", inode_where(self.ino) + " extent root",
                          f"depth {parsed.depth} > {self._max_depth}")
        entries = list(parsed.extents) if parsed.depth == 0 else list(parsed.indexes)
        return _Node(None, parsed.depth, parsed.header.max_entries, parsed.header.generation,
                     entries)

    def _child(self, block: int, depth: int, first: int, limit: int) -> _Node:
        node = self._nodes.get(block)
        if node is not None:
            if node.depth != depth or block in self._dropped:
                raise Corrupt("extent index", block_where(block, self.ino),
                              "block referenced twice in the tree")
            return node
        raw = self._read_meta(block)
        if len(raw) != self.block_size:
            raise Corrupt("extent block", block_where(block, self.ino),
                          f"read {len(raw)} bytes, expected {self.block_size}")
        parsed = self._parse(
            raw, ino=self.ino, block=block, max_entries=self._block_max, expect_depth=depth,
            first=first, limit=limit, csum_seed=self._csum_seed, check_run=self._check_run)
        if not parsed.keys:
            raise Corrupt("extent leaf", block_where(block, self.ino), "tree block without entries")
        entries = list(parsed.extents) if depth == 0 else list(parsed.indexes)
        node = _Node(block, depth, parsed.header.max_entries, parsed.header.generation, entries)
        self._nodes[block] = node
        return node

    def _new_node(self, depth: int, *, goal: int) -> _Node:
        block = self._alloc_block(goal)
        self._allocated.append(block)  # before anything can fail, so a rollback frees it
        self._check_run(block, 1)
        if block in self._nodes:
            raise Corrupt("extent tree", block_where(block, self.ino),
                          "allocator returned a block already in the tree")
        node = _Node(block, depth, self._block_max, 0, [])
        self._nodes[block] = node
        self._dirty.add(block)
        return node

    @staticmethod
    def _block_of(node: _Node) -> int:
        assert node.block is not None
        return node.block

    def _mark_dirty(self, node: _Node) -> None:
        if node.block is not None:
            self._dirty.add(node.block)

    def _drop(self, block: int) -> None:
        self._dropped.append(block)
        self._dirty.discard(block)

    def _encode(self, node: _Node) -> bytes:
        size = I_BLOCK_SIZE if node.block is None else self.block_size
        raw = bytearray(size)
        header = ExtentHeader(len(node.entries), node.capacity, node.depth, node.generation)
        raw[:12] = header.build()
        offset = 12
        for entry in node.entries:
            raw[offset:offset + 12] = entry.build()
            offset += 12
        if node.block is not None and self._csum_seed is not None:
            _TAIL.pack_into(raw, tail_offset(node.capacity),
                            extent_tail_checksum(self._csum_seed, raw, node.capacity))
        return bytes(raw)
