"""What must a filesystem offer the iomap engine, and what does it hand back?

The engine is written against these protocols, not against ext4's classes:
the read-only facade fits `MappingSource`, the read-write one
`WritableSource`, and their inodes fit `MappedInode`. Keeping the contract in
its own module lets the engine's helpers (seek, copy_range) name it without
importing the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ext4box.ext4.format.blockrun import BlockRun


class MappedInode(Protocol):
    """What the engine needs to know about an inode (the facade's Inode fits)."""

    ino: int
    size: int
    has_inline_data: bool


class MappingSource(Protocol):
    """The filesystem side of the contract (the ext4 facade fits)."""

    block_size: int

    def map_blocks(self, inode: MappedInode, lblk: int, count: int) -> list[BlockRun]: ...

    def inline_data(self, inode: MappedInode) -> bytes: ...


class WriteRunLike(Protocol):
    """One run answered by `write_begin` (ext4/writable.py's WriteRun fits)."""

    lblk: int
    length: int
    pblk: int | None
    new: bool  # allocated (or converted from unwritten) by this call: contents are garbage
    converted: bool  # was unwritten before this call (an abort makes it unwritten again)


class WritableSource(MappingSource, Protocol):
    """The read-write side of the contract (the WritableFilesystem fits)."""

    def inode(self, ino: int) -> MappedInode: ...

    def check_file_write(self, ino: int) -> None: ...

    def writable_length(self, ino: int, pos: int, length: int) -> int:
        """check_file_write, then how many of `length` bytes at `pos` fit below the
        file's size limit (FileTooBig when none do)."""
        ...

    def write_begin(self, inode: MappedInode, lblk: int, count: int) -> Sequence[WriteRunLike]: ...

    def write_end(self, ino: int, end_pos: int, *, now_ns: int) -> MappedInode: ...

    def write_abort(self, ino: int, ranges: list[tuple[int, int]],
                    converted: list[tuple[int, int]] | None = None) -> None: ...

    def write_inline(self, ino: int, pos: int, data: bytes) -> bool: ...

    def fallocate(self, ino: int, mode: int, offset: int, length: int, *,
                  now_ns: int | None = None) -> MappedInode: ...
