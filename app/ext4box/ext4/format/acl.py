"""POSIX ACLs: ext4's on-disk form <-> the form getxattr/setxattr carry.

On disk (system.posix_acl_access / _default, name index 2 / 3) ext4 stores a
version-1 header and then entries whose size depends on their tag: the
owner, owning group, mask and other entries are 4 bytes (tag, perm), named
users and groups are 8 (tag, perm, id). The kernel hands user space the
generic form instead: a version-2 header and 8-byte entries for all tags,
with id 0xFFFFFFFF for those that carry none.

Reading is as lenient as the kernel's (it does not check the entry order of
an ACL it reads back); writing applies the same validity rules the kernel
applies before it stores an ACL (posix_acl_valid), so nothing we write is an
ACL the kernel would refuse. Like the kernel, named ids need not be sorted.
"""

from __future__ import annotations

import errno
import struct

from ext4box.ext4.format.errors import Corrupt, Ext4Error, NoData

EXT4_ACL_VERSION = 1
POSIX_ACL_XATTR_VERSION = 2
UNDEFINED_ID = 0xFFFFFFFF

ACL_USER_OBJ = 0x01
ACL_USER = 0x02
ACL_GROUP_OBJ = 0x04
ACL_GROUP = 0x08
ACL_MASK = 0x10
ACL_OTHER = 0x20

_WITH_ID = frozenset({ACL_USER, ACL_GROUP})
_KNOWN_TAGS = frozenset({ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER})
_PERM_BITS = 0o7

_HEADER = struct.Struct("<I")
_DISK_SHORT = struct.Struct("<HH")  # tag, perm
_DISK_LONG = struct.Struct("<HHI")  # tag, perm, id
_XATTR_ENTRY = struct.Struct("<HHI")  # tag, perm, id (all tags)


class InvalidAcl(Ext4Error):
    """An ACL handed to us for storing is refused, with the kernel's errno:
    EOPNOTSUPP for an unknown version, EINVAL for anything else."""

    def __init__(self, why: str, code: int = errno.EINVAL) -> None:
        super().__init__(why)
        self.errno = code


def acl_disk_to_xattr(value: bytes, *, where: str) -> bytes:
    """ext4's stored ACL -> what getxattr("system.posix_acl_*") returns.

    A header without entries is no ACL at all: NoData, as the kernel answers.
    """
    what = "ACL"
    if len(value) < _HEADER.size:
        raise Corrupt(what, where, f"{len(value)} bytes is shorter than the header")
    (version,) = _HEADER.unpack_from(value)
    if version != EXT4_ACL_VERSION:
        raise Corrupt(what, where, f"version {version}, not {EXT4_ACL_VERSION}")
    count = _disk_entry_count(len(value))
    if count is None:
        raise Corrupt(what, where, f"{len(value)} bytes is not a whole number of entries")
    out = bytearray(_HEADER.pack(POSIX_ACL_XATTR_VERSION))
    pos = _HEADER.size
    for _ in range(count):
        if pos + _DISK_SHORT.size > len(value):
            raise Corrupt(what, where, f"entry at offset {pos} is cut short")
        tag, perm = _DISK_SHORT.unpack_from(value, pos)
        if tag not in _KNOWN_TAGS:
            raise Corrupt(what, where, f"unknown tag {tag:#x} at offset {pos}")
        if tag in _WITH_ID:
            if pos + _DISK_LONG.size > len(value):
                raise Corrupt(what, where, f"entry at offset {pos} is cut short")
            _, _, id_ = _DISK_LONG.unpack_from(value, pos)
            pos += _DISK_LONG.size
        else:
            id_ = UNDEFINED_ID
            pos += _DISK_SHORT.size
        out += _XATTR_ENTRY.pack(tag, perm, id_)
    if pos != len(value):
        raise Corrupt(what, where, f"entries end at {pos}, the value at {len(value)}")
    if len(out) == _HEADER.size:
        raise NoData(f"empty ACL at {where}")
    return bytes(out)


def _disk_entry_count(size: int) -> int | None:
    """Entries in a stored ACL of `size` bytes, as the kernel counts them: the four
    short entries every valid ACL has, then 8-byte named ones. None: impossible size."""
    body = size - _HEADER.size
    beyond_short = body - 4 * _DISK_SHORT.size
    if beyond_short < 0:
        return None if body % _DISK_SHORT.size else body // _DISK_SHORT.size
    if beyond_short % _DISK_LONG.size:
        return None
    return beyond_short // _DISK_LONG.size + 4


def acl_xattr_to_disk(value: bytes) -> bytes:
    """What setxattr("system.posix_acl_*") received -> ext4's stored form.

    Raises InvalidAcl for anything the kernel's posix_acl_valid would refuse.
    Whether an access ACL is needed at all (one that only mirrors the mode
    bits is folded into i_mode by the kernel) is the caller's decision.
    """
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _XATTR_ENTRY.size:
        raise InvalidAcl(f"ACL of {len(value)} bytes is not a header plus 8-byte entries")
    (version,) = _HEADER.unpack_from(value)
    if version != POSIX_ACL_XATTR_VERSION:
        raise InvalidAcl(f"ACL version {version}, not {POSIX_ACL_XATTR_VERSION}", errno.EOPNOTSUPP)
    entries = [
        (tag, perm, id_)
        for tag, perm, id_ in _XATTR_ENTRY.iter_unpack(memoryview(value)[_HEADER.size :])
    ]
    _check_valid(entries)
    out = bytearray(_HEADER.pack(EXT4_ACL_VERSION))
    for tag, perm, id_ in entries:
        if tag in _WITH_ID:
            out += _DISK_LONG.pack(tag, perm, id_)
        else:
            out += _DISK_SHORT.pack(tag, perm)
    return bytes(out)


# The states of posix_acl_valid's walk: which tags may come next.
_EXPECT_OWNER, _IN_USERS, _IN_GROUPS, _EXPECT_OTHER, _DONE = range(5)


def _check_valid(entries: list[tuple[int, int, int]]) -> None:
    """The kernel's posix_acl_valid: owner, named users, owning group, named
    groups, mask (required iff named entries exist), other; perms only rwx."""
    if not entries:
        # The kernel reads an empty ACL as "remove the ACL": not something to store.
        raise InvalidAcl("ACL without entries")
    state = _EXPECT_OWNER
    needs_mask = False
    for tag, perm, id_ in entries:
        if perm & ~_PERM_BITS:
            raise InvalidAcl(f"ACL permission {perm:#o} has bits beyond rwx")
        if tag == ACL_USER_OBJ and state == _EXPECT_OWNER:
            state = _IN_USERS
        elif tag == ACL_USER and state == _IN_USERS:
            needs_mask = True
        elif tag == ACL_GROUP_OBJ and state == _IN_USERS:
            state = _IN_GROUPS
        elif tag == ACL_GROUP and state == _IN_GROUPS:
            needs_mask = True
        elif tag == ACL_MASK and state == _IN_GROUPS:
            state = _EXPECT_OTHER
        elif tag == ACL_OTHER and (
            state == _EXPECT_OTHER or (state == _IN_GROUPS and not needs_mask)
        ):
            state = _DONE
        else:
            raise InvalidAcl(f"ACL entry with tag {tag:#x} out of place")
        if tag in _WITH_ID and id_ == UNDEFINED_ID:
            raise InvalidAcl("named ACL entry without an id")
    if state != _DONE:
        raise InvalidAcl("ACL is incomplete")
