"""The Linux calls Python does not wrap: openat2 and the new mount API.

Thin ctypes wrappers over syscall(2), each raising OSError like the os
module does. The numbers come from the unified syscall table (every
architecture but alpha uses the same numbers from 424 on).

    fd = openat2(AT_FDCWD, "/a/b", os.O_PATH, RESOLVE_NO_SYMLINKS)
    fs = fsopen("fuse")                  # a filesystem context
    fsconfig_string(fs, "fd", "5"); fsconfig_flag(fs, "allow_other"); fsconfig_create(fs)
    mnt = fsmount(fs, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    move_mount_onto_fd(mnt, dir_fd)      # no path resolved anywhere
"""

from __future__ import annotations

import ctypes
import os
import struct

AT_FDCWD = -100

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_OPENAT2 = 437

# linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
# struct open_how { u64 flags; u64 mode; u64 resolve; }
_OPEN_HOW = struct.Struct("=QQQ")

# linux/mount.h
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_NOATIME = 0x10  # one value of the MOUNT_ATTR__ATIME field (0x70)
MOUNT_ATTR_STRICTATIME = 0x20  # another; relatime is 0 there, the default
MOUNT_ATTR_NODIRATIME = 0x80
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40

_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(result)


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2) with `resolve` (RESOLVE_*); ENOSYS on kernels before 5.6."""
    how = ctypes.create_string_buffer(_OPEN_HOW.pack(flags, 0, resolve))
    fd = _libc().syscall(
        ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(path)),
        how, ctypes.c_size_t(_OPEN_HOW.size),
    )  # fmt: skip
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def fsopen(fstype: str) -> int:
    """A filesystem context for `fstype` (close-on-exec)."""
    result = _libc().syscall(
        ctypes.c_long(SYS_FSOPEN), ctypes.c_char_p(fstype.encode()), ctypes.c_uint(FSOPEN_CLOEXEC)
    )
    return _check(result, f"fsopen({fstype})")


def fsconfig_string(fs_fd: int, key: str, value: str) -> None:
    result = _libc().syscall(
        ctypes.c_long(SYS_FSCONFIG), ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_SET_STRING),
        ctypes.c_char_p(key.encode()), ctypes.c_char_p(os.fsencode(value)), ctypes.c_int(0),
    )  # fmt: skip
    _check(result, f"fsconfig {key}")


def fsconfig_flag(fs_fd: int, key: str) -> None:
    result = _libc().syscall(
        ctypes.c_long(SYS_FSCONFIG), ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_SET_FLAG),
        ctypes.c_char_p(key.encode()), ctypes.c_void_p(None), ctypes.c_int(0),
    )  # fmt: skip
    _check(result, f"fsconfig {key}")


def fsconfig_create(fs_fd: int) -> None:
    """Create the superblock (FSCONFIG_CMD_CREATE)."""
    result = _libc().syscall(
        ctypes.c_long(SYS_FSCONFIG), ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_CMD_CREATE),
        ctypes.c_void_p(None), ctypes.c_void_p(None), ctypes.c_int(0),
    )  # fmt: skip
    _check(result, "fsconfig create")


def fsmount(fs_fd: int, attr_flags: int) -> int:
    """A detached mount of the context's superblock (close-on-exec)."""
    result = _libc().syscall(
        ctypes.c_long(SYS_FSMOUNT), ctypes.c_int(fs_fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
        ctypes.c_uint(attr_flags),
    )  # fmt: skip
    return _check(result, "fsmount")


def move_mount_onto_fd(mount_fd: int, dir_fd: int) -> None:
    """Attach the detached mount `mount_fd` on the directory `dir_fd` refers to."""
    empty = ctypes.c_char_p(b"")
    result = _libc().syscall(
        ctypes.c_long(SYS_MOVE_MOUNT), ctypes.c_int(mount_fd), empty, ctypes.c_int(dir_fd), empty,
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
    )  # fmt: skip
    _check(result, "move_mount")


def fs_messages(fs_fd: int, limit: int = 8) -> list[str]:
    """What the filesystem said while configuring (read(2) on the context fd)."""
    messages: list[str] = []
    for _ in range(limit):
        try:
            raw = os.read(fs_fd, 1024)
        except OSError:
            break  # ENODATA: nothing more was said
        if not raw:
            break
        messages.append(raw.decode("utf-8", "replace").strip())
    return messages


def mount2(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """The classic mount(2)."""
    result = _libc().mount(
        os.fsencode(source), os.fsencode(target), fstype.encode(), ctypes.c_ulong(flags),
        data.encode(),
    )  # fmt: skip
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def umount2(target: str, flags: int) -> None:
    if _libc().umount2(os.fsencode(target), ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


# linux/magic.h
FUSE_SUPER_MAGIC = 0x65735546


def fstatfs_type(fd: int) -> int:
    """statfs f_type of the filesystem holding fd (os.fstatvfs does not report it)."""
    # struct statfs begins with f_type (a long) on every Linux architecture;
    # the buffer is larger than the whole struct anywhere.
    buf = ctypes.create_string_buffer(256)
    if _libc().fstatfs(ctypes.c_int(fd), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF
