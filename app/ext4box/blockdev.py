"""Positional I/O on the one device fd, with bounds checks.

Every read of metadata or data goes through here, so an offset computed from
hostile metadata can never reach past the device. The block size is not known
until the superblock is parsed, so block-level helpers take it explicitly.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence


class DeviceRangeError(Exception):
    """A request falls (partly) outside the device."""

    def __init__(self, offset: int, length: int, size: int) -> None:
        super().__init__(f"range {offset}+{length} outside device of {size} bytes")
        self.offset = offset
        self.length = length
        self.size = size


# fallocate(2) modes: deallocate the range, keep the file's size.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKDISCARD = 0x1277  # _IO(0x12, 119): discard a (start, length) byte range
_BLKDISCARD_RANGE = struct.Struct("=QQ")


def _load_fallocate():  # -> Callable[[int, int, int, int], None] | None
    """libc's fallocate(2) with its mode argument (os.posix_fallocate has none),
    resolved at import time, before a sandbox may forbid loading anything."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if function(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return fallocate


_FALLOCATE = _load_fallocate()


def preadv_by_pread(pread: Callable[[int, int], bytes],
                    buffers: Sequence[bytearray | memoryview], offset: int) -> int:
    """`preadv` for a device that only has `pread` (the journal's in-memory layers):
    one read of the whole range, scattered into `buffers`; returns bytes read."""
    total = sum(len(b) for b in buffers)
    data = memoryview(pread(offset, total))
    done = 0
    for buffer in buffers:
        buffer[:] = data[done : done + len(buffer)]
        done += len(buffer)
    return total


class BlockDevice:
    """A bounds-checked view of a device or image file descriptor."""

    def __init__(self, fd: int, *, writable: bool = False, size: int | None = None) -> None:
        self.fd = fd
        self.writable = writable
        self.size = size if size is not None else _device_size(fd)

    @classmethod
    def open(cls, path: str, *, writable: bool = False) -> BlockDevice:
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        fd = os.open(path, flags)
        try:
            return cls(fd, writable=writable)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceRangeError(offset, length, self.size)

    def pread(self, offset: int, length: int) -> bytes:
        """Read exactly `length` bytes at `offset` (short reads are retried)."""
        self.check_range(offset, length)
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        done = len(data)
        while done < length:
            chunk = os.pread(self.fd, length - done, offset + done)
            if not chunk:
                raise DeviceRangeError(offset, length, offset + done)
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def preadv(self, buffers: Sequence[bytearray | memoryview], offset: int) -> int:
        """Fill `buffers` from `offset` with one vectored read; returns bytes read."""
        total = sum(len(b) for b in buffers)
        self.check_range(offset, total)
        return os.preadv(self.fd, buffers, offset)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise PermissionError("device opened read-only")
        self.check_range(offset, len(data))
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written

    def flush(self) -> None:
        if self.writable:
            os.fsync(self.fd)

    @property
    def discard_granularity(self) -> int:
        """The smallest unit a discard frees: the image file's block size, or the
        device's (as a loop device over the image would report it)."""
        return max(os.fstat(self.fd).st_blksize, 512)

    def discard(self, offset: int, length: int) -> None:
        """Tell the storage under [offset, offset + length) that its contents are no
        longer needed (they may read back as zeros): a hole punched in an image
        file, BLKDISCARD on a block device. OSError(EOPNOTSUPP) where neither works."""
        if not self.writable:
            raise PermissionError("device opened read-only")
        self.check_range(offset, length)
        if not length:
            return
        if stat.S_ISBLK(os.fstat(self.fd).st_mode):
            fcntl.ioctl(self.fd, BLKDISCARD, _BLKDISCARD_RANGE.pack(offset, length))
            return
        if _FALLOCATE is None:
            raise OSError(errno.EOPNOTSUPP, "no fallocate(2) in this libc")
        _FALLOCATE(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


class MetadataCache:
    """A bounded LRU of metadata blocks keyed by block number.

    Data blocks never pass through here: file data is read by the iomap
    executor straight into request buffers.
    """

    def __init__(self, dev: BlockDevice, block_size: int, capacity: int = 4096) -> None:
        self.dev = dev
        self.block_size = block_size
        self.capacity = capacity
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        # Bumped by every invalidation: a read that raced one may return what it
        # read, but must not cache it (it may be the device's older copy).
        self._invalidations = 0

    def read(self, block: int) -> bytes:
        with self._lock:
            data = self._blocks.get(block)
            if data is not None:
                self._blocks.move_to_end(block)
                return data
            epoch = self._invalidations
        data = self.dev.pread(block * self.block_size, self.block_size)
        with self._lock:
            if self._invalidations == epoch:
                self._blocks[block] = data
                if len(self._blocks) > self.capacity:
                    self._blocks.popitem(last=False)
        return data

    def invalidate(self, block: int) -> None:
        with self._lock:
            self._blocks.pop(block, None)
            self._invalidations += 1

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._invalidations += 1


def _device_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise ValueError("device must be a regular file or a block device")
