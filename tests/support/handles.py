"""File handles from userspace: name_to_handle_at(2), open_by_handle_at(2), forged handles.

Python's os module has neither call, so they go through ctypes. Opening by
handle needs CAP_DAC_READ_SEARCH (the tests run as root). A forged handle
keeps the layout of a real one of the same filesystem and changes only the
inode number and generation in it; the two layouts are the kernel's:
ext4 encodes FILEID_INO32_GEN (type 1: u32 inode, u32 generation), FUSE
type 0x81 (u32 node id high, u32 node id low, u32 generation).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HANDLE_SZ = 128
AT_HANDLE_CONNECTABLE = 0x002  # Linux 6.13: the handle names the parent too
FILEID_INO32_GEN = 1
FILEID_INO32_GEN_PARENT = 2
FUSE_FILEID = 0x81
FUSE_FILEID_WITH_PARENT = 0x82
# Flag bits the kernel may add above the type byte (FILEID_IS_CONNECTABLE...).
_TYPE_MASK = 0xFF

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


@dataclass(frozen=True)
class Handle:
    """A file handle as name_to_handle_at returned it (or as forged from one)."""

    handle_type: int
    data: bytes

    def inode_and_generation(self) -> tuple[int, int]:
        """The inode (ext4) or node id (FUSE) the handle names, and its generation."""
        kind = self.handle_type & _TYPE_MASK
        if kind in (FILEID_INO32_GEN, FILEID_INO32_GEN_PARENT):
            ino, generation = struct.unpack_from("<II", self.data)
            return ino, generation
        if kind in (FUSE_FILEID, FUSE_FILEID_WITH_PARENT):
            high, low, generation = struct.unpack_from("<III", self.data)
            return high << 32 | low, generation
        raise ValueError(f"unknown handle type {self.handle_type:#x}")

    def forged(self, ino: int, generation: int) -> Handle:
        """A handle of the same layout (without a parent) naming `ino` with `generation`."""
        kind = self.handle_type & _TYPE_MASK
        if kind in (FILEID_INO32_GEN, FILEID_INO32_GEN_PARENT):
            return Handle(FILEID_INO32_GEN, struct.pack("<II", ino, generation))
        if kind in (FUSE_FILEID, FUSE_FILEID_WITH_PARENT):
            return Handle(FUSE_FILEID, struct.pack("<III", ino >> 32, ino & 0xFFFFFFFF, generation))
        raise ValueError(f"unknown handle type {self.handle_type:#x}")


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), what)


def name_to_handle(path: Path, *, connectable: bool = False) -> Handle:
    """name_to_handle_at(AT_FDCWD, path, ...): the handle of `path` itself (a final
    symlink is not followed); `connectable`: with AT_HANDLE_CONNECTABLE."""
    handle = _FileHandle()
    handle.handle_bytes = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    at_fdcwd = -100
    if _libc.name_to_handle_at(at_fdcwd, os.fsencode(path), ctypes.byref(handle),
                               ctypes.byref(mount_id),
                               AT_HANDLE_CONNECTABLE if connectable else 0) != 0:  # fmt: skip
        _raise_errno(str(path))
    return Handle(handle.handle_type, bytes(handle.f_handle[: handle.handle_bytes]))


def open_by_handle(mount_fd: int, handle: Handle, flags: int = os.O_RDONLY) -> int:
    """open_by_handle_at(mount_fd, handle, flags): a new fd, or OSError (ESTALE...)."""
    raw = _FileHandle()
    raw.handle_bytes = len(handle.data)
    raw.handle_type = handle.handle_type
    ctypes.memmove(raw.f_handle, handle.data, len(handle.data))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(raw), flags)
    if fd < 0:
        _raise_errno(f"handle {handle.handle_type:#x}:{handle.data.hex()}")
    return int(fd)


def drop_dentries_and_inodes() -> None:
    """echo 2 > /proc/sys/vm/drop_caches: forget every unused dentry and inode.

    Not a sync: dirty data is not written; only clean, unreferenced objects go.
    """
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("2\n")
