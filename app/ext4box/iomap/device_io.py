"""How do a file's data bytes move between buffers and the device?

Every transfer is checked against the device's size first: a mapping that
points past the end is Corrupt, naming the inode. Vectored transfers that
come back short are resumed from where they stopped. Writes (and the reads
read_plan.py chooses) go O_DIRECT when a `DirectIO` takes them
(iomap/direct_io.py), buffered otherwise.
"""

from __future__ import annotations

import os

from ext4box.blockdev import BlockDevice, DeviceRangeError
from ext4box.ext4.format.errors import Corrupt, ReadOnly, inode_where
from ext4box.iomap.direct_io import DirectIO

# os.preadv accepts at most IOV_MAX buffers per call.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def check_run(dev: BlockDevice, ino: int, addr: int, length: int) -> None:
    """Corrupt (naming inode `ino`) unless device bytes [addr, addr + length) exist."""
    try:
        dev.check_range(addr, length)
    except DeviceRangeError as err:
        raise Corrupt("data run", inode_where(ino), str(err)) from None


def read_at(dev: BlockDevice, ino: int, addr: int, length: int) -> bytes:
    """`length` bytes at device byte `addr`, for inode `ino`'s data."""
    try:
        return dev.pread(addr, length)
    except DeviceRangeError as err:
        raise Corrupt("data run", inode_where(ino), str(err)) from None


def readv_at(dev: BlockDevice, ino: int, addr: int, views: list[memoryview]) -> None:
    """Fill `views` from device byte `addr` on, resuming short reads."""
    total = sum(len(v) for v in views)
    check_run(dev, ino, addr, total)
    while views:
        done = dev.preadv(views, addr)  # an overlay device serves replayed blocks
        if done <= 0:
            raise Corrupt("data run", inode_where(ino), f"device ends inside {addr}+{total}")
        # A short vectored read: keep only the buffers still unfilled.
        views = _drop_prefix(views, done)
        addr += done


def writev_at(
    dev: BlockDevice, direct: DirectIO | None, ino: int, addr: int, views: list[memoryview]
) -> bool:
    """Write `views` at device byte `addr`; True when they went O_DIRECT (no writeback hint due)."""
    if not dev.writable:
        raise ReadOnly("the device is opened read-only")
    total = sum(len(v) for v in views)
    check_run(dev, ino, addr, total)
    if direct is not None and direct.write(addr, views):
        return True
    while views:
        done = os.pwritev(dev.fd, views, addr)
        if done <= 0:
            raise OSError(f"short write at device byte {addr}")
        views = _drop_prefix(views, done)
        addr += done
    return False


def _drop_prefix(views: list[memoryview], count: int) -> list[memoryview]:
    """The buffers left after the first `count` bytes of `views` were filled."""
    result: list[memoryview] = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        result.append(view[count:])
        count = 0
    return result
