"""copy_file_range(2) between two files of the same image: a server-side copy.

ext4 has no reflink and no copy_file_range of its own, so the kernel copies
through splice: it reads the source range (holes and unwritten extents read
as zeros) and writes those bytes into the destination, which gets ordinary
written blocks for all of it, zeros included (checked on Linux 6.18: a copy
of a sparse file allocates every block of the range). The copy here does the
same through the engine: a read plan of the source, then a normal write into
the destination (allocation, zero-fill, i_size, mtime/ctime), chunk by chunk.

The argument rules are the kernel's for a copy inside one filesystem: an
offset plus the length past 2^64 (a negative offset, taken as unsigned)
EOVERFLOW, a directory EISDIR, another non-regular file EINVAL,
an immutable destination EPERM, a destination offset at or past the file
size limit (ext4/limits.py) EFBIG, an overlapping range within one file
EINVAL (judged after clipping); the length is clipped at the source's EOF,
at the destination's size limit and at MAX_RW_COUNT (so one call copies at most ~2 GiB, as the
kernel's does). Open-mode checks (EBADF for a source not open for reading, a
destination not open for writing or opened O_APPEND) are the caller's: it
holds the file handles. An error after some bytes were copied returns the
count copied, as the kernel does; with nothing copied it is raised.
"""

from __future__ import annotations

import errno
import mmap
from typing import Protocol

from ext4box.ext4.format.errors import Ext4Error, FileTooBig, IsADirectory, NoSpace
from ext4box.ext4.format.inode import FL_IMMUTABLE
from ext4box.iomap.source import MappedInode, WritableSource

# The kernel's MAX_RW_COUNT: INT_MAX rounded down to a page.
MAX_RW_COUNT = (2**31 - 1) & ~(mmap.PAGESIZE - 1)
# Bytes read and written per step: large enough for one vectored read and
# one allocation per extent, small enough to bound the memory a copy holds.
COPY_CHUNK = 1 << 20
_U64 = 1 << 64


class ReadWriteEngine(Protocol):
    """The engine's byte reads and writes, all a copy needs (IOMapEngine fits)."""

    def writable_source(self) -> WritableSource: ...

    def read(self, inode: MappedInode, pos: int, size: int) -> bytes: ...

    def write(self, inode: MappedInode, pos: int, data: bytes, *, now_ns: int) -> int: ...


class InvalidCopy(Ext4Error):
    errno = errno.EINVAL


class Overflow(Ext4Error):
    errno = errno.EOVERFLOW


class NotPermitted(Ext4Error):
    errno = errno.EPERM


def copy_file_range(engine: ReadWriteEngine, src_ino: int, src_pos: int, dst_ino: int,
                    dst_pos: int, length: int, *, now_ns: int) -> int:
    """Copy up to `length` bytes from `src_ino` at `src_pos` to `dst_ino` at `dst_pos`.

    Returns the number of bytes copied (0 at or past the source's EOF).
    """
    source = engine.writable_source()
    if length < 0:
        raise InvalidCopy(f"copy of {length} bytes")
    src = source.inode(src_ino)
    dst = source.inode(dst_ino)
    for inode in (src, dst):
        _check_regular(inode)
    if getattr(dst, "flags", 0) & FL_IMMUTABLE:
        raise NotPermitted(f"inode {dst_ino} is immutable")
    # The kernel adds the (signed) offsets to the (unsigned) length as 64-bit
    # unsigned numbers: a negative offset wraps for any length but 0.
    if any((pos % _U64) + length >= _U64 for pos in (src_pos, dst_pos)):
        raise Overflow(f"copy of {length} bytes from {src_pos} to {dst_pos} wraps")
    if length == 0 or src_pos < 0 or dst_pos < 0:
        return 0  # only a length of 0 gets here with a negative offset: nothing to copy
    count = min(length, max(0, src.size - src_pos), MAX_RW_COUNT)
    # The destination's size limit: EFBIG at or past it (even for nothing to
    # copy), the count cut short before it.
    count = source.writable_length(dst_ino, dst_pos, count)
    if src_ino == dst_ino and dst_pos + count > src_pos and dst_pos < src_pos + count:
        raise InvalidCopy(f"ranges overlap inside inode {src_ino}")
    done = 0
    while done < count:  # each pass copies at least one byte or stops
        try:
            data = engine.read(source.inode(src_ino), src_pos + done,
                               min(COPY_CHUNK, count - done))
            if not data:
                break
            written = engine.write(source.inode(dst_ino), dst_pos + done, data, now_ns=now_ns)
        except (NoSpace, FileTooBig):
            if done:
                return done
            raise
        done += written
        if written < len(data):
            break
    return done


def _check_regular(inode: MappedInode) -> None:
    if getattr(inode, "is_dir", False):
        raise IsADirectory(f"inode {inode.ino} is a directory")
    if not getattr(inode, "is_reg", False):
        raise InvalidCopy(f"inode {inode.ino} is not a regular file")
