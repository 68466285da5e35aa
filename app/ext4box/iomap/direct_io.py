"""When large data reads and writes bypass the image's page cache, and how.

Streamed file data goes through the server, so a buffered pread/pwrite of the
image puts every byte through the host's page cache on its way: a cold 1 MiB
read is device -> image page cache -> our buffer -> the reader's pages, and a
1 MiB write is copied into the image's page cache and written back later.
Measured on the 2-core bench VM (in-process, 256 x 1 MiB into a sparse copy
of the bench image, then fsync, 3 runs): buffered pwritev 216-690 MB/s with
0.35-0.65 s of CPU, O_DIRECT pwritev 600-1,780 MB/s with 0.02-0.03 s of CPU;
through FUSE, the buffered pwritev was 61% of the server's samples in the
1 MiB O_DIRECT write + fsync workload (py-spy).

So data runs of at least `MIN_DIRECT_BYTES`, aligned to `ALIGN` on the device,
go through a second open file description of the image opened O_DIRECT
(`reopen`): the device moves the bytes straight into or out of our buffer.
Small and unaligned I/O stays buffered (a 4 KiB O_DIRECT write would wait for
the device every time; the buffered one waits only at the commit's fsync).

Coherence with the buffered descriptor is the kernel's: an O_DIRECT read first
writes back dirty pages of its range, an O_DIRECT write writes them back and
drops the cached pages of its range afterwards. Durability is unchanged: the
commit's fsync of the image covers data written either way (same inode).
Where the descriptor cannot be had (no /proc, a sandbox that forbids the open)
or the device refuses O_DIRECT (EINVAL: its alignment is stricter than
`ALIGN`, or the filesystem under the image has no direct I/O), everything
stays buffered, logged once.

Memory alignment: O_DIRECT needs the buffer aligned too. Writes are staged
through one page-aligned buffer (a memcpy is far cheaper than the page cache
path it replaces); reads are made into a page-aligned buffer the caller owns
(the native session's reply buffer), with no copy at all.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Iterator, Sequence

import structlog

from ext4box.blockdev import BlockDevice

log = structlog.get_logger("ext4box.iomap")

# Device offsets, lengths and buffer addresses of direct I/O are multiples of
# this: a page, which also covers devices with 4 KiB logical sectors.
ALIGN = 4096
# Runs shorter than this stay buffered. Every READ of a sequential or O_DIRECT
# reader is at least 128 KiB (readahead windows, 1 MiB requests); 4 KiB random
# I/O stays buffered, so a read right after a small buffered write does not
# force that write out first.
MIN_DIRECT_BYTES = 128 * 1024
# The write staging buffer: one 1 MiB request plus a zeroed head and tail block.
STAGING_BYTES = 1024 * 1024 + 2 * 65536


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned, zeroed buffer of at least `size` bytes (anonymous memory)."""
    return mmap.mmap(-1, -(-size // ALIGN) * ALIGN)


class DirectIO:
    """O_DIRECT access to the image beside the buffered BlockDevice (see module doc).

    Not thread-safe: the staging buffer serves one write at a time, which the
    write path guarantees (writes are serialised).
    """

    def __init__(self, fd: int, size: int, *, writable: bool,
                 min_bytes: int = MIN_DIRECT_BYTES) -> None:  # fmt: skip
        self.fd = fd
        self.size = size
        self.writable = writable
        self.min_bytes = min_bytes
        self._staging: mmap.mmap | None = None
        self.enabled = True

    @classmethod
    def reopen(cls, dev: BlockDevice) -> DirectIO | None:
        """A second, O_DIRECT description of `dev`'s image, or None where there is none.

        Only for a plain BlockDevice: a journal overlay serves replayed blocks
        the image does not hold yet. Call it before a sandbox forbids opens.
        """
        if type(dev) is not BlockDevice or dev.fd < 0:
            return None
        access = os.O_RDWR if dev.writable else os.O_RDONLY
        try:
            # The magic link reopens the very inode we hold: no path is resolved.
            fd = os.open(f"/proc/self/fd/{dev.fd}", access | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as err:
            log.info("direct_io_off", why=err.strerror, errno=errno.errorcode.get(err.errno or 0))
            return None
        return cls(fd, dev.size, writable=dev.writable)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.enabled = False

    def _eligible(self, addr: int, length: int) -> bool:
        return (
            self.enabled
            and length >= self.min_bytes
            and addr % ALIGN == 0
            and length % ALIGN == 0
            and addr + length <= self.size
        )

    def _refused(self, err: OSError) -> bool:
        """Switch off for good if the device refuses O_DIRECT; False: a real I/O error."""
        if err.errno != errno.EINVAL:
            return False
        self.enabled = False
        log.warning("direct_io_off", why="the device refuses aligned O_DIRECT I/O")
        return True

    def read_into(self, addr: int, buffer: memoryview) -> bool:
        """Fill `buffer` (page-aligned, whole `ALIGN` units) from device byte `addr`.

        False when this read is not for direct I/O: the caller reads it buffered.
        The caller has checked the range against the device.
        """
        if not self._eligible(addr, len(buffer)):
            return False
        view = buffer
        try:
            while view:
                done = os.preadv(self.fd, [view], addr)
                if done <= 0:
                    raise OSError(errno.EIO, f"device ends inside {addr}+{len(view)}")
                view = view[done:]
                addr += done
        except OSError as err:
            if view is buffer and self._refused(err):
                return False
            raise
        return True

    def write(self, addr: int, views: Sequence[memoryview]) -> bool:
        """Write `views` at device byte `addr` through the staging buffer.

        False when this write is not for direct I/O (nothing written): the
        caller writes it buffered. The caller has checked the range.
        """
        total = sum(len(view) for view in views)
        if not self.writable or not self._eligible(addr, total):
            return False
        if self._staging is None:
            self._staging = aligned_buffer(STAGING_BYTES)
        staging = memoryview(self._staging)
        pending = list(views)
        first = True
        while pending:
            # Fill the staging buffer with as much as fits (whole ALIGN units).
            filled = 0
            room = len(staging)
            while pending and filled < room:
                view = pending[0]
                take = min(len(view), room - filled)
                staging[filled : filled + take] = view[:take]
                filled += take
                pending[0] = view[take:]
                if not pending[0]:
                    pending.pop(0)
            chunk = staging[:filled]
            try:
                while chunk:
                    done = os.pwritev(self.fd, [chunk], addr)
                    if done <= 0:
                        raise OSError(errno.EIO, f"short write at device byte {addr}")
                    chunk = chunk[done:]
                    addr += done
            except OSError as err:
                if first and len(chunk) == filled and self._refused(err):
                    return False
                raise
            first = False
        return True


@contextlib.contextmanager
def direct_io_for(dev: BlockDevice) -> Iterator[DirectIO | None]:
    """`DirectIO.reopen(dev)` for the length of a `with` block, closed after it."""
    direct = DirectIO.reopen(dev)
    try:
        yield direct
    finally:
        if direct is not None:
            direct.close()
