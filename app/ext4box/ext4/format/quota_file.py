"""Where one id's quota usage and limits live in a quota file, and how an id is added.

The hidden quota inodes of the `quota` feature hold files in the VFS v2
format, revision 1 (QFMT_VFS_V1), made of 1 KiB quota blocks:

- block 0: an 8-byte header (magic per quota type, version 1) and, at byte 8,
  the info: block and inode grace periods, flags, the number of quota blocks
  in the file, the head of the list of free blocks and the head of the list
  of data blocks that still have a free entry;
- block 1: the root of a radix tree of depth 4; a tree block is 256 little-
  endian block numbers indexed by one byte of the id (most significant
  first); the last level points at data blocks;
- data blocks: a 16-byte header (next/previous in their free list, number of
  entries) and 14 entries of 72 bytes (id, limits, usage, grace deadlines).
  Block limits are counted in 1 KiB units, usage in bytes. An entry of all
  zero bytes is unused; a used entry that would be all zero (id 0, nothing
  counted) gets an inode grace time of 1, as the kernel and e2fsprogs do.

The file is reached through two callbacks on quota block numbers, so this
module knows nothing of inodes or the device. Every number read from the file
is checked before it is followed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

from ext4box.ext4.format.errors import Corrupt

QUOTA_BLOCK_SIZE = 1024
USRQUOTA, GRPQUOTA, PRJQUOTA = 0, 1, 2
QUOTA_TYPE_NAMES = {USRQUOTA: "user", GRPQUOTA: "group", PRJQUOTA: "project"}
MAGICS = {USRQUOTA: 0xD9C01F11, GRPQUOTA: 0xD9C01927, PRJQUOTA: 0xD9C03F14}
VERSION_V1 = 1
TREE_ROOT = 1
TREE_DEPTH = 4
_REFS_PER_BLOCK = QUOTA_BLOCK_SIZE // 4

_HEADER = struct.Struct("<II")  # magic, version
_INFO = struct.Struct("<IIIIII")  # bgrace, igrace, flags, blocks, free_blk, free_entry
_INFO_OFFSET = _HEADER.size
_DATA_HEADER = struct.Struct("<IIHHI")  # next_free, prev_free, entries, pad, pad
_ENTRY = struct.Struct("<IIQQQQQQQQ")
ENTRIES_PER_BLOCK = (QUOTA_BLOCK_SIZE - _DATA_HEADER.size) // _ENTRY.size
_EMPTY_ENTRY = bytes(_ENTRY.size)
# A quota file is small (a tree block per id at most); more blocks than this is damage.
MAX_QUOTA_BLOCKS = 1 << 24

ReadBlock = Callable[[int], bytes]
WriteBlock = Callable[[int, bytes], None]


@dataclass(frozen=True, slots=True)
class Dquot:
    """One id's entry: limits (block limits in 1 KiB units), usage, grace deadlines."""

    qid: int
    ihardlimit: int = 0
    isoftlimit: int = 0
    curinodes: int = 0
    bhardlimit: int = 0
    bsoftlimit: int = 0
    curspace: int = 0  # bytes
    btime: int = 0  # seconds since the epoch: when the block soft limit stops being soft
    itime: int = 0


@dataclass(frozen=True, slots=True)
class QuotaInfo:
    bgrace: int
    igrace: int
    flags: int
    blocks: int
    free_blk: int
    free_entry: int


@dataclass(frozen=True, slots=True)
class EntryPos:
    """Where an entry lives: quota block and slot in it."""

    block: int
    slot: int

    @property
    def offset(self) -> int:
        return _DATA_HEADER.size + self.slot * _ENTRY.size


def encode_entry(dquot: Dquot) -> bytes:
    raw = _ENTRY.pack(dquot.qid, 0, dquot.ihardlimit, dquot.isoftlimit, dquot.curinodes,
                      dquot.bhardlimit, dquot.bsoftlimit, dquot.curspace, dquot.btime,
                      dquot.itime)
    if raw == _EMPTY_ENTRY:  # would read as unused: mark it used
        raw = encode_entry(replace(dquot, itime=1))
    return raw


def parse_entry(raw: bytes) -> Dquot:
    qid, _, ihard, isoft, curinodes, bhard, bsoft, curspace, btime, itime = _ENTRY.unpack(raw)
    if (qid, ihard, isoft, curinodes, bhard, bsoft, curspace, btime, itime) == (
            0, 0, 0, 0, 0, 0, 0, 0, 1):
        itime = 0  # the "used" mark of an otherwise empty entry
    return Dquot(qid, ihard, isoft, curinodes, bhard, bsoft, curspace, btime, itime)


class QuotaFile:
    """One quota file in the v2r1 tree format: find, read, write and add entries.

    `write_block(n, data)` may be asked for block `info.blocks` (one past the
    end): the file then grows by one quota block."""

    def __init__(self, qtype: int, read_block: ReadBlock, write_block: WriteBlock, *,
                 where: str, capacity: int) -> None:
        """`capacity`: how many quota blocks the file's size holds (its i_size / 1 KiB)."""
        self.qtype = qtype
        self.where = where
        self._read = read_block
        self._write = write_block
        head = read_block(0)
        magic, version = _HEADER.unpack_from(head, 0)
        if magic != MAGICS[qtype] or version != VERSION_V1:
            raise Corrupt("quota file", where,
                          f"header {magic:#x} v{version} is not a v2r1 "
                          f"{QUOTA_TYPE_NAMES[qtype]} quota file")
        self.info = QuotaInfo(*_INFO.unpack_from(head, _INFO_OFFSET))
        if not TREE_ROOT < self.info.blocks <= min(capacity, MAX_QUOTA_BLOCKS):
            raise Corrupt("quota file", where,
                          f"{self.info.blocks} blocks in a file of {capacity}")
        for name in ("free_blk", "free_entry"):
            self._check_ref(getattr(self.info, name), name)

    # ---- reading ---------------------------------------------------------

    def find(self, qid: int) -> EntryPos | None:
        """Where `qid`'s entry is, or None when the file has none."""
        block = TREE_ROOT
        for depth in range(TREE_DEPTH):
            ref = self._tree_ref(block, qid, depth)
            if ref == 0:
                return None
            self._check_ref(ref, f"tree reference at depth {depth}")
            block = ref
        raw = self._block(block)
        for slot in range(ENTRIES_PER_BLOCK):
            pos = EntryPos(block, slot)
            entry = raw[pos.offset : pos.offset + _ENTRY.size]
            if entry != _EMPTY_ENTRY and _ENTRY.unpack_from(entry)[0] == qid:
                return pos
        raise Corrupt("quota file", self.where, f"id {qid} missing from data block {block}")

    def read(self, pos: EntryPos) -> Dquot:
        raw = self._block(pos.block)
        return parse_entry(raw[pos.offset : pos.offset + _ENTRY.size])

    def entries(self) -> list[Dquot]:
        """Every entry of the file (for tests and tools), in tree order; each block is
        read at most once, so a damaged tree cannot make this loop long."""
        found: list[Dquot] = []
        seen: set[int] = set()
        self._walk(TREE_ROOT, 0, found, seen)
        return found

    # ---- writing ---------------------------------------------------------

    def write(self, pos: EntryPos, dquot: Dquot) -> None:
        raw = bytearray(self._block(pos.block))
        raw[pos.offset : pos.offset + _ENTRY.size] = encode_entry(dquot)
        self._write(pos.block, bytes(raw))

    def set_grace(self, bgrace: int, igrace: int) -> None:
        if not (0 <= bgrace < 1 << 32 and 0 <= igrace < 1 << 32):
            raise ValueError(f"grace periods {bgrace}, {igrace} out of range")
        self._set_info(bgrace=bgrace, igrace=igrace)

    def add(self, dquot: Dquot) -> EntryPos:
        """Add an entry for an id the file does not have; tree and data blocks come
        from the file's free list or grow the file."""
        qid = dquot.qid
        block = TREE_ROOT
        for depth in range(TREE_DEPTH - 1):
            ref = self._tree_ref(block, qid, depth)
            if ref == 0:
                ref = self._new_block()
                self._set_tree_ref(block, qid, depth, ref)
            else:
                self._check_ref(ref, f"tree reference at depth {depth}")
            block = ref
        if self._tree_ref(block, qid, TREE_DEPTH - 1):
            raise Corrupt("quota file", self.where, f"id {qid} added twice")
        pos = self._free_entry(qid)
        self.write(pos, dquot)
        self._set_tree_ref(block, qid, TREE_DEPTH - 1, pos.block)
        return pos

    # ---- the tree ----------------------------------------------------------

    @staticmethod
    def _index(qid: int, depth: int) -> int:
        return (qid >> ((TREE_DEPTH - 1 - depth) * 8)) & 0xFF

    def _tree_ref(self, block: int, qid: int, depth: int) -> int:
        return int(struct.unpack_from("<I", self._block(block), 4 * self._index(qid, depth))[0])

    def _set_tree_ref(self, block: int, qid: int, depth: int, ref: int) -> None:
        raw = bytearray(self._block(block))
        struct.pack_into("<I", raw, 4 * self._index(qid, depth), ref)
        self._write(block, bytes(raw))

    def _walk(self, block: int, depth: int, found: list[Dquot], seen: set[int]) -> None:
        raw = self._block(block)
        refs = struct.unpack(f"<{_REFS_PER_BLOCK}I", raw)
        for ref in refs:
            if ref == 0:
                continue
            self._check_ref(ref, f"tree reference at depth {depth}")
            if ref in seen:  # shared only in a damaged file: each block is read once
                continue
            seen.add(ref)
            if depth < TREE_DEPTH - 1:
                self._walk(ref, depth + 1, found, seen)  # depth is bounded by TREE_DEPTH
            else:
                data = self._block(ref)
                for slot in range(ENTRIES_PER_BLOCK):
                    offset = EntryPos(ref, slot).offset
                    entry = data[offset : offset + _ENTRY.size]
                    if entry != _EMPTY_ENTRY:
                        found.append(parse_entry(entry))

    # ---- free lists --------------------------------------------------------

    def _new_block(self) -> int:
        """A zeroed block: the head of the free-block list, or one past the end."""
        info = self.info
        if info.free_blk:
            block = info.free_blk
            next_free = _DATA_HEADER.unpack_from(self._block(block))[0]
            self._check_ref(next_free, "free block list")
            self._set_info(free_blk=next_free)
        else:
            if info.blocks >= MAX_QUOTA_BLOCKS:
                raise Corrupt("quota file", self.where, "would grow past its bound")
            block = info.blocks
            self._set_info(blocks=block + 1)
        self._write(block, bytes(QUOTA_BLOCK_SIZE))
        return block

    def _free_entry(self, qid: int) -> EntryPos:
        """A free slot for `qid`: in the first data block with room, or a new one.
        The block's entry count includes the slot on return."""
        block = self.info.free_entry
        if block == 0:
            block = self._new_block()
            self._link_free_entry(block)
        raw = bytearray(self._block(block))
        next_free, prev_free, count, _, _ = _DATA_HEADER.unpack_from(raw)
        if count >= ENTRIES_PER_BLOCK:
            raise Corrupt("quota file", self.where, f"full data block {block} on the free list")
        for slot in range(ENTRIES_PER_BLOCK):
            pos = EntryPos(block, slot)
            if raw[pos.offset : pos.offset + _ENTRY.size] == _EMPTY_ENTRY:
                break
        else:
            raise Corrupt("quota file", self.where, f"data block {block} has no free slot")
        count += 1
        if count == ENTRIES_PER_BLOCK:
            self._unlink_free_entry(block, next_free, prev_free)
            raw = bytearray(self._block(block))
            next_free = prev_free = 0
        _DATA_HEADER.pack_into(raw, 0, next_free, prev_free, count, 0, 0)
        # Mark the slot used now (the caller writes the entry itself next).
        raw[pos.offset : pos.offset + _ENTRY.size] = encode_entry(Dquot(qid))
        self._write(block, bytes(raw))
        return pos

    def _link_free_entry(self, block: int) -> None:
        head = self.info.free_entry
        raw = bytearray(self._block(block))
        _DATA_HEADER.pack_into(raw, 0, head, 0, 0, 0, 0)
        self._write(block, bytes(raw))
        if head:
            self._set_header_link(head, prev_free=block)
        self._set_info(free_entry=block)

    def _unlink_free_entry(self, block: int, next_free: int, prev_free: int) -> None:
        if next_free:
            self._check_ref(next_free, "free entry list")
            self._set_header_link(next_free, prev_free=prev_free)
        if prev_free:
            self._check_ref(prev_free, "free entry list")
            self._set_header_link(prev_free, next_free=next_free)
        else:
            self._set_info(free_entry=next_free)

    def _set_header_link(self, block: int, *, next_free: int | None = None,
                         prev_free: int | None = None) -> None:
        raw = bytearray(self._block(block))
        old_next, old_prev, count, pad1, pad2 = _DATA_HEADER.unpack_from(raw)
        _DATA_HEADER.pack_into(raw, 0, old_next if next_free is None else next_free,
                               old_prev if prev_free is None else prev_free, count, pad1, pad2)
        self._write(block, bytes(raw))

    def _set_info(self, **changes: int) -> None:
        self.info = replace(self.info, **changes)
        raw = bytearray(self._block(0))
        info = self.info
        _INFO.pack_into(raw, _INFO_OFFSET, info.bgrace, info.igrace, info.flags, info.blocks,
                        info.free_blk, info.free_entry)
        self._write(0, bytes(raw))

    # ---- checked access ----------------------------------------------------

    def _check_ref(self, ref: int, what: str) -> None:
        if ref and not TREE_ROOT < ref < self.info.blocks:
            raise Corrupt("quota file", self.where,
                          f"{what} {ref} outside blocks 2..{self.info.blocks - 1}")

    def _block(self, block: int) -> bytes:
        raw = self._read(block)
        if len(raw) != QUOTA_BLOCK_SIZE:
            raise Corrupt("quota file", self.where, f"quota block {block} is short")
        return raw
