"""Two drivers of the same flag-sensitive operations, for comparing ext4box with the
kernel: `KernelFlags` (syscalls and FS_IOC_* ioctls on a kernel rw mount, or on
an ext4box mount) and `FacadeFlags` (the WritableFilesystem in-process, with
chattr done as chattr does it: GETFLAGS, change one bit, SETFLAGS).

Every operation returns the errno name it ended with ("OK" for success), so a
scenario's outcome is a list of strings both sides must agree on.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.write.inode_flags import FsxAttr
from support.facade import Ours, write_file

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
_INT = struct.Struct("<I")

# chattr letters (e2fsprogs) -> flag bits
LETTERS = {"s": 0x1, "u": 0x2, "c": 0x4, "S": 0x8, "i": 0x10, "a": 0x20, "d": 0x40, "A": 0x80,
           "j": 0x4000, "t": 0x8000, "D": 0x10000, "T": 0x20000, "e": 0x80000, "x": 0x2000000,
           "P": 0x20000000, "F": 0x40000000}

UTIME_NOW = (1 << 30) - 1


def errno_name(code: int) -> str:
    return "OK" if code == 0 else errno.errorcode.get(code, str(code))


def _outcome(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as err:
        return errno_name(err.errno or 0)
    except Ext4Error as err:
        return errno_name(err.errno)
    return "OK"


@contextmanager
def as_user(uid: int) -> Iterator[None]:
    """Run the block with effective uid/gid `uid` (root otherwise)."""
    if uid == 0:
        yield
        return
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


class KernelFlags:
    """The operations as a process does them on a mounted filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def p(self, path: str) -> Path:
        return self.root / path

    def _flags_fd(self, path: str) -> int:
        # chattr's open: read-only, non-blocking, never following a symlink.
        return os.open(self.p(path), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)

    def get_flags(self, path: str) -> int:
        fd = self._flags_fd(path)
        try:
            return _INT.unpack(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(4)))[0]
        finally:
            os.close(fd)

    def chattr(self, path: str, change: str, uid: int = 0) -> str:
        # Opened as root (the test's directories are root's), ioctls as `uid`.
        def run() -> None:
            fd = self._flags_fd(path)
            try:
                with as_user(uid):
                    flags = _INT.unpack(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(4)))[0]
                    fcntl.ioctl(fd, FS_IOC_SETFLAGS, _INT.pack(_changed(flags, change)))
            finally:
                os.close(fd)

        return _outcome(run)

    def get_fsxattr(self, path: str) -> FsxAttr:
        fd = self._flags_fd(path)
        try:
            return FsxAttr.unpack(fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(28)))
        finally:
            os.close(fd)

    def set_fsxattr(self, path: str, attr: FsxAttr, uid: int = 0) -> str:
        def run() -> None:
            fd = self._flags_fd(path)
            try:
                with as_user(uid):
                    fcntl.ioctl(fd, FS_IOC_FSSETXATTR, attr.pack())
            finally:
                os.close(fd)

        return _outcome(run)

    # ---- operations the flags may forbid ----------------------------------

    def open(self, path: str, flags: int) -> str:
        return _outcome(lambda: os.close(os.open(self.p(path), flags)))

    def append(self, path: str, data: bytes) -> str:
        def run() -> None:
            fd = os.open(self.p(path), os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

        return _outcome(run)

    def truncate(self, path: str, size: int) -> str:
        return _outcome(lambda: os.truncate(self.p(path), size))

    def chmod(self, path: str, mode: int) -> str:
        return _outcome(lambda: os.chmod(self.p(path), mode))

    def chown(self, path: str, uid: int) -> str:
        return _outcome(lambda: os.chown(self.p(path), uid, uid))

    def utime(self, path: str, now: bool) -> str:
        times = None if now else (1_000_000_000, 1_000_000_000)
        return _outcome(lambda: os.utime(self.p(path), times))

    def setxattr(self, path: str) -> str:
        return _outcome(lambda: os.setxattr(self.p(path), b"user.k", b"v"))

    def removexattr(self, path: str) -> str:
        return _outcome(lambda: os.removexattr(self.p(path), b"user.k"))

    def create(self, path: str) -> str:
        return _outcome(lambda: os.close(os.open(self.p(path), os.O_CREAT | os.O_EXCL
                                                 | os.O_WRONLY, 0o644)))

    def mkdir(self, path: str) -> str:
        return _outcome(lambda: os.mkdir(self.p(path)))

    def symlink(self, path: str) -> str:
        return _outcome(lambda: os.symlink("target", self.p(path)))

    def link(self, src: str, dst: str) -> str:
        return _outcome(lambda: os.link(self.p(src), self.p(dst)))

    def unlink(self, path: str) -> str:
        return _outcome(lambda: os.unlink(self.p(path)))

    def rmdir(self, path: str) -> str:
        return _outcome(lambda: os.rmdir(self.p(path)))

    def rename(self, src: str, dst: str) -> str:
        return _outcome(lambda: os.rename(self.p(src), self.p(dst)))


def _changed(flags: int, change: str) -> int:
    sign, letters = change[0], change[1:]
    mask = 0
    for letter in letters:
        mask |= LETTERS[letter]
    return flags | mask if sign == "+" else flags & ~mask


class FacadeFlags:
    """The same operations on the WritableFilesystem, as the FUSE layer calls it."""

    def __init__(self, ours: Ours) -> None:
        self.ours = ours
        self.fs = ours.fs

    def ino(self, path: str) -> int:
        return self.ours.resolve(path)

    def get_flags(self, path: str) -> int:
        return self.fs.get_flags(self.ino(path))

    def chattr(self, path: str, change: str, uid: int = 0) -> str:
        def run() -> None:
            ino = self.ino(path)
            self.fs.set_flags(ino, _changed(self.fs.get_flags(ino), change), uid)

        return _outcome(run)

    def get_fsxattr(self, path: str) -> FsxAttr:
        return self.fs.get_fsxattr(self.ino(path))

    def set_fsxattr(self, path: str, attr: FsxAttr, uid: int = 0) -> str:
        return _outcome(lambda: self.fs.set_fsxattr(self.ino(path), attr, uid))

    def open(self, path: str, flags: int) -> str:
        def run() -> None:
            ino = self.ino(path)
            self.fs.check_open(ino, flags)
            if flags & os.O_TRUNC:
                self.fs.setattr(ino, size=0)

        return _outcome(run)

    def append(self, path: str, data: bytes) -> str:
        def run() -> None:
            ino = self.ino(path)
            self.fs.check_open(ino, os.O_WRONLY | os.O_APPEND)
            write_file(self.fs, self.ours.dev, ino, self.fs.inode(ino).size, data)

        return _outcome(run)

    def truncate(self, path: str, size: int) -> str:
        return _outcome(lambda: self.fs.setattr(self.ino(path), size=size))

    def chmod(self, path: str, mode: int) -> str:
        return _outcome(lambda: self.fs.setattr(self.ino(path), mode=mode))

    def chown(self, path: str, uid: int) -> str:
        return _outcome(lambda: self.fs.setattr(self.ino(path), uid=uid, gid=uid))

    def utime(self, path: str, now: bool) -> str:
        t = self.fs.now_ns() if now else 1_000_000_000 * 1_000_000_000
        return _outcome(lambda: self.fs.setattr(self.ino(path), atime_ns=t, mtime_ns=t,
                                                times_now=now))

    def setxattr(self, path: str) -> str:
        return _outcome(lambda: self.fs.setxattr(self.ino(path), b"user.k", b"v"))

    def removexattr(self, path: str) -> str:
        return _outcome(lambda: self.fs.removexattr(self.ino(path), b"user.k"))

    def create(self, path: str) -> str:
        return _outcome(lambda: self.ours.create(path, stat.S_IFREG | 0o644))

    def mkdir(self, path: str) -> str:
        return _outcome(lambda: self.ours.mkdir(path))

    def symlink(self, path: str) -> str:
        return _outcome(lambda: self.ours.symlink(path, b"target"))

    def link(self, src: str, dst: str) -> str:
        return _outcome(lambda: self.ours.link(src, dst))

    def unlink(self, path: str) -> str:
        return _outcome(lambda: self.ours.unlink(path))

    def rmdir(self, path: str) -> str:
        return _outcome(lambda: self.ours.rmdir(path))

    def rename(self, src: str, dst: str) -> str:
        return _outcome(lambda: self.ours.rename(src, dst))
