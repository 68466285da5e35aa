"""The hashed directory index (htree): dx_root, dx_node, and which leaves hold a name.

Block 0 of an indexed directory is the dx_root: a "." record of 12 bytes, a
".." record spanning the rest of the block (so linear readers see an
ordinary block), then dx_root_info and a sorted array of (hash, block)
entries. The first entry's hash slot holds the (limit, count) pair instead
and covers hash 0. Interior dx_node blocks start with one empty record
spanning the whole block, then the same array. With metadata_csum a dx_tail
(reserved, crc32c) follows the `limit` entries.

Lookup walks from the root to a leaf by binary search on the hash, then, if
the name is not in that leaf, continues into following leaves while their
starting hash equals the name's hash (bit 0 of a stored hash marks "this
leaf continues a run of equal hashes").
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from ext4box.ext4.format import checksum
from ext4box.ext4.format.dir_block import DIR_RECORD, rec_len_from_disk
from ext4box.ext4.format.dir_hash import DX_HASH_SIPHASH, DX_HASH_TEA, dx_hash
from ext4box.ext4.format.errors import Corrupt, Unsupported, block_where

# reserved_zero, hash_version, info_length, indirect_levels, unused_flags
DX_ROOT_INFO = struct.Struct("<IBBBB")
DX_COUNT_LIMIT = struct.Struct("<HH")  # limit, count
DX_ENTRY = struct.Struct("<II")  # hash, block
DX_TAIL = struct.Struct("<II")  # reserved, checksum

DX_ROOT_INFO_OFFSET = 24  # after the "." (12) and ".." (12) records
DX_ROOT_INFO_LENGTH = DX_ROOT_INFO.size  # 8
DX_ROOT_ENTRIES_OFFSET = DX_ROOT_INFO_OFFSET + DX_ROOT_INFO_LENGTH  # 32
DX_NODE_ENTRIES_OFFSET = 8  # after the empty fake record header
DX_ENTRY_SIZE = DX_ENTRY.size
DX_TAIL_SIZE = DX_TAIL.size

# dx_root_info.unused_flags bit the kernel refuses (never implemented).
DX_FLAG_UNIMPLEMENTED = 0x1
HTREE_LEVELS_COMPAT = 2  # root + one node level above the leaves
HTREE_LEVELS_LARGE_DIR = 3


@dataclass(frozen=True, slots=True)
class DxEntry:
    hash: int  # lowest major hash this child covers (entry 0: implicitly 0)
    block: int  # logical block within the directory


@dataclass(frozen=True, slots=True)
class DxRoot:
    hash_version: int
    info_length: int
    indirect_levels: int
    unused_flags: int
    limit: int
    entries: tuple[DxEntry, ...]  # count = len(entries)
    # dx_tail's reserved word. Not always zero: when the kernel turns a leaf
    # into a root it leaves the old dirent tail's header there. It is checksummed.
    tail_reserved: int = 0


@dataclass(frozen=True, slots=True)
class DxNode:
    limit: int
    entries: tuple[DxEntry, ...]
    tail_reserved: int = 0  # see DxRoot.tail_reserved


def dx_root_limit(block_size: int, has_csum: bool) -> int:
    usable = block_size - DX_ROOT_ENTRIES_OFFSET - (DX_TAIL_SIZE if has_csum else 0)
    return usable // DX_ENTRY_SIZE


def dx_node_limit(block_size: int, has_csum: bool) -> int:
    usable = block_size - DX_NODE_ENTRIES_OFFSET - (DX_TAIL_SIZE if has_csum else 0)
    return usable // DX_ENTRY_SIZE


def dx_csum(csum_seed: int, block: bytes, entries_offset: int, count: int, limit: int) -> int:
    """crc32c of header+used entries, then the tail's reserved word and a zero checksum."""
    tail_at = entries_offset + limit * DX_ENTRY_SIZE
    used = entries_offset + count * DX_ENTRY_SIZE
    crc = checksum.crc32c_raw(csum_seed, block[:used])
    crc = checksum.crc32c_raw(crc, block[tail_at : tail_at + 4])
    return checksum.crc32c_raw(crc, b"\0\0\0\0")


def _where(ino: int, lblk: int) -> str:
    return f"{block_where(lblk, ino)} (logical)"


def _parse_entries(
    block: bytes,
    offset: int,
    *,
    what: str,
    ino: int,
    lblk: int,
    expected_limit: int,
    csum_seed: int | None,
) -> tuple[int, tuple[DxEntry, ...], int]:
    """(limit, entries, tail reserved word) at `offset`, checked against limit and csum."""
    where = _where(ino, lblk)
    limit, count = DX_COUNT_LIMIT.unpack_from(block, offset)
    if limit != expected_limit:
        raise Corrupt(what, where, f"limit {limit} != expected {expected_limit}")
    if count == 0 or count > limit:
        raise Corrupt(what, where, f"count {count} outside 1..limit {limit}")
    tail_reserved = 0
    if csum_seed is not None:
        tail_at = offset + limit * DX_ENTRY_SIZE
        if tail_at + DX_TAIL_SIZE > len(block):
            raise Corrupt(what, where, "no room for the dx_tail checksum")
        tail_reserved, stored = DX_TAIL.unpack_from(block, tail_at)
        computed = dx_csum(csum_seed, block, offset, count, limit)
        if stored != computed:
            raise Corrupt(what, where, f"checksum {stored:#010x} != computed {computed:#010x}")
    first_block = DX_ENTRY.unpack_from(block, offset)[1]
    entries = [DxEntry(0, first_block)]
    previous = 0
    for i in range(1, count):
        hash_, child = DX_ENTRY.unpack_from(block, offset + i * DX_ENTRY_SIZE)
        if hash_ < previous:
            raise Corrupt(what, where, f"entry {i} hash {hash_:#x} below previous {previous:#x}")
        previous = hash_
        entries.append(DxEntry(hash_, child))
    return limit, tuple(entries), tail_reserved


# Parsed index blocks, keyed by their bytes and every other input of the parse:
# each create or unlink walks the index two or three times (EEXIST search,
# insert, the lookup before it), and a 4 KiB root is ~500 entries to unpack
# and checksum. A hit is what parsing the same bytes again gives; a corrupt
# block raises every time (exceptions are not cached). Each entry holds a block
# and its entry tuple: ~40 KiB at 4 KiB blocks, 16x that at 64 KiB.
_DX_MEMO_ENTRIES = 32


def parse_dx_root(
    block: bytes, *, ino: int, block_size: int, csum_seed: int | None, large_dir: bool = False
) -> DxRoot:
    """The dx_root of block 0 of directory `ino` (Corrupt when it is not a valid one)."""
    if type(block) is bytes:
        return _dx_root_memo(block, ino, block_size, csum_seed, large_dir)
    return _parse_dx_root(block, ino, block_size, csum_seed, large_dir)


def _parse_dx_root(
    block: bytes, ino: int, block_size: int, csum_seed: int | None, large_dir: bool
) -> DxRoot:
    where = _where(ino, 0)
    if len(block) != block_size:
        raise Corrupt("dx_root", where, f"block of {len(block)} bytes, expected {block_size}")
    dot_ino, dot_len, dot_name_len, _ = DIR_RECORD.unpack_from(block, 0)
    _, dotdot_len, dotdot_name_len, _ = DIR_RECORD.unpack_from(block, 12)
    if (
        dot_len != 12
        or dot_name_len != 1
        or block[8:9] != b"."
        or dotdot_name_len != 2
        or block[20:22] != b".."
        or rec_len_from_disk(dotdot_len, block_size) != block_size - 12
        or dot_ino != ino
    ):
        raise Corrupt("dx_root", where, "'.' and '..' records do not frame an index root")
    reserved, hash_version, info_length, levels, flags = DX_ROOT_INFO.unpack_from(
        block, DX_ROOT_INFO_OFFSET
    )
    if reserved != 0 or info_length != DX_ROOT_INFO_LENGTH:
        why = f"bad root info (reserved {reserved}, length {info_length})"
        raise Corrupt("dx_root", where, why)
    if hash_version == DX_HASH_SIPHASH:
        raise Unsupported("siphash directory hash", where, "casefolded directory")
    if hash_version > DX_HASH_TEA:
        raise Corrupt("dx_root", where, f"unknown hash version {hash_version}")
    if flags & DX_FLAG_UNIMPLEMENTED:
        raise Corrupt("dx_root", where, f"unimplemented flags {flags:#x}")
    max_levels = HTREE_LEVELS_LARGE_DIR if large_dir else HTREE_LEVELS_COMPAT
    if levels >= max_levels:
        raise Corrupt("dx_root", where, f"indirect_levels {levels} >= {max_levels}")
    limit, entries, tail_reserved = _parse_entries(
        block,
        DX_ROOT_ENTRIES_OFFSET,
        what="dx_root",
        ino=ino,
        lblk=0,
        expected_limit=dx_root_limit(block_size, csum_seed is not None),
        csum_seed=csum_seed,
    )
    return DxRoot(hash_version, info_length, levels, flags, limit, entries, tail_reserved)


def is_dx_node_block(block: bytes, block_size: int) -> bool:
    """Does this block start like an interior index node (one empty record spanning it)?"""
    inode, rec_len, name_len, _ = DIR_RECORD.unpack_from(block, 0)
    return inode == 0 and name_len == 0 and rec_len_from_disk(rec_len, block_size) == block_size


_dx_root_memo = lru_cache(maxsize=_DX_MEMO_ENTRIES)(_parse_dx_root)


def parse_dx_node(
    block: bytes, *, ino: int, lblk: int, block_size: int, csum_seed: int | None
) -> DxNode:
    """The interior index node at logical block `lblk` of directory `ino`."""
    if type(block) is bytes:
        return _dx_node_memo(block, ino, lblk, block_size, csum_seed)
    return _parse_dx_node(block, ino, lblk, block_size, csum_seed)


def _parse_dx_node(
    block: bytes, ino: int, lblk: int, block_size: int, csum_seed: int | None
) -> DxNode:
    where = _where(ino, lblk)
    if len(block) != block_size:
        raise Corrupt("dx_node", where, f"block of {len(block)} bytes, expected {block_size}")
    if not is_dx_node_block(block, block_size):
        raise Corrupt("dx_node", where, "does not start with an empty block-sized record")
    limit, entries, tail_reserved = _parse_entries(
        block,
        DX_NODE_ENTRIES_OFFSET,
        what="dx_node",
        ino=ino,
        lblk=lblk,
        expected_limit=dx_node_limit(block_size, csum_seed is not None),
        csum_seed=csum_seed,
    )
    return DxNode(limit, entries, tail_reserved)


_dx_node_memo = lru_cache(maxsize=_DX_MEMO_ENTRIES)(_parse_dx_node)


def _pack_entries(buf: bytearray, offset: int, limit: int, entries: tuple[DxEntry, ...]) -> None:
    DX_COUNT_LIMIT.pack_into(buf, offset, limit, len(entries))
    struct.pack_into("<I", buf, offset + 4, entries[0].block)
    for i, entry in enumerate(entries[1:], start=1):
        DX_ENTRY.pack_into(buf, offset + i * DX_ENTRY_SIZE, entry.hash, entry.block)


def _seal(
    buf: bytearray, offset: int, limit: int, count: int, csum_seed: int | None, reserved: int
) -> bytes:
    if csum_seed is not None:
        tail_at = offset + limit * DX_ENTRY_SIZE
        DX_TAIL.pack_into(buf, tail_at, reserved, 0)
        csum = dx_csum(csum_seed, bytes(buf), offset, count, limit)
        DX_TAIL.pack_into(buf, tail_at, reserved, csum)
    return bytes(buf)


def build_dx_root(
    root: DxRoot,
    *,
    ino: int,
    parent_ino: int,
    block_size: int,
    csum_seed: int | None,
    dot_file_type: int = 2,
) -> bytes:
    """Serialise a dx_root block; unused entry slots are zero."""
    buf = bytearray(block_size)
    DIR_RECORD.pack_into(buf, 0, ino, 12, 1, dot_file_type)
    buf[8:9] = b"."
    DIR_RECORD.pack_into(buf, 12, parent_ino, block_size - 12, 2, dot_file_type)
    buf[20:22] = b".."
    DX_ROOT_INFO.pack_into(
        buf,
        DX_ROOT_INFO_OFFSET,
        0,
        root.hash_version,
        root.info_length,
        root.indirect_levels,
        root.unused_flags,
    )
    _pack_entries(buf, DX_ROOT_ENTRIES_OFFSET, root.limit, root.entries)
    return _seal(
        buf, DX_ROOT_ENTRIES_OFFSET, root.limit, len(root.entries), csum_seed, root.tail_reserved
    )


def build_dx_node(node: DxNode, *, block_size: int, csum_seed: int | None) -> bytes:
    buf = bytearray(block_size)
    # The fake record's rec_len is the whole block (64 KiB blocks encode it specially).
    DIR_RECORD.pack_into(buf, 0, 0, block_size if block_size < 65536 else 65535, 0, 0)
    _pack_entries(buf, DX_NODE_ENTRIES_OFFSET, node.limit, node.entries)
    return _seal(
        buf, DX_NODE_ENTRIES_OFFSET, node.limit, len(node.entries), csum_seed, node.tail_reserved
    )


def child_index(entries: Sequence[DxEntry], hash_: int) -> int:
    """Index of the last entry whose hash is <= hash_ (entry 0 covers from 0)."""
    lo, hi = 1, len(entries) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if entries[mid].hash > hash_:
            hi = mid - 1
        else:
            lo = mid + 1
    return lo - 1


class HtreeIndex:
    """A directory's parsed index; finds the leaf blocks that may hold a name.

    `read_lblk` returns a logical block of the directory (None for a hole).
    Every index error raises Corrupt; callers may then fall back to a linear scan.
    """

    def __init__(
        self,
        *,
        ino: int,
        block_size: int,
        nblocks: int,
        read_lblk: Callable[[int], bytes | None],
        csum_seed: int | None,
        hash_seed: tuple[int, int, int, int] | None,
        unsigned_hash: bool,
        large_dir: bool = False,
    ) -> None:
        self.ino = ino
        self.block_size = block_size
        self.nblocks = nblocks
        self._read_lblk = read_lblk
        self._csum_seed = csum_seed
        self._hash_seed = hash_seed
        self._unsigned_hash = unsigned_hash
        root_block = self._read(0, "dx_root")
        self.root = parse_dx_root(
            root_block, ino=ino, block_size=block_size, csum_seed=csum_seed, large_dir=large_dir
        )

    def _read(self, lblk: int, what: str) -> bytes:
        where = _where(self.ino, lblk)
        if not 0 <= lblk < self.nblocks:
            raise Corrupt(what, where, f"block beyond directory size ({self.nblocks} blocks)")
        block = self._read_lblk(lblk)
        if block is None:
            raise Corrupt(what, where, "hole in an indexed directory")
        return block

    def hash_name(self, name: bytes) -> tuple[int, int]:
        return dx_hash(name, self.root.hash_version, self._hash_seed, self._unsigned_hash)

    def read_node(self, lblk: int, path: list[int]) -> DxNode:
        """Read an interior node reached via the blocks in `path` (cycle-checked)."""
        if lblk == 0 or lblk in path:
            raise Corrupt("dx_node", _where(self.ino, lblk), "index points back into its own path")
        block = self._read(lblk, "dx_node")
        return parse_dx_node(
            block, ino=self.ino, lblk=lblk, block_size=self.block_size, csum_seed=self._csum_seed
        )

    def _check_leaf(self, lblk: int, path: list[int]) -> int:
        if lblk == 0 or lblk in path or not 0 <= lblk < self.nblocks:
            raise Corrupt("dx leaf pointer", _where(self.ino, path[-1]), f"bad leaf block {lblk}")
        return lblk

    def leaf_blocks(self, name: bytes) -> Iterator[int]:
        """Leaf blocks to search for `name`, in order: the hashed leaf, then continuations.

        Lazy: the caller stops pulling once the name is found. Bounded: every
        step moves forward through finite entry arrays of bounded depth.
        """
        major, _ = self.hash_name(name)
        # Each frame: (block, entries, position). frames[0] is the root.
        frames: list[tuple[int, tuple[DxEntry, ...], int]] = []
        entries, lblk = self.root.entries, 0
        for level in range(self.root.indirect_levels + 1):
            at = child_index(entries, major)
            frames.append((lblk, entries, at))
            child = entries[at].block
            if level < self.root.indirect_levels:
                entries = self.read_node(child, [f[0] for f in frames]).entries
                lblk = child
        yield self._check_leaf(frames[-1][1][frames[-1][2]].block, [f[0] for f in frames])
        # A leaf may be followed by more leaves holding the same hash. A sane
        # index never sends us to more leaves than the directory has blocks.
        for _ in range(self.nblocks):
            depth = len(frames) - 1
            while depth >= 0 and frames[depth][2] + 1 >= len(frames[depth][1]):
                depth -= 1
            if depth < 0:
                return
            blk, ents, at = frames[depth]
            at += 1
            if ents[at].hash & ~1 != major:
                return
            frames[depth] = (blk, ents, at)
            for below in range(depth + 1, len(frames)):
                _, parent_entries, parent_at = frames[below - 1]
                child = parent_entries[parent_at].block
                node = self.read_node(child, [f[0] for f in frames[:below]])
                frames[below] = (child, node.entries, 0)
            yield self._check_leaf(frames[-1][1][frames[-1][2]].block, [f[0] for f in frames])
        raise Corrupt("dx index", _where(self.ino, 0), "hash continuation runs past the directory")

    def walk(self) -> Iterator[tuple[int, int, DxEntry]]:
        """Every index entry, depth first: (level, block holding it, entry). For checks/tests."""
        stack: list[tuple[int, int, tuple[DxEntry, ...], list[int]]] = [
            (0, 0, self.root.entries, [0])
        ]
        while stack:
            level, blk, entries, path = stack.pop()
            for entry in entries:
                yield level, blk, entry
            if level < self.root.indirect_levels:
                for entry in reversed(entries):
                    node = self.read_node(entry.block, path)
                    stack.append((level + 1, entry.block, node.entries, [*path, entry.block]))
