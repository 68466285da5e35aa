"""What a file range is, in device terms: the mapping unit of the iomap engine.

The kinds mirror the kernel's iomap types so a later FUSE_IOMAP upcall can carry
these values unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class IOMapKind(enum.Enum):
    HOLE = "hole"  # nothing allocated: reads as zeros
    MAPPED = "mapped"  # data lives at `addr` on the device
    # Allocated at `addr` but not yet written: reads as zeros. In a write
    # mapping: converted to written by this write (filled whole like NEW; a
    # failed write makes it unwritten again).
    UNWRITTEN = "unwritten"
    INLINE = "inline"  # data lives inside the inode (no device address)
    # Write mappings only: blocks allocated (or converted from unwritten) by
    # this write. Their old contents are garbage, so the writer must fill
    # every byte of the blocks, zeroing what the request does not cover.
    NEW = "new"


@dataclass(frozen=True, slots=True)
class IOMap:
    """A byte range of a file and where it lives.

    `offset`/`length` are file byte positions; `addr` is the device byte address
    of `offset` for MAPPED/UNWRITTEN/NEW and None for HOLE/INLINE.
    """

    kind: IOMapKind
    offset: int
    length: int
    addr: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length
