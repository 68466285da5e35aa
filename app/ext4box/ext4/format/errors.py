"""The one error family of the on-disk format layer.

Everything the image can get wrong becomes a `Corrupt` naming the structure,
where it lives (inode, block, group) and why it is rejected. Layers above map
these to errno values; nothing here knows about FUSE.
"""

from __future__ import annotations

import errno


class Ext4Error(Exception):
    """Base of every error raised by the ext4 layer."""

    errno: int = errno.EIO


class Corrupt(Ext4Error):
    """A structure on the image is malformed or fails its checksum."""

    errno = errno.EUCLEAN

    def __init__(self, what: str, where: str, why: str) -> None:
        super().__init__(f"corrupt {what} at {where}: {why}")
        self.what = what
        self.where = where
        self.why = why


class Unsupported(Ext4Error):
    """The image uses a feature this implementation refuses to serve."""

    errno = errno.EOPNOTSUPP

    def __init__(self, feature: str, where: str = "", detail: str = "") -> None:
        text = f"unsupported {feature}"
        if where:
            text += f" at {where}"
        if detail:
            text += f": {detail}"
        super().__init__(text)
        self.feature = feature
        self.where = where
        self.detail = detail


class NotExt4(Ext4Error):
    """The device does not hold an ext2/3/4 filesystem at all."""

    errno = errno.EINVAL


class NotFound(Ext4Error):
    """A name does not exist in a directory."""

    errno = errno.ENOENT


class NotADirectory(Ext4Error):
    errno = errno.ENOTDIR


class IsADirectory(Ext4Error):
    errno = errno.EISDIR


class NotASymlink(Ext4Error):
    errno = errno.EINVAL


class NoData(Ext4Error):
    """An extended attribute does not exist."""

    errno = errno.ENODATA


class ReadOnly(Ext4Error):
    errno = errno.EROFS


def inode_where(ino: int) -> str:
    return f"inode {ino}"


def block_where(block: int, ino: int | None = None) -> str:
    return f"block {block}" if ino is None else f"block {block} (inode {ino})"


def group_where(group: int) -> str:
    return f"group {group}"


class NoSpace(Ext4Error):
    """No free blocks or inodes (or no room left in an inode / xattr block)."""

    errno = errno.ENOSPC


class FileTooBig(Ext4Error):
    """Past the largest size the inode's block map (or the filesystem) can address."""

    errno = errno.EFBIG


class NotPermitted(Ext4Error):
    """The caller may not do this (an owner or privilege check, a flag forbids it)."""

    errno = errno.EPERM


class InvalidArgument(Ext4Error):
    errno = errno.EINVAL


class Exists(Ext4Error):
    errno = errno.EEXIST


class NotEmpty(Ext4Error):
    errno = errno.ENOTEMPTY


class InvalidName(Ext4Error):
    """An empty name, or one containing '/' or NUL."""

    errno = errno.EINVAL


class NameTooLong(Ext4Error):
    errno = errno.ENAMETOOLONG


class TooManyLinks(Ext4Error):
    errno = errno.EMLINK
