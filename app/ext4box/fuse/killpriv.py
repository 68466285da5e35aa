"""The privilege-clearing rules the VFS leaves to a FUSE server, and the clock.

A write, truncate or chown by someone without CAP_FSETID clears set-user-ID
and (with group-exec) set-group-ID; a write by anyone drops file
capabilities (security.capability), as file_remove_privs does.
"""

from __future__ import annotations

import stat
import struct
import time

from ext4box.ext4.format.inode import Inode
from ext4box.ext4.format.xattr import XATTR_MAGIC

_XATTR_MAGIC_BYTES = struct.pack("<I", XATTR_MAGIC)


def now_ns() -> int:
    return time.time_ns()


def killpriv_mode(mode: int) -> int | None:
    """The mode after clearing suid/sgid as the kernel does for a write or truncate.

    S_ISUID always goes; S_ISGID only with group-exec (without it, it marks
    mandatory locking, not a privilege). None when nothing changes.
    """
    new = mode & ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        new &= ~stat.S_ISGID
    return new if new != mode else None


def may_have_xattrs(inode: Inode) -> bool:
    """False only when the inode certainly has no extended attribute at all."""
    return bool(inode.file_acl) or inode.ibody_xattr_area[:4] == _XATTR_MAGIC_BYTES
