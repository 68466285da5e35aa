"""Extent trees: which physical blocks hold a range of an extent-mapped file.

The tree's root lives in the inode's 60-byte i_block field (a header and up to
four entries); deeper nodes are whole blocks ending in a crc32c tail when
metadata_csum is on. Index nodes point to children covering a key range; leaf
nodes hold extents (logical start, length, physical start; lengths above 32768
mark unwritten extents).

Every node is validated as it is read: magic, entry counts against the space
the node has, depth exactly one less than its parent, keys strictly sorted and
inside the range the parent gave the node, extents non-overlapping, physical
runs accepted by the caller's `check_run`. Lookups descend one path with
binary search; whole-tree walks refuse a block reached twice, so a tree that
points back into itself ends in `Corrupt`, never in a hang.

The structure layouts (`ExtentHeader`, `ExtentIndex`, `Extent`) can also build
their bytes, and `extent_tail_checksum` computes a block's tail, for the
write side.
"""

from __future__ import annotations

import struct
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ext4box.ext4.format.blockrun import BlockRun, RunChecker, append_merged
from ext4box.ext4.format.checksum import crc32c_raw
from ext4box.ext4.format.errors import Corrupt, block_where, inode_where

EXTENT_MAGIC = 0xF30A
EXTENT_NODE_HEADER_SIZE = 12
EXTENT_ENTRY_SIZE = 12
EXTENT_TAIL_SIZE = 4
I_BLOCK_SIZE = 60
ROOT_MAX_ENTRIES = (I_BLOCK_SIZE - EXTENT_NODE_HEADER_SIZE) // EXTENT_ENTRY_SIZE  # 4
MAX_DEPTH = 5  # the kernel's limit; deeper trees cannot address more than 2^32 blocks anyway
INIT_MAX_LEN = 1 << 15  # ee_len values above this mark unwritten extents
UNWRITTEN_MAX_LEN = INIT_MAX_LEN - 1
LBLK_LIMIT = 1 << 32  # logical block numbers are 32-bit
PBLK_LIMIT = 1 << 48  # physical block numbers are 48-bit

# eh_magic, eh_entries, eh_max, eh_depth, eh_generation
_HEADER = struct.Struct("<HHHHI")
# ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused
_INDEX = struct.Struct("<IIHH")
# ee_block, ee_len, ee_start_hi, ee_start_lo
_LEAF = struct.Struct("<IHHI")
_TAIL = struct.Struct("<I")

# How many parsed nodes a mapper keeps: enough for one root-to-leaf path.
_NODE_CACHE_SIZE = MAX_DEPTH + 2


def block_max_entries(block_size: int) -> int:
    """Entries that fit in a tree block while leaving room for the checksum tail."""
    return (block_size - EXTENT_NODE_HEADER_SIZE) // EXTENT_ENTRY_SIZE


def tail_offset(max_entries: int) -> int:
    return EXTENT_NODE_HEADER_SIZE + EXTENT_ENTRY_SIZE * max_entries


def extent_tail_checksum(csum_seed: int, block: bytes | bytearray, max_entries: int) -> int:
    """The crc32c a tree block's tail must hold (covers header and all eh_max slots)."""
    return crc32c_raw(csum_seed, memoryview(block)[: tail_offset(max_entries)])


@dataclass(frozen=True, slots=True)
class ExtentHeader:
    entries: int
    max_entries: int
    depth: int
    generation: int

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview) -> tuple[int, ExtentHeader]:
        """Returns (magic, header) so the caller can name the node in its error."""
        magic, entries, max_entries, depth, generation = _HEADER.unpack_from(raw, 0)
        return magic, cls(entries, max_entries, depth, generation)

    def build(self) -> bytes:
        return _HEADER.pack(EXTENT_MAGIC, self.entries, self.max_entries, self.depth,
                            self.generation)


@dataclass(frozen=True, slots=True)
class ExtentIndex:
    lblk: int  # first logical block covered by the child
    child: int  # physical block of the child node

    def build(self) -> bytes:
        return _INDEX.pack(self.lblk, self.child & 0xFFFFFFFF, self.child >> 32, 0)


@dataclass(frozen=True, slots=True)
class Extent:
    lblk: int
    length: int
    pblk: int
    unwritten: bool

    @property
    def end(self) -> int:
        return self.lblk + self.length

    @property
    def raw_len(self) -> int:
        return self.length + INIT_MAX_LEN if self.unwritten else self.length

    def build(self) -> bytes:
        return _LEAF.pack(self.lblk, self.raw_len, self.pblk >> 32, self.pblk & 0xFFFFFFFF)

    def run(self) -> BlockRun:
        return BlockRun(self.lblk, self.length, self.pblk, self.unwritten)


@dataclass(frozen=True, slots=True)
class ExtentNode:
    """One validated tree node with the key range its parent assigned to it."""

    block: int | None  # None: the root inside the inode
    header: ExtentHeader
    first: int  # lowest logical block this node may describe
    limit: int  # one past the highest
    keys: tuple[int, ...]  # first logical block of each entry, for bisect
    indexes: tuple[ExtentIndex, ...]  # entries of an index node (depth > 0)
    extents: tuple[Extent, ...]  # entries of a leaf (depth 0)

    @property
    def depth(self) -> int:
        return self.header.depth

    def child_range(self, slot: int) -> tuple[int, int]:
        """The [first, limit) range the child at `slot` must stay inside."""
        nxt = slot + 1
        return self.keys[slot], self.keys[nxt] if nxt < len(self.keys) else self.limit


def parse_extent_node(
    raw: bytes | bytearray | memoryview,
    *,
    ino: int,
    block: int | None,
    max_entries: int,
    expect_depth: int | None,
    first: int,
    limit: int,
    csum_seed: int | None,
    check_run: RunChecker,
) -> ExtentNode:
    """Parse and validate one node; `block` None means the in-inode root.

    `max_entries` is the capacity of the space the node lives in;
    `expect_depth` None accepts any depth up to MAX_DEPTH (the root).
    """
    where = inode_where(ino) + " extent root" if block is None else block_where(block, ino)
    if len(raw) < EXTENT_NODE_HEADER_SIZE + EXTENT_ENTRY_SIZE * max_entries:
        raise Corrupt("extent node", where, f"only {len(raw)} bytes")
    magic, header = ExtentHeader.parse(raw)
    if magic != EXTENT_MAGIC:
        raise Corrupt("extent header", where, f"bad magic {magic:#06x}")
    if not 1 <= header.max_entries <= max_entries:
        raise Corrupt("extent header", where,
                      f"eh_max {header.max_entries} does not fit space for {max_entries}")
    if block is not None and csum_seed is not None:
        tail = tail_offset(header.max_entries)
        (stored,) = _TAIL.unpack_from(raw, tail)
        computed = crc32c_raw(csum_seed, memoryview(raw)[:tail])
        if stored != computed:
            raise Corrupt("extent block", where,
                          f"checksum {stored:#010x} != computed {computed:#010x}")
    if header.entries > header.max_entries:
        raise Corrupt("extent header", where,
                      f"eh_entries {header.entries} > eh_max {header.max_entries}")
    if expect_depth is None:
        if header.depth > MAX_DEPTH:
            raise Corrupt("extent header", where, f"depth {header.depth} > {MAX_DEPTH}")
    elif header.depth != expect_depth:
        raise Corrupt("extent header", where,
                      f"depth {header.depth}, parent expects {expect_depth}")
    body = memoryview(raw)[EXTENT_NODE_HEADER_SIZE:
                           EXTENT_NODE_HEADER_SIZE + EXTENT_ENTRY_SIZE * header.entries]
    if header.depth > 0:
        if header.entries == 0:
            raise Corrupt("extent index", where, "index node without entries")
        indexes = _parse_indexes(body, where, first, limit, check_run)
        keys = tuple(index.lblk for index in indexes)
        return ExtentNode(block, header, first, limit, keys, indexes, ())
    extents = _parse_leaf(body, where, first, limit, check_run)
    keys = tuple(extent.lblk for extent in extents)
    return ExtentNode(block, header, first, limit, keys, (), extents)


def _parse_indexes(body: memoryview, where: str, first: int, limit: int,
                   check_run: RunChecker) -> tuple[ExtentIndex, ...]:
    indexes = []
    lowest = first
    for slot, (lblk, leaf_lo, leaf_hi, _unused) in enumerate(_INDEX.iter_unpack(body)):
        if lblk < lowest or lblk >= limit:
            raise Corrupt("extent index", where,
                          f"entry {slot} key {lblk} outside [{lowest}, {limit})")
        child = (leaf_hi << 32) | leaf_lo
        check_run(child, 1)
        indexes.append(ExtentIndex(lblk, child))
        lowest = lblk + 1  # keys strictly increase
    return tuple(indexes)


def _parse_leaf(body: memoryview, where: str, first: int, limit: int,
                check_run: RunChecker) -> tuple[Extent, ...]:
    extents = []
    lowest = first
    for slot, (lblk, raw_len, start_hi, start_lo) in enumerate(_LEAF.iter_unpack(body)):
        unwritten = raw_len > INIT_MAX_LEN
        length = raw_len - INIT_MAX_LEN if unwritten else raw_len
        if length == 0:
            raise Corrupt("extent", where, f"entry {slot} has length 0")
        if lblk < lowest or lblk + length > limit:
            raise Corrupt("extent", where,
                          f"entry {slot} [{lblk}, {lblk + length}) outside [{lowest}, {limit})"
                          " (unsorted, overlapping or outside the index range)")
        pblk = (start_hi << 32) | start_lo
        check_run(pblk, length)
        extents.append(Extent(lblk, length, pblk, unwritten))
        lowest = lblk + length
    return tuple(extents)


class ExtentNodeCache:
    """A bounded LRU of parsed extent-tree blocks, shared by every mapper and tree
    writer of one filesystem: a deep tree's mapper is rebuilt after each store of
    its inode, and a random write parsed the same 340-extent leaf three times
    (mapping, write_begin's mapper, the tree writer). An entry answers only for
    the exact bytes it was parsed from, and its key holds every other input of
    the parse (check_run is the filesystem's, fixed per cache), so a hit is what
    `parse_extent_node` would return. In-inode roots are not kept (60 bytes)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._items: OrderedDict[tuple[int, int, int, int, int | None, int | None, int],
                                 tuple[bytes, ExtentNode]] = OrderedDict()
        self._lock = threading.Lock()

    def parse(self, raw: bytes | bytearray | memoryview, *, ino: int, block: int | None,
              max_entries: int, expect_depth: int | None, first: int, limit: int,
              csum_seed: int | None, check_run: RunChecker) -> ExtentNode:
        """parse_extent_node, answered from the cache when these bytes were parsed."""
        if block is None:
            return parse_extent_node(raw, ino=ino, block=None, max_entries=max_entries,
                                     expect_depth=expect_depth, first=first, limit=limit,
                                     csum_seed=csum_seed, check_run=check_run)
        key = (ino, block, first, limit, expect_depth, csum_seed, max_entries)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and (hit[0] is raw or hit[0] == raw):
                self._items.move_to_end(key)
                return hit[1]
        node = parse_extent_node(raw, ino=ino, block=block, max_entries=max_entries,
                                 expect_depth=expect_depth, first=first, limit=limit,
                                 csum_seed=csum_seed, check_run=check_run)
        with self._lock:
            self._items[key] = (bytes(raw), node)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return node


NodeParser = Callable[..., ExtentNode]


class ExtentMapper:
    """Maps logical blocks of one extent-mapped inode to block runs."""

    def __init__(self, *, ino: int, i_block: bytes, read_block: Callable[[int], bytes],
                 block_size: int, csum_seed: int | None, check_run: RunChecker,
                 parse: NodeParser = parse_extent_node) -> None:
        if len(i_block) != I_BLOCK_SIZE:
            raise ValueError(f"i_block must be {I_BLOCK_SIZE} bytes, got {len(i_block)}")
        self.ino = ino
        self.block_size = block_size
        self._read_block = read_block
        self._csum_seed = csum_seed
        self._check_run = check_run
        self._block_max = block_max_entries(block_size)
        self._parse = parse  # parse_extent_node, or a shared ExtentNodeCache's
        self.root = parse_extent_node(
            i_block, ino=ino, block=None, max_entries=ROOT_MAX_ENTRIES, expect_depth=None,
            first=0, limit=LBLK_LIMIT, csum_seed=csum_seed, check_run=check_run)
        # Parsed nodes keyed by where they were reached from, so a block reached with
        # another range or depth is validated again rather than trusted from cache.
        self._nodes: dict[tuple[int, int, int, int], ExtentNode] = {}
        # The last [first, limit) span looked up and its leaf (None: a gap before
        # an index node's first child), so sequential map() calls skip the descent.
        self._last_span: tuple[int, int, ExtentNode | None] | None = None

    @property
    def depth(self) -> int:
        return self.root.depth

    def invalidate(self) -> None:
        """Forget cached nodes (for a future writer that changes the tree)."""
        self._nodes.clear()
        self._last_span = None

    def _child(self, parent: ExtentNode, slot: int) -> ExtentNode:
        block = parent.indexes[slot].child
        first, limit = parent.child_range(slot)
        depth = parent.depth - 1
        key = (block, first, limit, depth)
        node = self._nodes.pop(key, None)
        if node is not None:
            self._nodes[key] = node  # most recently used goes last
            return node
        raw = self._read_block(block)
        if len(raw) != self.block_size:
            raise Corrupt("extent block", block_where(block, self.ino),
                          f"read {len(raw)} bytes, expected {self.block_size}")
        node = self._parse(
            raw, ino=self.ino, block=block, max_entries=self._block_max, expect_depth=depth,
            first=first, limit=limit, csum_seed=self._csum_seed, check_run=self._check_run)
        if len(self._nodes) >= _NODE_CACHE_SIZE:
            del self._nodes[next(iter(self._nodes))]  # least recently used
        self._nodes[key] = node
        return node

    def _lookup(self, lblk: int) -> tuple[int, int, ExtentNode | None]:
        """The leaf whose range holds `lblk`, with that range; None for an unmapped gap."""
        span = self._last_span
        if span is not None and span[0] <= lblk < span[1]:
            return span
        node = self.root
        # Each step goes one level down and depths are checked, so this ends
        # within MAX_DEPTH steps even on a tree that points back into itself.
        while node.depth > 0:
            slot = bisect_right(node.keys, lblk) - 1
            if slot < 0:
                span = (node.first, node.keys[0], None)
                break
            node = self._child(node, slot)
        else:
            span = (node.first, node.limit, node)
        self._last_span = span
        return span

    def map(self, lblk: int, count: int) -> list[BlockRun]:
        """Runs tiling [lblk, lblk + count) exactly, holes included, merged when contiguous."""
        if lblk < 0 or count < 0:
            raise ValueError(f"bad range {lblk}+{count}")
        runs: list[BlockRun] = []
        cur = lblk
        end = lblk + count
        while cur < end:
            if cur >= LBLK_LIMIT:
                append_merged(runs, BlockRun(cur, end - cur, None))
                break
            _first, limit, leaf = self._lookup(cur)
            stop = min(end, limit)
            if leaf is None:
                append_merged(runs, BlockRun(cur, stop - cur, None))
                cur = stop
                continue
            cur = _map_in_leaf(leaf.extents, bisect_right(leaf.keys, cur) - 1, cur, stop, runs)
        return runs

    def _walk(self) -> Iterator[ExtentNode]:
        """Every node in key order (pre-order); a block reached twice is Corrupt."""
        seen: set[int] = set()
        yield self.root
        # Pending children as (parent, slot), rightmost on the bottom so the
        # leftmost pops first; children load only when visited.
        stack = [(self.root, slot) for slot in range(len(self.root.indexes) - 1, -1, -1)]
        while stack:
            parent, slot = stack.pop()
            block = parent.indexes[slot].child
            if block in seen:
                raise Corrupt("extent index", block_where(block, self.ino),
                              "block referenced twice in the tree")
            seen.add(block)
            node = self._child(parent, slot)
            yield node
            stack.extend((node, child) for child in range(len(node.indexes) - 1, -1, -1))

    def extents(self) -> Iterator[BlockRun]:
        """Every on-disk extent in logical order (not merged), for FIEMAP and SEEK_DATA."""
        for node in self._walk():
            for extent in node.extents:
                yield extent.run()

    def tree_blocks(self) -> list[int]:
        """Index and leaf blocks of the tree (the root in the inode is not one)."""
        return [node.block for node in self._walk() if node.block is not None]


def _map_in_leaf(extents: tuple[Extent, ...], slot: int, cur: int, stop: int,
                 runs: list[BlockRun]) -> int:
    """Emit runs for [cur, stop) from one leaf; `slot` is the last extent starting <= cur."""
    count = len(extents)
    while cur < stop:
        if slot >= 0 and cur < extents[slot].end:
            extent = extents[slot]
            piece_end = min(extent.end, stop)
            append_merged(runs, BlockRun(cur, piece_end - cur,
                                         extent.pblk + (cur - extent.lblk), extent.unwritten))
        else:
            nxt = slot + 1
            piece_end = min(extents[nxt].lblk, stop) if nxt < count else stop
            if piece_end > cur:
                append_merged(runs, BlockRun(cur, piece_end - cur, None))
            slot = nxt
        cur = piece_end
    return cur
