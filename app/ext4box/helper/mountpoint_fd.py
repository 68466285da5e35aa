"""Which directory will the mount land on? Decided once, on an fd.

A path is only a question the kernel answers anew each time it is resolved:
between a check and a mount, the owner of any directory along the path can
swap it for a symbolic link to somewhere else (issue 14: /home/alice/mnt ->
/, and a mount meant for /home/alice/mnt/etc lands on /etc). So the helper
opens the mountpoint exactly once, refusing symbolic links in every
component (openat2 RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS), and from
then on works on that fd: the path the policy judges is the one the kernel
reports for the fd (/proc/self/fd/N), the owner checked is the fd's, and
the mount is attached to the fd itself (fusemount, move_mount).

RESOLVE_NO_XDEV is not used: legitimate mountpoints sit below other mounts
(/tmp, /home, a bind mount in a container), and crossing a mount is not what
an attacker needs; a symbolic link is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass

from ext4box.helper import syscalls
from ext4box.helper.errors import HelperError

_OPEN_FLAGS = os.O_PATH | os.O_CLOEXEC  # no O_DIRECTORY: fstat names a non-directory


@dataclass(frozen=True, slots=True)
class HeldMountpoint:
    """An O_PATH fd of the mountpoint directory and what was decided about it."""

    fd: int
    path: str  # the fd's path as the kernel reports it: what the policy judges
    owner: int  # st_uid of the directory

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def hold(arg: str, *, resolve_links: bool = True) -> HeldMountpoint:
    """Open the mountpoint once; raise HelperError (one line) if it is unusable.

    Symbolic links the user wrote in `arg` are resolved first, by realpath, as
    a convenience (unless resolve_links is False); the open then refuses any
    link, so a link swapped in after that point fails instead of redirecting
    the mount.
    """
    absolute = os.path.normpath(os.path.abspath(arg))
    try:
        real = os.path.realpath(absolute) if resolve_links else absolute
    except OSError as err:  # a link removed while realpath read it
        raise _mountpoint_error(arg, err, absolute) from None
    fd = _open_without_links(arg, real)
    try:
        return adopt(fd, arg)
    except BaseException:
        os.close(fd)
        raise


def adopt(fd: int, arg: str) -> HeldMountpoint:
    """What an fd opened by hold() refers to, read from the fd itself (the broker
    calls this on the fd its child opened as the caller). Leaves fd open on error."""
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise _mountpoint_error(arg, err) from None
    if not stat.S_ISDIR(st.st_mode):
        raise HelperError(f"mountpoint {arg} is not a directory")
    path = os.readlink(f"/proc/self/fd/{fd}")
    if not path.startswith("/") or path.endswith(" (deleted)"):
        raise HelperError(f"mountpoint {arg} was removed while it was being opened")
    return HeldMountpoint(fd, path, st.st_uid)


def check_owner(held: HeldMountpoint, uid: int) -> None:
    """Only root mounts on a directory it does not own (fusermount3's rule too)."""
    if uid != 0 and held.owner != uid:
        raise HelperError(
            f"mountpoint {held.path} belongs to uid {held.owner}, not to uid {uid};"
            " mount on a directory of your own"
        )


def _open_without_links(arg: str, real: str) -> int:
    try:
        return syscalls.openat2(
            syscalls.AT_FDCWD, real, _OPEN_FLAGS,
            syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS,
        )  # fmt: skip
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter
            raise _mountpoint_error(arg, err, real) from None
    return _walk_without_links(arg, real)


def _walk_without_links(arg: str, real: str) -> int:
    """openat2's RESOLVE_NO_SYMLINKS by hand: one O_NOFOLLOW open per component."""
    fd = os.open("/", _OPEN_FLAGS)
    try:
        for name in [part for part in real.split("/") if part]:
            try:
                child = os.open(name, _OPEN_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as err:
                raise _mountpoint_error(arg, err, real) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mountpoint_error(arg: str, err: OSError, real: str | None = None) -> HelperError:
    if err.errno == errno.ENOTCONN:
        return HelperError(
            f"mountpoint {arg} is a FUSE mount whose server is gone; run: ext4box umount {arg}"
        )
    if err.errno in (errno.ELOOP, errno.ENOTDIR) and real is not None:
        # realpath just resolved every link: one appeared since, or a
        # component is not a directory (any more).
        what = "a symbolic link" if err.errno == errno.ELOOP else "a non-directory"
        return HelperError(
            f"mountpoint {arg}: {real} now goes through {what}; refusing (was it swapped?)"
        )
    return HelperError(f"mountpoint {arg}: {err.strerror}")
