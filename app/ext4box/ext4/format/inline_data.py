"""Inline data: small file bodies stored inside the inode instead of in blocks.

With the inline_data feature, the first 60 bytes of a body sit in the inode's
i_block field and the remainder in the value of the in-inode extended
attribute "system.data" (which exists, possibly empty, on every inline inode).
i_size says how much of that space is the body.
"""

from __future__ import annotations

from ext4box.ext4.format.errors import Corrupt, inode_where

INLINE_IBLOCK_SIZE = 60
SYSTEM_DATA_NAME = b"system.data"


def inline_capacity(system_data: bytes | None) -> int:
    """Bytes of body the inode currently has room for."""
    return INLINE_IBLOCK_SIZE + (len(system_data) if system_data is not None else 0)


def inline_bytes(i_block: bytes, system_data: bytes | None, size: int, ino: int) -> bytes:
    """The stored inline body: i_block first, then the system.data value, clipped to `size`.

    i_size may exceed what is stored (mkfs.ext4 -d writes an all-hole file that
    way and e2fsck accepts it); the kernel reads the bytes past the stored
    body as zeros, so callers treat the missing tail as a hole. The result is
    never longer than the inode can hold, whatever i_size claims.
    """
    if len(i_block) != INLINE_IBLOCK_SIZE:
        raise ValueError(f"i_block must be {INLINE_IBLOCK_SIZE} bytes, got {len(i_block)}")
    if size < 0:
        raise Corrupt("inline data", inode_where(ino), f"negative size {size}")
    if size <= INLINE_IBLOCK_SIZE:
        return bytes(i_block[:size])
    return bytes(i_block) + bytes((system_data or b"")[: size - INLINE_IBLOCK_SIZE])


def split_inline_body(body: bytes) -> tuple[bytes, bytes]:
    """Lay a body out as (i_block, system.data value), the inverse of inline_bytes.

    i_block is zero-padded to its 60 bytes; the xattr value holds the rest
    (empty when the body fits in i_block), as the kernel stores it.
    """
    head = body[:INLINE_IBLOCK_SIZE]
    return head + bytes(INLINE_IBLOCK_SIZE - len(head)), bytes(body[INLINE_IBLOCK_SIZE:])
