"""How an inode's Attributes become the attribute parts of a FUSE reply.

fuse_attr's values, and the ENTRY, ATTR and STATX replies built from them,
each with the validity (entry_timeout, attr_timeout) the kernel may cache
them for. dispatch.py's handlers pack their replies through these.
"""

from __future__ import annotations

import os

from ext4box.fuse import protocol as p
from ext4box.fuse.attrs import Attributes, entry_ids

_ATTR_FLAGS = 0  # fuse_attr.flags: no submount, no DAX
_U64 = (1 << 64) - 1


def _valid(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def pack_attr_values(attr: Attributes) -> tuple[int, ...]:
    """fuse_attr's values in declaration order.

    Seconds are unsigned in the header, signed in the kernel: times before
    1970 travel as their two's complement (nanoseconds stay 0..999999999).
    """
    return (
        attr.ino, attr.size, attr.blocks,
        (attr.atime_ns // 1_000_000_000) & _U64, (attr.mtime_ns // 1_000_000_000) & _U64,
        (attr.ctime_ns // 1_000_000_000) & _U64,
        attr.atime_ns % 1_000_000_000, attr.mtime_ns % 1_000_000_000,
        attr.ctime_ns % 1_000_000_000,
        attr.mode, attr.nlink, attr.uid, attr.gid, attr.rdev & 0xFFFFFFFF, attr.blksize,
        _ATTR_FLAGS,
    )  # fmt: skip


def _sx_time(time_ns: int) -> tuple[int, int]:
    return time_ns // 1_000_000_000, time_ns % 1_000_000_000


def pack_statx_out(attr: Attributes) -> bytes:
    """fuse_statx_out: every basic field, and btime when the inode records one.

    ext4 reports btime only when the inode is large enough to hold i_crtime;
    an inode without it reads as crtime 0 here, so 0 means "none".
    """
    attr_s, attr_ns = _valid(attr.attr_timeout)
    mask = p.STATX_BASIC_STATS | (p.STATX_BTIME if attr.crtime_ns else 0)
    return p.STATX_OUT.pack(
        attr_s, attr_ns, 0,
        mask, attr.blksize, 0, attr.nlink, attr.uid, attr.gid, attr.mode, attr.ino,
        attr.size, attr.blocks, 0,
        *_sx_time(attr.atime_ns), *_sx_time(attr.crtime_ns), *_sx_time(attr.ctime_ns),
        *_sx_time(attr.mtime_ns),
        os.major(attr.rdev), os.minor(attr.rdev), 0, 0,
    )  # fmt: skip


def pack_entry(attr: Attributes) -> bytes:
    entry_s, entry_ns = _valid(attr.entry_timeout)
    attr_s, attr_ns = _valid(attr.attr_timeout)
    return p.ENTRY_OUT.pack(*entry_ids(attr), entry_s, attr_s, entry_ns, attr_ns,
                            *pack_attr_values(attr))


def pack_attr_out(attr: Attributes) -> bytes:
    attr_s, attr_ns = _valid(attr.attr_timeout)
    return p.ATTR_OUT.pack(attr_s, attr_ns, *pack_attr_values(attr))
