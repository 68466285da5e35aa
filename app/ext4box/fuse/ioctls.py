"""Which ioctls an ext4box mount answers, and how their argument bytes become
filesystem calls: FS_IOC_GETFLAGS/SETFLAGS and FS_IOC_FSGETXATTR/FSSETXATTR
(chattr, lsattr, xfs_io; the kernel's FUSE fileattr path sends these),
FS_IOC_GETFSLABEL/SETFSLABEL and FITRIM (fstrim). Anything else is ENOTTY,
as an unknown ioctl is on ext4.

Every one of these is a "restricted" FUSE ioctl: the kernel sizes the
argument from the command number (or, for the fileattr path, from the
structure it passes), sends `in_size` bytes in and takes at most
`out_size` bytes back. Transport-neutral: the caller hands in the command,
the input bytes, the output size and the caller's uid; the answer is the
output bytes or a FuseError.

Privileges: FUSE tells us only the caller's uid, so uid 0 stands for the
capabilities the kernel's ext4 asks for (CAP_LINUX_IMMUTABLE,
CAP_SYS_RESOURCE, CAP_SYS_ADMIN, CAP_FOWNER); the rules themselves are in
ext4/inode_flags.py, ext4/fs_label.py and ext4/trim.py. A read-only mount
answers the getters and EROFS to the setters, as mnt_want_write does.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from ext4box.ext4.read.filesystem import Filesystem
from ext4box.ext4.write import inode_flags
from ext4box.ext4.write.fs_label import LABEL_MAX
from ext4box.ext4.write.trim import TrimRange
from ext4box.fuse.errors import FuseError

if TYPE_CHECKING:
    from ext4box.ext4.write.writable import WritableFilesystem

# Command numbers (linux/fs.h): _IOR/_IOW/_IOWR encodings on every Linux ABI
# ext4box runs on. The 32-bit GETFLAGS/SETFLAGS forms are what a 32-bit process
# (FUSE_IOCTL_COMPAT) sends; the argument is an int either way.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC32_GETFLAGS = 0x80046601
FS_IOC32_SETFLAGS = 0x40046602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FS_IOC_GETFSLABEL = 0x81009431
FS_IOC_SETFSLABEL = 0x41009432
FITRIM = 0xC0185879

_FLAGS = struct.Struct("<I")
FSTRIM_RANGE = struct.Struct("<QQQ")  # start, len, minlen


@dataclass(frozen=True, slots=True)
class IoctlCall:
    """One ioctl as FUSE delivers it."""

    ino: int  # the ext4 inode the file descriptor names
    cmd: int
    data: bytes  # the caller's input bytes (in_size of them)
    out_size: int  # at most this many bytes go back
    uid: int


@dataclass(frozen=True, slots=True)
class IoctlAnswer:
    out: bytes
    changed_inode: bool = False  # the inode's attributes (ctime, flags) changed


def answer(fs: Filesystem, call: IoctlCall) -> IoctlAnswer:
    """The output bytes of `call` on `fs`; FuseError for an error (ENOTTY: unknown)."""
    handler = _HANDLERS.get(call.cmd)
    if handler is None:
        raise FuseError(errno.ENOTTY)
    result = handler(fs, call)
    if len(result.out) > call.out_size:
        raise FuseError(errno.EINVAL)  # the kernel sized it smaller than the structure
    return result


def _writable(fs: Filesystem) -> WritableFilesystem:
    if getattr(fs, "readonly", True):
        raise FuseError(errno.EROFS)
    return cast("WritableFilesystem", fs)


def _need(call: IoctlCall, size: int) -> bytes:
    if len(call.data) < size:
        raise FuseError(errno.EINVAL)
    return call.data[:size]


def _get_flags(fs: Filesystem, call: IoctlCall) -> IoctlAnswer:
    return IoctlAnswer(_FLAGS.pack(inode_flags.visible_flags(fs.inode(call.ino))))


def _set_flags(fs: Filesystem, call: IoctlCall) -> IoctlAnswer:
    (flags,) = _FLAGS.unpack(_need(call, _FLAGS.size))
    _writable(fs).set_flags(call.ino, flags, call.uid)
    return IoctlAnswer(b"", changed_inode=True)


def _get_fsxattr(fs: Filesystem, call: IoctlCall) -> IoctlAnswer:
    attr = inode_flags.get_fsxattr(cast("WritableFilesystem", fs), fs.inode(call.ino))
    return IoctlAnswer(attr.pack())


def _set_fsxattr(fs: Filesystem, call: IoctlCall) -> IoctlAnswer:
    attr = inode_flags.FsxAttr.unpack(_need(call, inode_flags.FSXATTR.size))
    _writable(fs).set_fsxattr(call.ino, attr, call.uid)
    return IoctlAnswer(b"", changed_inode=True)


def _get_label(fs: Filesystem, call: IoctlCall) -> IoctlAnswer:
    if getattr(fs, "readonly", True):
        raw = bytes(fs.sb.fields["volume_name"])  # type: ignore[arg-type]
        return IoctlAnswer(raw.split(b"\0", 1)[0].ljust(LABEL_MAX + 1, b"\0"))
    return IoctlAnswer(_writable(fs).get_label())


def _set_label(fs: Filesystem, call: IoctlCall) -> IoctlAnswer:
    _writable(fs).set_label(call.data, call.uid)
    return IoctlAnswer(b"")


def _trim(fs: Filesystem, call: IoctlCall) -> IoctlAnswer:
    start, length, minlen = FSTRIM_RANGE.unpack(_need(call, FSTRIM_RANGE.size))
    trimmed = _writable(fs).trim(TrimRange(start, length, minlen), call.uid)
    return IoctlAnswer(FSTRIM_RANGE.pack(start, trimmed, minlen))


_HANDLERS: dict[int, Callable[[Filesystem, IoctlCall], IoctlAnswer]] = {
    FS_IOC_GETFLAGS: _get_flags,
    FS_IOC32_GETFLAGS: _get_flags,
    FS_IOC_SETFLAGS: _set_flags,
    FS_IOC32_SETFLAGS: _set_flags,
    FS_IOC_FSGETXATTR: _get_fsxattr,
    FS_IOC_FSSETXATTR: _set_fsxattr,
    FS_IOC_GETFSLABEL: _get_label,
    FS_IOC_SETFSLABEL: _set_label,
    FITRIM: _trim,
}
