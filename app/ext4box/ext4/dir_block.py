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

import struct
from dataclasses import dataclass

from . import checksum
from .errors import Corrupt, block_where

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


@dataclass(frozen=True, slots=True)
class DirEntry:
    """A live name in a directory."""

    inode: int
    name: bytes
    file_type: int  # EXT4_FT_*; 0 when the filetype feature is off


@dataclass(frozen=True, slots=True)
class DirRecord:
    """One raw record of a block, live or free, as needed to rewrite the block later."""

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
    records: list[DirRecord] = []
    offset = 0
    # Each record is >= 12 bytes, so this loop runs at most size/12 times.
    while offset < size:
        if offset + DIR_RECORD_HEADER > size:
            raise Corrupt(
                "directory entry", _where(ino, lblk), f"record header at {offset} overruns area"
            )
        inode, raw_rec_len, name_len, file_type = DIR_RECORD.unpack_from(data, offset)
        rec_len = rec_len_from_disk(raw_rec_len, decode_size)
        why = None
        if rec_len < MIN_REC_LEN:
            why = f"rec_len {rec_len} below minimum {MIN_REC_LEN}"
        elif rec_len % 4:
            why = f"rec_len {rec_len} not a multiple of 4"
        elif offset + rec_len > size:
            why = f"rec_len {rec_len} overruns the {size}-byte area"
        elif rec_len < dir_rec_len(name_len):
            why = f"rec_len {rec_len} too small for name_len {name_len}"
        elif inode != 0 and name_len == 0:
            why = "live entry with empty name"
        elif inode != 0 and max_ino is not None and inode > max_ino:
            why = f"inode {inode} beyond inode count {max_ino}"
        if why is not None:
            raise Corrupt("directory entry", f"{_where(ino, lblk)} offset {offset}", why)
        name = data[offset + DIR_RECORD_HEADER : offset + DIR_RECORD_HEADER + name_len]
        records.append(DirRecord(offset, inode, rec_len, name, file_type if has_filetype else 0))
        offset += rec_len
    return records


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


def pack_dir_tail(csum: int) -> bytes:
    return DIR_TAIL.pack(0, DIR_TAIL_SIZE, 0, DIR_TAIL_FILE_TYPE, csum)


def build_dir_block(records: list[DirRecord], *, block_size: int, csum_seed: int | None) -> bytes:
    """Serialise records (which must tile the block, less the tail) and seal the tail.

    Name bytes beyond name_len and padding are written as zeros, so an image
    that left garbage in padding does not round-trip byte for byte there.
    """
    body = b"".join(
        pack_dir_record(r.inode, r.rec_len, r.name, r.file_type, block_size=block_size)
        for r in records
    )
    expected = block_size - (DIR_TAIL_SIZE if csum_seed is not None else 0)
    if len(body) != expected:
        raise ValueError(f"records cover {len(body)} bytes, block needs {expected}")
    if csum_seed is None:
        return body
    block = body + pack_dir_tail(0)
    return body + pack_dir_tail(dir_block_csum(csum_seed, block))
