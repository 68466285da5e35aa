"""File operations the tests apply to kernel mounts, shaped to avoid known kernel bugs."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def truncate_by_fd(path: str | Path, length: int) -> None:
    """truncate(2) through a write descriptor.

    Linux 6.18's ext4 dereferences NULL when a path truncate(2) grows an
    inline-data file past its inline size on a journalled filesystem while no
    descriptor has it open for writing; the crashed task leaks a journal handle
    and every later sync(2) on the machine hangs. ftruncate on an open
    descriptor takes a path the kernel gets right. O_NONBLOCK keeps a FIFO from
    blocking the open (it fails with ENXIO instead).
    """
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.ftruncate(fd, length)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str | Path) -> None:
    """Flush the one filesystem holding `path`.

    Tests never call sync(2): it waits on every filesystem of the machine,
    including a wedged one left behind by a kernel bug, and would hang with it.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
