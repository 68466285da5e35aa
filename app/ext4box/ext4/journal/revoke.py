"""Revoke blocks: filesystem blocks whose older logged copies must not be replayed.

After the 12-byte header: r_count (be32, bytes used including the 16-byte
header), then records of 4 bytes (8 with the 64bit feature). With csum v2/v3
the block ends in a 4-byte tail checksum (see descriptor.tail_checksum_ok).
"""

from __future__ import annotations

import struct

from ext4box.ext4.format.errors import Corrupt
from ext4box.ext4.journal.superblock import JournalSuperblock

_COUNT = struct.Struct(">I")
_RECORDS_OFFSET = 16


def parse_revoke(block: bytes, jsb: JournalSuperblock, *, where: str) -> tuple[int, ...]:
    """The block numbers one revoke block revokes."""
    (used,) = _COUNT.unpack_from(block, 12)
    if used > jsb.block_size - jsb.tail_bytes:
        raise Corrupt("journal revoke block", where,
                      f"r_count {used} exceeds the block ({jsb.block_size} bytes)")
    size = 8 if jsb.is_64bit else 4
    fmt = ">Q" if size == 8 else ">I"
    count = max(0, (used - _RECORDS_OFFSET) // size)
    return tuple(v for (v,) in struct.iter_unpack(
        fmt, block[_RECORDS_OFFSET : _RECORDS_OFFSET + count * size]))
