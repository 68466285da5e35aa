"""Under the writeback cache, which requests leave a regular file's mtime and ctime alone.

With FUSE_WRITEBACK_CACHE the kernel owns mtime and ctime of regular files:
it stamps them itself for write(2), mmap stores, O_TRUNC opens, the target
of copy_file_range, setxattr/removexattr, link, unlink and rename, marks the
inode dirty and sends the times by SETATTR (fuse_flush_times, or
FATTR_MTIME/FATTR_CTIME with a setattr), and it never takes them from our
replies (fuse_get_cache_mask). A stamp of our own on such a request would
reach the image and never the kernel: when the kernel's coarse clock had not
moved, no SETATTR follows to overwrite it, and stat and the image disagree.
So those requests keep the times the inode had before them.

The kernel stamps nothing for a FOPEN_DIRECT_IO write, an ioctl (chattr) or a
fallocate that does not grow the file: there we still stamp, and what stat
shows lags the image until the kernel drops the inode (docs/status.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ext4box.ext4.format.inode import Inode
    from ext4box.ext4.write.writable import WritableFilesystem


def keep_times(fs: WritableFilesystem, ino: int, times: tuple[int, int],
               current: Inode | None = None) -> None:
    """Put (mtime, ctime) `times` back on `ino` if a change stamped others; `current`:
    the inode now, if at hand."""
    current = fs.inode(ino) if current is None else current
    if (current.mtime_ns, current.ctime_ns) != times:
        # Restored, not changed: "now" for an append-only inode's rules.
        fs.setattr(ino, mtime_ns=times[0], ctime_ns=times[1], times_now=True)


@contextmanager
def kept(fs: WritableFilesystem, ino: int, *, writeback_cache: bool) -> Iterator[None]:
    """Within the block, a regular file `ino` keeps its times under the writeback cache
    (unless the block leaves it without a name)."""
    node = fs.inode(ino) if writeback_cache else None
    yield
    if node is None or not node.is_reg:
        return
    current = fs.inode(ino)
    if current.links_count:
        keep_times(fs, ino, (node.mtime_ns, node.ctime_ns), current)
