"""Records in one linear directory block (ext4_dir_entry_2) and its checksum tail.

A directory block is a chain of variable-length records that exactly tiles
the block: each record's rec_len says where the next one starts, and a
record with inode 0 is free space. With metadata_csum the last 12 bytes are
a fake, always-empty record (ext4_dir_entry_tail, file_type 0xDE) whose
last word is crc32c(inode seed, block before the tail).

The same record parser also reads inline directories, whose record areas
are not block-sized and carry no tail.
"""

from __future__ import annotations

import re
import struct
import threading
from bisect import bisect_left
from collections import OrderedDict
from operator import itemgetter
from typing import NamedTuple

from ext4box.ext4.format import checksum
from ext4box.ext4.format.errors import Corrupt, block_where

# inode, rec_len, name_len, file_type; the name follows.
DIR_RECORD = struct.Struct("<IHBB")
# The 12-byte checksum tail: reserved_zero1, rec_len (12), reserved_zero2, 0xDE, checksum.
DIR_TAIL = struct.Struct("<IHBBI")
DIR_TAIL_SIZE = DIR_TAIL.size
DIR_TAIL_FILE_TYPE = 0xDE

DIR_RECORD_HEADER = DIR_RECORD.size  # 8
MIN_REC_LEN = 12  # header plus the smallest 4-byte-rounded name
MAX_NAME_LEN = 255

EXT4_FT_UNKNOWN = 0
EXT4_FT_REG_FILE = 1
EXT4_FT_DIR = 2
EXT4_FT_CHRDEV = 3
EXT4_FT_BLKDEV = 4
EXT4_FT_FIFO = 5
EXT4_FT_SOCK = 6
EXT4_FT_SYMLINK = 7
EXT4_FT_MAX = 8


class DirEntry(NamedTuple):
    """A live name in a directory."""

    inode: int
    name: bytes
    file_type: int  # EXT4_FT_*; 0 when the filetype feature is off


class DirRecord(NamedTuple):
    """One raw record of a block, live or free, as needed to rewrite the block later.

    A NamedTuple, not a dataclass: a directory block holds ~200 of them and
    building them is most of the cost of parsing one; being immutable, parsed
    lists can be shared through `ParsedBlockCache`. Change one with `_replace`.
    """

    offset: int
    inode: int
    rec_len: int
    name: bytes
    file_type: int

    @property
    def is_live(self) -> bool:
        return self.inode != 0

    def entry(self) -> DirEntry:
        return DirEntry(self.inode, self.name, self.file_type)


def dir_rec_len(name_len: int) -> int:
    """Smallest rec_len holding a name of `name_len` bytes (header + name, 4-aligned)."""
    return (DIR_RECORD_HEADER + name_len + 3) & ~3


def rec_len_from_disk(raw: int, block_size: int) -> int:
    """Decode rec_len; 64 KiB blocks store 65536 as 0/65535 and borrow the low 2 bits."""
    if block_size < 65536:
        return raw
    if raw in (0, 65535):
        return block_size
    return (raw & 65532) | ((raw & 3) << 16)


def rec_len_to_disk(rec_len: int, block_size: int) -> int:
    if block_size < 65536:
        return rec_len
    if rec_len == 65536:
        return 65535 if block_size == 65536 else 0
    return (rec_len & 65532) | ((rec_len >> 16) & 3)


def dir_block_csum(csum_seed: int, block: bytes | bytearray | memoryview) -> int:
    """crc32c of everything before the 12-byte tail, chained from the inode's seed."""
    return checksum.crc32c_raw(csum_seed, memoryview(block)[: len(block) - DIR_TAIL_SIZE])


def _where(ino: int, lblk: int) -> str:
    return f"{block_where(lblk, ino)} (logical)"


def _check_tail(block: bytes, *, ino: int, lblk: int, csum_seed: int) -> None:
    tail_at = len(block) - DIR_TAIL_SIZE
    zero1, rec_len, zero2, file_type, stored = DIR_TAIL.unpack_from(block, tail_at)
    if zero1 != 0 or rec_len != DIR_TAIL_SIZE or zero2 != 0 or file_type != DIR_TAIL_FILE_TYPE:
        raise Corrupt(
            "directory block tail", _where(ino, lblk), "metadata_csum block has no checksum tail"
        )
    computed = dir_block_csum(csum_seed, block)
    if stored != computed:
        raise Corrupt(
            "directory block",
            _where(ino, lblk),
            f"checksum {stored:#010x} != computed {computed:#010x}",
        )


def parse_dir_records(
    area: bytes | bytearray | memoryview,
    *,
    ino: int,
    lblk: int,
    has_filetype: bool,
    csum_seed: int | None,
    max_ino: int | None = None,
    block_size: int | None = None,
) -> list[DirRecord]:
    """All records (live and free) of a block or inline record area, in order.

    With `csum_seed` the area is a whole block ending in a checksum tail; the
    tail is verified and not returned. Records must tile the area exactly.
    """
    data = bytes(area)
    size = len(data)
    if csum_seed is not None:
        if size < MIN_REC_LEN + DIR_TAIL_SIZE:
            raise Corrupt("directory block", _where(ino, lblk), f"block of {size} bytes too small")
        _check_tail(data, ino=ino, lblk=lblk, csum_seed=csum_seed)
        size -= DIR_TAIL_SIZE
    decode_size = block_size if block_size is not None else len(data)
    # rec_len needs decoding only for 64 KiB blocks; everything else stores it as is.
    wide = decode_size >= 65536
    inode_limit = max_ino if max_ino is not None else 0xFFFFFFFF
    unpack = DIR_RECORD.unpack_from
    # tuple.__new__ skips the NamedTuple's Python-level __new__ (half the per-record cost).
    new_record = tuple.__new__
    records: list[DirRecord] = []
    append = records.append
    offset = 0
    # Each record is >= 12 bytes, so this loop runs at most size/12 times.
    while offset < size:
        if offset + DIR_RECORD_HEADER > size:
            raise Corrupt(
                "directory entry", _where(ino, lblk), f"record header at {offset} overruns area"
            )
        inode, rec_len, name_len, file_type = unpack(data, offset)
        if wide:
            rec_len = rec_len_from_disk(rec_len, decode_size)
        end = offset + rec_len
        # One test for the common, well-formed record; _record_fault says what is wrong.
        if not (
            rec_len >= MIN_REC_LEN
            and (DIR_RECORD_HEADER + name_len + 3) & ~3 <= rec_len
            and not rec_len & 3
            and end <= size
            and (inode == 0 or (name_len and inode <= inode_limit))
        ):
            why = _record_fault(rec_len, name_len, inode, offset, size, max_ino)
            raise Corrupt("directory entry", f"{_where(ino, lblk)} offset {offset}", why)
        name_at = offset + DIR_RECORD_HEADER
        append(
            new_record(
                DirRecord,
                (offset, inode, rec_len, data[name_at : name_at + name_len],
                 file_type if has_filetype else 0),
            )
        )  # fmt: skip
        offset = end
    return records


def _record_fault(
    rec_len: int, name_len: int, inode: int, offset: int, size: int, max_ino: int | None
) -> str:
    """Why a record failed parse_dir_records' combined check, first rule first."""
    if rec_len < MIN_REC_LEN:
        return f"rec_len {rec_len} below minimum {MIN_REC_LEN}"
    if rec_len % 4:
        return f"rec_len {rec_len} not a multiple of 4"
    if offset + rec_len > size:
        return f"rec_len {rec_len} overruns the {size}-byte area"
    if rec_len < dir_rec_len(name_len):
        return f"rec_len {rec_len} too small for name_len {name_len}"
    if inode != 0 and name_len == 0:
        return "live entry with empty name"
    return f"inode {inode} beyond inode count {max_ino}"


def parse_dir_block(
    block: bytes | bytearray | memoryview,
    *,
    ino: int,
    lblk: int,
    has_filetype: bool,
    csum_seed: int | None,
    max_ino: int | None = None,
) -> list[tuple[int, DirEntry]]:
    """(offset in block, entry) of each live entry of one linear directory block."""
    records = parse_dir_records(
        block,
        ino=ino,
        lblk=lblk,
        has_filetype=has_filetype,
        csum_seed=csum_seed,
        max_ino=max_ino,
    )
    return [(rec.offset, rec.entry()) for rec in records if rec.inode != 0]


def pack_dir_record(
    inode: int, rec_len: int, name: bytes, file_type: int, *, block_size: int = 4096
) -> bytes:
    """One record: header, name, zero padding up to rec_len."""
    if not 0 < len(name) <= MAX_NAME_LEN and inode != 0:
        raise ValueError("name length out of range")
    if rec_len < dir_rec_len(len(name)) or rec_len % 4:
        raise ValueError(f"rec_len {rec_len} cannot hold a {len(name)}-byte name")
    header = DIR_RECORD.pack(inode, rec_len_to_disk(rec_len, block_size), len(name), file_type)
    return (header + name).ljust(rec_len, b"\0")


def pack_records(records: list[DirRecord], block_size: int) -> bytes:
    """pack_dir_record over a list, in one pass (a block's ~200 records are on the
    hot path of every create and unlink); same checks, same bytes."""
    pack = DIR_RECORD.pack
    wide = block_size >= 65536
    parts: list[bytes] = []
    add = parts.append
    for inode, rec_len, name, file_type in [r[1:] for r in records]:
        name_len = len(name)
        if (name_len > MAX_NAME_LEN or not name_len) and inode != 0:
            raise ValueError("name length out of range")
        if rec_len < (DIR_RECORD_HEADER + name_len + 3) & ~3 or rec_len & 3:
            raise ValueError(f"rec_len {rec_len} cannot hold a {name_len}-byte name")
        disk_len = rec_len_to_disk(rec_len, block_size) if wide else rec_len
        add(pack(inode, disk_len, name_len, file_type))
        add(name)
        add(bytes(rec_len - DIR_RECORD_HEADER - name_len))
    return b"".join(parts)


def splice_dir_block(
    old: ParsedBlock, records: list[DirRecord], *, block_size: int, csum_seed: int | None
) -> bytes | None:
    """build_dir_block(records), taking the records that did not change from `old`.

    `old` must be canonical (its bytes are build_dir_block of its records):
    the unchanged leading and trailing records then already have exactly the
    bytes a full build would give them, and only the ones between are packed.
    None when the change is not a simple middle section (build in full then).
    """
    spliced = splice_dir_block_span(old, records, block_size=block_size, csum_seed=csum_seed)
    return None if spliced is None else spliced[0]


def splice_dir_block_span(
    old: ParsedBlock, records: list[DirRecord], *, block_size: int, csum_seed: int | None
) -> tuple[bytes, int, int] | None:
    """splice_dir_block, also saying how many leading and trailing records of
    `old` were kept: (block, head, tail), for ParsedBlock.inherit."""
    if not old.canonical:
        return None
    before = old.records
    count = min(len(before), len(records))
    # Unchanged records are mostly the very objects `old` holds (writers copy
    # its list): `is` answers those without comparing five fields each.
    head = 0
    while head < count and (records[head] is before[head] or records[head] == before[head]):
        head += 1
    tail = 0
    last, last_before = len(records) - 1, len(before) - 1
    while tail < count - head and (
        records[last - tail] is before[last_before - tail]
        or records[last - tail] == before[last_before - tail]
    ):
        tail += 1
    changed = records[head : len(records) - tail]
    area = block_size - (DIR_TAIL_SIZE if csum_seed is not None else 0)
    start = changed[0].offset if changed else area
    end = records[len(records) - tail].offset if tail else area
    after_head = records[head - 1].offset + records[head - 1].rec_len if head else 0
    middle = pack_records(changed, block_size)
    if start != after_head or len(middle) != end - start or len(old.block) != block_size:
        return None
    body = old.block[:start] + middle + old.block[end:area]
    if csum_seed is not None:
        body += pack_dir_tail(dir_block_csum(csum_seed, body + pack_dir_tail(0)))
    return body, head, tail


def pack_dir_tail(csum: int) -> bytes:
    return DIR_TAIL.pack(0, DIR_TAIL_SIZE, 0, DIR_TAIL_FILE_TYPE, csum)


def build_dir_block(records: list[DirRecord], *, block_size: int, csum_seed: int | None) -> bytes:
    """Serialise records (which must tile the block, less the tail) and seal the tail.

    Name bytes beyond name_len and padding are written as zeros, so an image
    that left garbage in padding does not round-trip byte for byte there.
    """
    body = pack_records(records, block_size)
    expected = block_size - (DIR_TAIL_SIZE if csum_seed is not None else 0)
    if len(body) != expected:
        raise ValueError(f"records cover {len(body)} bytes, block needs {expected}")
    if csum_seed is None:
        return body
    block = body + pack_dir_tail(0)
    return body + pack_dir_tail(dir_block_csum(csum_seed, block))


_OFFSET = itemgetter(0)  # DirRecord.offset, for bisect
# A record's room in 4-byte units, capped at one byte: names need at most
# dir_rec_len(255) = 264 bytes (66 units), so the cap never hides a fit.
_ROOM_UNITS_CAP = 255
_fit_patterns: dict[int, re.Pattern[bytes]] = {}


def _room_units(records: tuple[DirRecord, ...] | list[DirRecord]) -> bytes:
    """Per record, the bytes a new record could take from it (find_slot's rule) / 4."""
    cap = _ROOM_UNITS_CAP
    return bytes([
        min(cap, max(0, rec_len if inode == 0 else rec_len - ((len(name) + 11) & ~3)) >> 2)
        for _, inode, rec_len, name, _ in records
    ])  # fmt: skip


def _fit_pattern(units: int) -> re.Pattern[bytes]:
    """A regex matching one room byte >= `units` (1..255): first fit at C speed."""
    pattern = _fit_patterns.get(units)
    if pattern is None:
        pattern = re.compile(b"[" + re.escape(bytes([units])) + b"-\xff]")
        _fit_patterns[units] = pattern
    return pattern


class ParsedBlock:
    """The records of one directory block, with a by-name index and a free-room
    summary, each built on first use or carried over from the block it was
    edited from (`inherit`), so an edit costs no pass over the whole block."""

    __slots__ = ("_names", "_rooms", "block", "canonical", "records")

    def __init__(
        self, block: bytes, records: tuple[DirRecord, ...], *, canonical: bool = False
    ) -> None:
        self.block = block
        self.records = records
        # True when `block` is exactly build_dir_block(records) (we wrote it):
        # then rebuilding it after a change only needs the changed records.
        self.canonical = canonical
        # Name -> offset of its live record; kept only when every live name is
        # unique (a corrupt block with duplicates is indexed by `_scan_names`).
        self._names: dict[bytes, int] | None = None
        # _room_units(records): room of each record, for first_fit.
        self._rooms: bytes | None = None

    def find(self, name: bytes) -> int | None:
        """Index of the first live record named `name` (as a front-to-back scan finds it)."""
        names = self._names
        if names is None:
            names = self._scan_names()
            if names is None:
                return self._find_by_scan(name)
        offset = names.get(name)
        if offset is None:
            return None
        # Offsets tile the block in order: the record is found by bisection.
        return bisect_left(self.records, offset, key=_OFFSET)

    def first_fit(self, need: int) -> int | None:
        """find_slot(records, need): the first record with room for `need` bytes."""
        units = (need + 3) >> 2
        if not 0 < units <= _ROOM_UNITS_CAP:
            return _first_fit_by_scan(self.records, need)
        rooms = self._rooms
        if rooms is None:
            rooms = self._rooms = _room_units(self.records)
        match = _fit_pattern(units).search(rooms)
        return None if match is None else match.start()

    def inherit(self, old: ParsedBlock, head: int, tail: int) -> None:
        """Take `old`'s name index and room summary, updated for this block, whose
        records are old's first `head` and last `tail` ones around a changed
        middle (as splice_dir_block_span reported)."""
        old_end = len(old.records) - tail
        new_end = len(self.records) - tail
        old_middle = old.records[head:old_end]
        new_middle = self.records[head:new_end]
        if old._rooms is not None:
            self._rooms = old._rooms[:head] + _room_units(new_middle) + old._rooms[old_end:]
        if old._names is not None:
            names = old._names.copy()
            for record in old_middle:
                if record.inode != 0:
                    del names[record.name]  # unique names: it mapped to this record
            for record in new_middle:
                if record.inode != 0:
                    if record.name in names:
                        return  # a duplicate: leave the index to a scan
                    names[record.name] = record.offset
            self._names = names

    def _scan_names(self) -> dict[bytes, int] | None:
        """Build the name index; None (and no index) when a live name repeats."""
        live = [record for record in self.records if record.inode != 0]
        names = {record.name: record.offset for record in live}
        if len(names) != len(live):
            return None
        self._names = names
        return names

    def _find_by_scan(self, name: bytes) -> int | None:
        for i, record in enumerate(self.records):
            if record.inode != 0 and record.name == name:
                return i
        return None


def _first_fit_by_scan(records: tuple[DirRecord, ...], need: int) -> int | None:
    for i, (_, inode, rec_len, name, _) in enumerate(records):
        if (rec_len if inode == 0 else rec_len - ((len(name) + 11) & ~3)) >= need:
            return i
    return None


class ParsedBlockCache:
    """A bounded LRU of parsed directory blocks: every lookup, create and unlink
    parses the blocks it visits, ~200 records each.

    An entry answers only for a block whose bytes equal the ones it was parsed
    from, and its key holds every other input of the parse, so it is exactly
    what `parse_dir_records` would return: whoever changed a block (or reused
    an inode number), a stale entry is never used. Writers `remember` the
    block they just built from its records, so the next lookup needs no parse.
    """

    def __init__(self, capacity: int, *, has_filetype: bool, max_ino: int, block_size: int):
        self.capacity = max(1, capacity)
        self.has_filetype = has_filetype
        self.max_ino = max_ino
        self.block_size = block_size
        self._items: OrderedDict[tuple[int, int, int | None], ParsedBlock] = OrderedDict()
        self._lock = threading.Lock()

    def serves(self, *, has_filetype: bool, max_ino: int, block_size: int) -> bool:
        """Whether this cache was built for a reader with these parse parameters."""
        return (self.has_filetype, self.max_ino, self.block_size) == (
            has_filetype, max_ino, block_size)

    def parse(self, block: bytes, *, ino: int, lblk: int, csum_seed: int | None) -> ParsedBlock:
        """The records of a whole block of directory `ino` (Corrupt as parse_dir_records)."""
        key = (ino, lblk, csum_seed)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and (hit.block is block or hit.block == block):
                self._items.move_to_end(key)
                return hit
        records = parse_dir_records(
            block, ino=ino, lblk=lblk, has_filetype=self.has_filetype, csum_seed=csum_seed,
            max_ino=self.max_ino, block_size=self.block_size,
        )  # fmt: skip
        parsed = ParsedBlock(bytes(block), tuple(records))
        self._put(key, parsed)
        return parsed

    def remember(
        self, block: bytes, records: list[DirRecord], *, ino: int, lblk: int,
        csum_seed: int | None, spliced_from: tuple[ParsedBlock, int, int] | None = None,
    ) -> None:  # fmt: skip
        """`block` was just built from `records` by build_dir_block: keep them as its parse.

        Only records in the form the parser returns are kept (offsets tiling
        the block from 0, file types zero without the filetype feature);
        anything else is left for the next parse to read from the bytes.
        With `spliced_from` (the entry the block was spliced from, and the
        head and tail splice_dir_block_span kept) its index and room summary
        carry over instead of being rebuilt.
        """
        offset = 0
        for rec in records:
            if rec.offset != offset or (rec.file_type and not self.has_filetype):
                self.forget(ino, lblk, csum_seed)
                return
            offset += rec.rec_len
        parsed = ParsedBlock(block, tuple(records), canonical=True)
        if spliced_from is not None:
            parsed.inherit(*spliced_from)
        self._put((ino, lblk, csum_seed), parsed)

    def peek(self, ino: int, lblk: int, csum_seed: int | None) -> ParsedBlock | None:
        """The entry for a block, whatever bytes the block holds now (the caller checks)."""
        with self._lock:
            return self._items.get((ino, lblk, csum_seed))

    def forget(self, ino: int, lblk: int, csum_seed: int | None) -> None:
        with self._lock:
            self._items.pop((ino, lblk, csum_seed), None)

    def _put(self, key: tuple[int, int, int | None], parsed: ParsedBlock) -> None:
        with self._lock:
            self._items[key] = parsed
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
