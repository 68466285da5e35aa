"""What fallocate, lseek(SEEK_DATA/SEEK_HOLE) and copy_file_range do through a FUSE handle.

The range operations of an open file, on top of the engine's entry points
(IOMapEngine.fallocate, .seek, .copy_file_range), which apply ext4's own
argument rules. What is left here is what only the holder of the handles can
judge, the checks vfs_fallocate and the copy_file_range syscall make on the
open files: a handle this server never gave is EBADF, fallocate and the copy's
destination need a handle open for writing (EBADF), a copy into a handle
opened O_APPEND is EBADF, and a read-only mount answers EROFS. The kernel
makes these checks itself before it sends the request; the server repeats
them because a FUSE server must not rely on its peer.

Cache coherence is the kernel's side (fs/fuse/file.c): after a FALLOCATE
reply it updates i_size (without KEEP_SIZE), drops the page cache of a
punched or zeroed range and invalidates the inode's attributes; after
COPY_FILE_RANGE it drops the destination's pages over the copied range,
updates its size and times and invalidates its attributes; LSEEK changes
nothing. So none of them needs a FUSE_NOTIFY_INVAL_INODE from the server
(tests/rw/test_rw_file_ranges.py reads through a warm page cache after each
call on 6.18 and gets what the kernel's ext4 gives).
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from ext4box.fuse import kernel_times
from ext4box.fuse.errors import FuseError, fuse_errors
from ext4box.fuse.killpriv import now_ns

if TYPE_CHECKING:
    from ext4box.ext4.read.filesystem import Filesystem
    from ext4box.ext4.write.writable import WritableFilesystem
    from ext4box.fuse.request_records import OpenFile
    from ext4box.iomap.engine import IOMapEngine

_SEEK_WHENCES = frozenset({os.SEEK_DATA, os.SEEK_HOLE})


class FileRangeOps:
    """fallocate, seek and copy_file_range of Operations (a mixin: see module doc)."""

    # Provided by Operations.
    fs: Filesystem
    engine: IOMapEngine
    writable: bool
    writeback_cache: bool
    dirty: bool
    _open_files: dict[int, OpenFile]

    @property
    def rw(self) -> WritableFilesystem: ...

    def _handle(self, fh: int, *, for_write: bool) -> OpenFile:
        handle = self._open_files.get(fh)
        if handle is None:
            raise FuseError(errno.EBADF)
        if for_write:
            if not self.writable:
                raise FuseError(errno.EROFS)
            if not handle.writable:
                raise FuseError(errno.EBADF)
        return handle

    @fuse_errors("fallocate")
    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) through handle `fh`, in any mode the ext4 layer knows."""
        handle = self._handle(fh, for_write=True)
        self.dirty = True
        self.engine.fallocate(handle.ino, mode, offset, length, now_ns=now_ns())

    @fuse_errors("lseek")
    def seek(self, fh: int, offset: int, whence: int) -> int:
        """Where the next data (SEEK_DATA) or hole (SEEK_HOLE) at or after `offset` is.

        The kernel answers SEEK_SET/CUR/END itself and sends only these two.
        """
        if whence not in _SEEK_WHENCES:
            raise FuseError(errno.EINVAL)
        handle = self._handle(fh, for_write=False)
        return self.engine.seek(self.fs.inode(handle.ino), offset, whence)

    @fuse_errors("copy_file_range")
    def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                        length: int, flags: int) -> int:
        """copy_file_range(2) between two handles of this mount; bytes copied.

        `flags` must be 0, as the system call demands.
        """
        if flags:
            raise FuseError(errno.EINVAL)
        source = self._handle(fh_in, for_write=False)
        if not source.readable:
            raise FuseError(errno.EBADF)
        target = self._handle(fh_out, for_write=True)
        if target.append:
            raise FuseError(errno.EBADF)
        self.dirty = True
        if not self.writeback_cache:
            return self.engine.copy_file_range(source.ino, off_in, target.ino, off_out, length,
                                               now_ns=now_ns())
        # The kernel stamped the target's times itself (kernel_times.py).
        with kernel_times.kept(self.rw, target.ino, writeback_cache=True):
            return self.engine.copy_file_range(source.ino, off_in, target.ino, off_out,
                                               length, now_ns=now_ns())
