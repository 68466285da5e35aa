"""SEEK_DATA and SEEK_HOLE: where the next data, or the next hole, of a file begins.

Answered from the engine's mapping walk (`IOMapEngine.begin`), the same one
reads use, as fs/iomap's iomap_seek_data/iomap_seek_hole do: HOLE ranges are
holes, MAPPED and INLINE ranges are data, and EOF is a hole that every file
ends with.

UNWRITTEN ranges count as holes. The kernel's ext4 asks its page cache about
them (a cached, up-to-date page over an unwritten extent is data), which a
FUSE server cannot see; what it answers once the file's pages are gone (after
fsync and eviction, or a remount) is "hole", and that is what a user of the
image sees on any later mount, so that is the answer here too. Data written
through this server never stays unwritten: the write converts its blocks.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Protocol

from ext4box.ext4.format.errors import Ext4Error
from ext4box.iomap.source import MappedInode
from ext4box.iomap.types import IOMap, IOMapKind

SEEK_DATA = os.SEEK_DATA
SEEK_HOLE = os.SEEK_HOLE

_DATA_KINDS = frozenset({IOMapKind.MAPPED, IOMapKind.INLINE})
# The first window of the walk; each next one doubles, so a huge sparse file
# takes a few dozen mapping calls, not one per window of its size.
_FIRST_WINDOW = 1 << 20


class MappingWalk(Protocol):
    """The engine's mapping walk, all a seek needs (IOMapEngine fits)."""

    def begin(
        self, inode: MappedInode, pos: int, length: int, write: bool = False
    ) -> list[IOMap]: ...


class NoSuchOffset(Ext4Error):
    """SEEK_DATA/SEEK_HOLE at or past EOF, or SEEK_DATA with no data after it."""

    errno = errno.ENXIO


def seek_data(engine: MappingWalk, inode: MappedInode, pos: int) -> int:
    """The first byte at or after `pos` that holds data; NoSuchOffset if none before EOF."""
    for mapping in _walk(engine, inode, pos):
        if mapping.kind in _DATA_KINDS:
            return max(pos, mapping.offset)
    raise NoSuchOffset(f"no data after byte {pos} of inode {inode.ino}")


def seek_hole(engine: MappingWalk, inode: MappedInode, pos: int) -> int:
    """The first byte at or after `pos` inside a hole; i_size when none comes before EOF."""
    for mapping in _walk(engine, inode, pos):
        if mapping.kind not in _DATA_KINDS:
            return max(pos, mapping.offset)
    return inode.size


def seek(engine: MappingWalk, inode: MappedInode, pos: int, whence: int) -> int:
    """lseek(2) for SEEK_DATA or SEEK_HOLE (other `whence` values are the caller's)."""
    if whence == SEEK_DATA:
        return seek_data(engine, inode, pos)
    if whence == SEEK_HOLE:
        return seek_hole(engine, inode, pos)
    raise ValueError(f"not SEEK_DATA or SEEK_HOLE: {whence}")


def _walk(engine: MappingWalk, inode: MappedInode, pos: int) -> Iterator[IOMap]:
    """Mappings tiling [pos, i_size) in order, in growing windows."""
    size = inode.size
    if pos < 0 or pos >= size:
        raise NoSuchOffset(f"byte {pos} is not before EOF {size} of inode {inode.ino}")
    window = _FIRST_WINDOW
    while pos < size:  # each pass maps at least one byte
        length = min(window, size - pos)
        yield from engine.begin(inode, pos, length)
        pos += length
        window *= 2
