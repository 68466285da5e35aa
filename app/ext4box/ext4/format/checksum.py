"""Checksums used by ext4 and jbd2.

crc32c comes from the `crc32c` package (hardware-accelerated with SSE4.2 /
ARMv8 CRC instructions, with a software fallback). ext4 chains the *raw*
CRC register: it seeds with ~0 (or a previous raw value) and never applies
the final inversion, whereas `crc32c.crc32c` implements the standard,
inverted form. The two are related by complementing input and output.
crc16 (for the older gdt_csum feature) is the reflected 0x8005 polynomial
that lib/crc16.c implements; it is small enough to keep as a table here.
"""

from __future__ import annotations

import crc32c as _crc32c

_MASK32 = 0xFFFFFFFF


def crc32c_raw(seed: int, data: bytes | bytearray | memoryview) -> int:
    """Continue ext4's raw crc32c register `seed` over `data`."""
    return (~_crc32c.crc32c(data, value=seed ^ _MASK32)) & _MASK32


def ext4_csum_seed(uuid: bytes) -> int:
    """Checksum seed derived from the filesystem UUID (no csum_seed feature)."""
    return crc32c_raw(_MASK32, uuid)


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC16_TABLE = _crc16_table()


def crc16(seed: int, data: bytes | bytearray | memoryview) -> int:
    crc = seed & 0xFFFF
    table = _CRC16_TABLE
    for byte in bytes(data):
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def inode_csum_seed(fs_seed: int, ino: int, generation: int) -> int:
    """Per-inode seed: used by the inode, extent, directory and ea_inode checksums."""
    # One crc over both words: chaining the register is the same as concatenating.
    return crc32c_raw(fs_seed, ino.to_bytes(4, "little") + generation.to_bytes(4, "little"))
