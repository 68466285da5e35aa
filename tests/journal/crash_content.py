"""Self-identifying file content for the crash tests.

Every 512-byte unit a workload writes names its file, its generation (which
write put it there) and its own index in the file. After a crash each unit of
each file can be told apart: the file's own data at the right offset, a zero
unit (a hole or a never-written tail), or something else: another file's
unit, a unit at the wrong offset (a block mapped twice or stale), or garbage.
Units are sector-aligned and every workload write covers whole units, so a
write torn by the kill tears between units, never inside one.

Xattr values identify themselves the same way: `id=<file>;gen=<n>;` and
filler up to the chosen length.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

UNIT = 512
_MAGIC = b"E4BXCRSH"
_HEADER = struct.Struct("<8sIIQ")  # magic, file id, generation, unit index
_ZERO_UNIT = bytes(UNIT)
_XATTR_VALUE = re.compile(rb"id=(\d+);gen=(\d+);")


@dataclass(frozen=True, slots=True)
class UnitId:
    file_id: int
    gen: int
    index: int


def unit_bytes(file_id: int, gen: int, index: int) -> bytes:
    """The one content of unit `index` written by generation `gen` of file `file_id`."""
    header = _HEADER.pack(_MAGIC, file_id, gen, index)
    return (header * (UNIT // len(header) + 1))[:UNIT]


def units_bytes(file_id: int, gen: int, first: int, count: int) -> bytes:
    return b"".join(unit_bytes(file_id, gen, i) for i in range(first, first + count))


def expected_bytes(file_id: int, gens: list[int]) -> bytes:
    """A whole file: gens[i] is the generation of unit i, 0 for a zero unit."""
    return b"".join(
        unit_bytes(file_id, g, i) if g else _ZERO_UNIT for i, g in enumerate(gens)
    )


def parse_unit(raw: bytes) -> UnitId | str | None:
    """UnitId for a workload unit, None for a zero unit, else a description of the bytes."""
    if raw == _ZERO_UNIT:
        return None
    if len(raw) != UNIT:
        return f"short unit of {len(raw)} bytes"
    magic, file_id, gen, index = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        return f"not workload data (starts {raw[:16].hex()})"
    if raw != unit_bytes(file_id, gen, index):
        return f"torn or corrupted unit (header file {file_id} gen {gen} index {index})"
    return UnitId(file_id, gen, index)


def xattr_value(file_id: int, gen: int, length: int) -> bytes:
    head = f"id={file_id};gen={gen};".encode()
    filler = b"0123456789abcdef" * (length // 16 + 1)
    return (head + filler)[: max(length, len(head))]


def parse_xattr_value(value: bytes) -> tuple[int, int] | None:
    """(file id, generation) a workload xattr value names, None if it is not one."""
    match = _XATTR_VALUE.match(value)
    if match is None:
        return None
    file_id, gen = int(match[1]), int(match[2])
    if value != xattr_value(file_id, gen, len(value)):
        return None
    return file_id, gen
