"""May this change be made to an inode, given its immutable and append-only flags?

The kernel refuses these changes in the VFS from the in-memory S_IMMUTABLE and
S_APPEND bits (may_open, may_delete, may_create, vfs_link, notify_change,
xattr_permission, vfs_fallocate) and in ext4_setattr / ext4_write_checks. A
FUSE inode never carries those bits, so the kernel leaves every one of these
checks to us. Each writing operation calls the one check of its kind here:

- a new name in a directory (create, mkdir, symlink, mknod, link, rename's
  target): `check_may_add` — EPERM in an immutable directory;
- a name removed or replaced (unlink, rmdir, rename source and target):
  `check_may_delete` — EPERM from an immutable or append-only directory and
  for an immutable or append-only victim;
- a second name for an inode: `check_may_link`;
- setattr: `check_setattr` — an immutable inode refuses everything (ext4_setattr);
  an append-only one refuses mode, owner, explicit times and any size change
  (truncate(2) and ftruncate(2) check IS_APPEND before the size is looked at),
  but allows setting the times to now (touch);
- extended attributes: `check_xattr_change` — immutable or append-only: EPERM;
- file data: `check_data_write` — immutable: EPERM (ext4_write_checks);
- opening, and each write with the file's current flags: `check_open` —
  writing or truncating an immutable file, or writing an append-only file
  without O_APPEND, or truncating it at open: EPERM (may_open, setfl).

(fallocate makes vfs_fallocate's two checks itself, in fallocate.py.)
"""

from __future__ import annotations

import os

from ext4box.ext4.format.errors import NotPermitted
from ext4box.ext4.format.inode import FL_APPEND, FL_IMMUTABLE, Inode


class FlagForbids(NotPermitted):
    """An immutable or append-only flag forbids the change (EPERM)."""


def _is_immutable(inode: Inode) -> bool:
    return bool(inode.flags & FL_IMMUTABLE)


def _is_append(inode: Inode) -> bool:
    return bool(inode.flags & FL_APPEND)


def _refuse(inode: Inode, what: str) -> FlagForbids:
    kind = "immutable" if _is_immutable(inode) else "append-only"
    return FlagForbids(f"{what}: inode {inode.ino} is {kind}")


def check_may_add(directory: Inode) -> None:
    """A new entry in `directory` (may_create: write permission on the directory)."""
    if _is_immutable(directory):
        raise _refuse(directory, "new name")


def check_may_delete(directory: Inode, victim: Inode) -> None:
    """Removing or replacing the entry of `victim` in `directory` (may_delete)."""
    if _is_immutable(directory) or _is_append(directory):
        raise _refuse(directory, "removing a name")
    if _is_immutable(victim) or _is_append(victim):
        raise _refuse(victim, "removing a name")


def check_may_link(inode: Inode) -> None:
    """A new hard link to `inode` (vfs_link)."""
    if _is_immutable(inode) or _is_append(inode):
        raise _refuse(inode, "hard link")


def check_setattr(inode: Inode, *, owner_or_mode: bool, size: bool, times: bool,
                  times_now: bool) -> None:
    """A setattr changing the owner or mode, the size, and/or the times; `times_now`:
    the times are set to the current time (utimes with NULL / UTIME_NOW), which
    an append-only inode allows."""
    if _is_immutable(inode):
        raise _refuse(inode, "setattr")
    if _is_append(inode) and (owner_or_mode or size or (times and not times_now)):
        raise _refuse(inode, "setattr")


def check_xattr_change(inode: Inode) -> None:
    """Setting or removing an extended attribute (ACLs included)."""
    if _is_immutable(inode) or _is_append(inode):
        raise _refuse(inode, "extended attribute change")


def check_data_write(inode: Inode) -> None:
    """Any change of the file's data (write, mapping blocks for a write)."""
    if _is_immutable(inode):
        raise _refuse(inode, "write")


def check_open(inode: Inode, flags: int) -> None:
    """Opening `inode` with open(2) `flags`, or writing through a file whose current
    flags (fcntl may have cleared O_APPEND) are `flags`."""
    writes = flags & os.O_ACCMODE != os.O_RDONLY
    truncates = bool(flags & os.O_TRUNC)
    if _is_immutable(inode) and (writes or truncates):
        raise _refuse(inode, "open for writing")
    if _is_append(inode) and ((writes and not flags & os.O_APPEND) or truncates):
        raise _refuse(inode, "open for writing without O_APPEND")
