"""Which mount is at a path or behind an fd, and unmounting exactly that one.

Mounts are named by the kernel's mount id (/proc/self/mountinfo,
/proc/self/fdinfo), never by a path alone: a path is reached from its parent
directory opened without following any link, and the mount found there must
be the one expected before umount2 goes through that same parent fd.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from ext4box.helper import fusemount, syscalls
from ext4box.helper.errors import HelperError


@dataclass(frozen=True, slots=True)
class MountInfo:
    mount_id: int
    parent_id: int
    device: str  # major:minor
    fstype: str


def mount_infos() -> dict[int, MountInfo]:
    found = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            left, sep, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if sep and len(fields) >= 5 and tail and fields[0].isdigit() and fields[1].isdigit():
                info = MountInfo(int(fields[0]), int(fields[1]), fields[2], tail[0])
                found[info.mount_id] = info
    return found


def mount_id_of(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key == "mnt_id":
                return int(value)
    raise HelperError("the kernel does not report mount ids (/proc/self/fdinfo has no mnt_id)")


def mount_id_at(mountpoint: str) -> int:
    """The id of the mount now at `mountpoint`, reached without following any link."""
    parent_fd = open_no_symlinks(os.path.dirname(mountpoint))
    try:
        child = os.open(os.path.basename(mountpoint), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=parent_fd)  # fmt: skip
        try:
            return mount_id_of(child)
        finally:
            os.close(child)
    finally:
        os.close(parent_fd)


def open_no_symlinks(path: str) -> int:
    """An O_PATH fd of a directory; a symbolic link anywhere in `path` fails (ELOOP)."""
    try:
        return syscalls.openat2(
            syscalls.AT_FDCWD, path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
            syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS,
        )  # fmt: skip
    except OSError as err:
        if err.errno in (errno.ENOSYS, errno.EPERM):  # refuse rather than walk links as root
            raise HelperError("this kernel lacks openat2(2); the broker needs it") from None
        raise


def id_of_new_mount(mount_fd: int | None, dir_fd: int, mountpoint: str) -> int:
    """The id of the FUSE mount just attached on the directory dir_fd holds.

    Read from the mount's own fd (the new mount API); after the mount(2)
    fallback, which gives no such fd, found at `mountpoint`. Either way it
    must be an ext4box mount stacked on dir_fd's mount.
    """
    mount_id = mount_id_of(mount_fd) if mount_fd is not None else mount_id_at(mountpoint)
    info = mount_infos().get(mount_id)
    if info is None or info.fstype != fusemount.FSTYPE or info.parent_id != mount_id_of(dir_fd):
        raise HelperError(f"cannot find the new mount on {mountpoint}")
    return mount_id


def unmount_exact(mountpoint: str, mount_id: int | None) -> str:
    """Unmount the mount at `mountpoint` if it is ours (mount_id); returns its device.

    The parent directory is held by an fd opened without following links,
    the mount below it is identified by id, and umount2 goes through that
    same parent fd: a directory swapped for a link meanwhile is never followed.
    """
    if mountpoint == "/" or not mountpoint.startswith("/"):
        raise HelperError(f"refusing to unmount {mountpoint}")
    name = os.path.basename(mountpoint)
    try:
        parent_fd = open_no_symlinks(os.path.dirname(mountpoint))
    except OSError as err:
        raise HelperError(f"cannot reach {mountpoint}: {err.strerror}") from None
    try:
        try:
            child = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except OSError as err:
            raise HelperError(f"cannot reach {mountpoint}: {err.strerror}") from None
        try:
            found = mount_id_of(child)
        finally:
            os.close(child)
        info = mount_infos().get(found)
        if (
            info is None
            or info.fstype != fusemount.FSTYPE
            or (mount_id is not None and found != mount_id)
        ):
            raise HelperError(
                f"{mountpoint} is no longer the ext4box mount the broker made; not unmounting it"
            )
        # Not through the child fd itself: an open fd of the mount makes a
        # plain (not lazy) umount2 fail with EBUSY.
        target = f"/proc/self/fd/{parent_fd}/{name}"
        try:
            syscalls.umount2(target, fusemount.UMOUNT_NOFOLLOW)
        except OSError as err:
            if err.errno == errno.EBUSY:
                raise HelperError(
                    f"cannot unmount {mountpoint}: it is busy (files open or a cwd in it)"
                ) from None
            raise HelperError(f"cannot unmount {mountpoint}: {err.strerror}") from None
        return info.device
    finally:
        os.close(parent_fd)
