"""Which mount is at a path or behind an fd, and unmounting exactly that one.

Mounts are named by the kernel's mount id (/proc/self/mountinfo,
/proc/self/fdinfo), never by a path alone: a path is reached from its parent
directory opened without following any link, and the mount found there must
be the one expected before umount2 goes through that same parent fd.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from ext4box.helper import fusemount
from ext4box.helper import image as image_module
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
    fd = image_module._openat2(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    if fd is None:  # no openat2: refuse rather than walk links as root
        raise HelperError("this kernel lacks openat2(2); the broker needs it")
    return fd


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
        libc = ctypes.CDLL(None, use_errno=True)
        target = f"/proc/self/fd/{parent_fd}/{name}"
        if libc.umount2(os.fsencode(target), ctypes.c_int(fusemount.UMOUNT_NOFOLLOW)) != 0:
            err = ctypes.get_errno()
            if err == errno.EBUSY:
                raise HelperError(
                    f"cannot unmount {mountpoint}: it is busy (files open or a cwd in it)"
                )
            raise HelperError(f"cannot unmount {mountpoint}: {os.strerror(err)}")
        return info.device
    finally:
        os.close(parent_fd)
