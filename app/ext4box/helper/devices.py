"""Block devices named under /dev, for the broker's grant_access rules.

A user may name a device by its node (/dev/sdb1) or by a link udev keeps
(/dev/disk/by-id/usb-...-part1). The broker follows such a link only where
nobody but root can have made it: the link and every directory above it are
root's and writable by root only (so not /dev/shm or /dev/mqueue), and it
must lead to a block device node under /dev, itself in root-only directories.
Everything else is opened as the user, with symbolic links refused.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ext4box.helper.errors import HelperError
from ext4box.helper.image import OpenedImage, open_image

DEV = "/dev/"


@dataclass(frozen=True, slots=True)
class DeviceName:
    node: str  # the device node, resolved: /dev/sdb1
    links: tuple[str, ...]  # the root-owned link the user named, if any
    rdev: int  # st_rdev of the node when it was named


def device_name(path: str) -> DeviceName | None:
    """The block device `path` names under /dev, or None if it names none safely."""
    path = os.path.normpath(path)
    if not path.startswith(DEV) or not _root_only_dirs(os.path.dirname(path)):
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    links: tuple[str, ...] = ()
    node = path
    if stat.S_ISLNK(st.st_mode):
        if st.st_uid != 0:
            return None
        node, links = os.path.realpath(path), (path,)
        if not node.startswith(DEV) or not _root_only_dirs(os.path.dirname(node)):
            return None
        try:
            st = os.lstat(node)
        except OSError:
            return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return DeviceName(node, links, st.st_rdev)


def _root_only_dirs(directory: str) -> bool:
    """Each component of `directory`, from /, is a real directory of root's that
    only root can write (no links, no sticky exceptions)."""
    current = "/"
    for part in [p for p in directory.split("/") if p]:
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except OSError:
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            return False
    return True


def open_device(device: DeviceName, mode: str) -> OpenedImage:
    """Open the device node as the broker; it must still be the device that was named."""
    image = open_image(device.node, mode)
    st = os.fstat(image.fd)
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != device.rdev:
        image.close()
        raise HelperError(f"device {device.node} changed while it was being opened; try again")
    return image
