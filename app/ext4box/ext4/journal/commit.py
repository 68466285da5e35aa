"""Commit blocks: the end of a transaction, its time and checksums.

Layout after the 12-byte header (big-endian): chksum_type(1) chksum_size(1)
pad(2) chksum[8](4 each) commit_sec(8) commit_nsec(4). With csum v2/v3,
chksum[0] is a crc32c of the whole block (that word zeroed); with the v1
COMPAT_CHECKSUM feature it is a crc32_be over the transaction's descriptor
and data blocks, type 1 and size 4.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ext4box.ext4.format.checksum import crc32c_raw
from ext4box.ext4.journal.superblock import JournalSuperblock

CHECKSUM_TYPE_CRC32 = 1
CHECKSUM_SIZE_CRC32 = 4
_BODY = struct.Struct(">BB2xI28xQI")  # type, size, chksum[0], (chksum[1..7]), sec, nsec
_BODY_OFFSET = 12
CHECKSUM_OFFSET = 16
TIME = struct.Struct(">QI")  # commit_sec, commit_nsec
TIME_OFFSET = 0x30
_MASK32 = 0xFFFFFFFF
# crc32_be is the bit-reflection of the reflected crc32 zlib computes: reverse
# the bits of every input byte and of the register on the way in and out.
_BIT_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


@dataclass(frozen=True, slots=True)
class CommitBlock:
    checksum_type: int
    checksum_size: int
    checksum: int  # chksum[0]
    commit_sec: int
    commit_nsec: int

    @classmethod
    def parse(cls, block: bytes) -> CommitBlock:
        ctype, csize, checksum, sec, nsec = _BODY.unpack_from(block, _BODY_OFFSET)
        return cls(ctype, csize, checksum, sec, nsec)

    def v1_checksum_ok(self, running_crc: int) -> bool:
        """The v1 check: the crc32_be of the transaction, or no checksum recorded at all."""
        if (self.checksum_type, self.checksum_size) == (CHECKSUM_TYPE_CRC32, CHECKSUM_SIZE_CRC32):
            return self.checksum == running_crc
        return self.checksum_type == 0 and self.checksum_size == 0 and self.checksum == 0


def commit_checksum(block: bytes | bytearray, jsb: JournalSuperblock) -> int:
    """The v2/v3 checksum a commit block should carry in chksum[0]."""
    view = memoryview(block)
    crc = crc32c_raw(jsb.csum_seed, view[:CHECKSUM_OFFSET])
    crc = crc32c_raw(crc, b"\0\0\0\0")
    return crc32c_raw(crc, view[CHECKSUM_OFFSET + 4 : jsb.block_size])


def commit_checksum_ok(block: bytes, jsb: JournalSuperblock) -> bool:
    """The v2/v3 commit block checksum (True without checksums)."""
    if not jsb.csum_v2or3:
        return True
    (stored,) = struct.unpack_from(">I", block, CHECKSUM_OFFSET)
    return stored == commit_checksum(block, jsb)


def _reverse32(value: int) -> int:
    return int(f"{value & _MASK32:032b}"[::-1], 2)


def crc32_be(crc: int, data: bytes) -> int:
    """The kernel's crc32_be (polynomial 0x04C11DB7, MSB first, no final inversion)."""
    reflected = _reverse32(crc)
    # zlib.crc32 inverts before and after; undo both to continue the raw register.
    raw = ~zlib.crc32(data.translate(_BIT_REVERSED), reflected ^ _MASK32) & _MASK32
    return _reverse32(raw)
