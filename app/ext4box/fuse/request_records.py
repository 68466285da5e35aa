"""The records Operations and its mixins pass around: who asks, and an open handle.

`Context` is the caller of one request, `OpenFile` what the server keeps per
open handle, `OpenResult` what OPEN and CREATE answer. They sit below
operations.py, changes.py and file_ops.py so that all three can name them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Context:
    """Who asks: the caller's ids, and the umask when the server must apply it.

    `umask` is None when the kernel has already applied it to the mode
    (pyfuse3; the native session without FUSE_DONT_MASK).
    """

    uid: int
    gid: int
    pid: int = 0
    umask: int | None = None


@dataclass(slots=True)
class OpenFile:
    """One open file handle: which inode, and who opened it how."""

    ino: int
    writable: bool
    # The opener's uid decides suid/sgid clearing on write when the transport
    # does not say (FUSE_WRITE carries no credentials, and root keeps the bits).
    uid: int
    # Whose space the writes take (reserved blocks): the opener's, for the same
    # reason (writeback of mmap'ed pages arrives with the flusher's ids).
    gid: int = 0
    # Opened O_DIRECT: each read is the application's own, one at a time for
    # a synchronous reader, so a threaded backend executes it inline.
    direct: bool = False
    # Open for reading, and opened O_APPEND: the copy_file_range checks.
    readable: bool = True
    append: bool = False
    # Opened FOPEN_DIRECT_IO under the writeback cache: the kernel stamps no
    # time for its writes, so we do (see Operations.write).
    uncached: bool = False


@dataclass(frozen=True, slots=True)
class OpenResult:
    fh: int
    # Keep the kernel's page cache across opens (see _new_handle).
    keep_cache: bool = True
    # FOPEN_DIRECT_IO: every write of this open reaches us (see new_handle).
    direct_io: bool = False
