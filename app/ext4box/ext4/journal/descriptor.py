"""Descriptor blocks: the tags naming the filesystem block of each logged block.

Tag layouts (all big-endian), by journal features:
- csum v3: blocknr(4) flags(4) blocknr_high(4) checksum(4) — 16 bytes always;
- otherwise: blocknr(4) checksum(2, csum v2 only) flags(2) [blocknr_high(4) on 64bit];
  the csum v2 field is counted in the size, the high word only with 64bit.
In every layout the flags are the big-endian 16 bits at offset 6. A tag
without SAME_UUID is followed by a 16-byte UUID. With csum v2/v3 the block
ends in a 4-byte tail checksum that tags never overlap.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ext4box.ext4.format.checksum import crc32c_raw
from ext4box.ext4.journal.superblock import HEADER, JBD2_MAGIC, JournalSuperblock

FLAG_ESCAPE = 0x1  # the logged copy had its first 4 bytes zeroed: they were the jbd2 magic
FLAG_SAME_UUID = 0x2
FLAG_DELETED = 0x4
FLAG_LAST_TAG = 0x8
_UUID_BYTES = 16

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_MAGIC_BYTES = _BE32.pack(JBD2_MAGIC)


@dataclass(frozen=True, slots=True)
class BlockTag:
    target: int  # filesystem block the logged copy belongs to
    flags: int
    checksum: int  # 32 bits (v3), 16 bits (v2), 0 without checksums
    offset: int = 0  # of the tag inside its descriptor block

    @property
    def escaped(self) -> bool:
        return bool(self.flags & FLAG_ESCAPE)


def parse_tags(block: bytes, jsb: JournalSuperblock) -> tuple[BlockTag, ...]:
    """The tags of one descriptor block, walked as jbd2 does.

    The walk ends at LAST_TAG or where the next tag would not fit before the
    tail, so a tag count can never run past the block.
    """
    tag_bytes = jsb.tag_bytes
    limit = jsb.block_size - jsb.tail_bytes
    offset = HEADER.size
    tags: list[BlockTag] = []
    while offset + tag_bytes <= limit:
        (low,) = _BE32.unpack_from(block, offset)
        (flags,) = _BE16.unpack_from(block, offset + 6)
        high = _BE32.unpack_from(block, offset + 8)[0] if jsb.is_64bit else 0
        if jsb.csum_v3:
            (checksum,) = _BE32.unpack_from(block, offset + 12)
        elif jsb.csum_v2or3:
            (checksum,) = _BE16.unpack_from(block, offset + 4)
        else:
            checksum = 0
        tags.append(BlockTag(low | high << 32, flags, checksum, offset))
        offset += tag_bytes
        if not flags & FLAG_SAME_UUID:
            offset += _UUID_BYTES
        if flags & FLAG_LAST_TAG:
            break
    return tuple(tags)


def tail_checksum(block: bytes | bytearray, jsb: JournalSuperblock) -> int:
    """The v2/v3 tail checksum a descriptor or revoke block should carry."""
    tail = jsb.block_size - 4
    crc = crc32c_raw(jsb.csum_seed, memoryview(block)[:tail])
    return crc32c_raw(crc, b"\0\0\0\0")


def tail_checksum_ok(block: bytes, jsb: JournalSuperblock) -> bool:
    """The v2/v3 tail checksum of a descriptor or revoke block (True without checksums)."""
    if not jsb.csum_v2or3:
        return True
    (stored,) = _BE32.unpack_from(block, jsb.block_size - 4)
    return stored == tail_checksum(block, jsb)


def data_checksum(jsb: JournalSuperblock, sequence: int, data: bytes | bytearray) -> int:
    """The 32-bit checksum of a logged block as stored (escaped) in transaction `sequence`;
    a csum v2 tag keeps its low 16 bits."""
    crc = crc32c_raw(jsb.csum_seed, _BE32.pack(sequence & 0xFFFFFFFF))
    return crc32c_raw(crc, data)


def data_checksum_ok(tag: BlockTag, jsb: JournalSuperblock, sequence: int, data: bytes) -> bool:
    """Whether a logged block matches its tag's checksum (v2: low 16 bits; True without)."""
    if not jsb.csum_v2or3:
        return True
    crc = data_checksum(jsb, sequence, data)
    if jsb.csum_v3:
        return tag.checksum == crc
    return tag.checksum == crc & 0xFFFF


def unescape(data: bytes) -> bytes:
    """Put back the jbd2 magic jbd2 zeroed in a logged block that began with it."""
    return _MAGIC_BYTES + data[4:]


def restore_escaped(tag: BlockTag, data: bytes) -> bytes:
    """The filesystem block a logged copy stands for (the magic put back if escaped)."""
    return unescape(data) if tag.escaped else data
