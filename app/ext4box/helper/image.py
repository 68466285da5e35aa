"""Open, lock and vet the image on the host before anything else sees it.

The helper, not the server, opens the image: by its real path only (no
symbolic link anywhere in the path), with exactly the access the policy
grants, and holds a lock on the open file description that travels with the
fd into the container, so the lock lives exactly as long as the server does.
The only bytes of the image the helper parses are the 1024 of the
superblock, to refuse features the policy names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass

from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock
from ext4box.helper import syscalls
from ext4box.helper.errors import HelperError

# Smallest thing that can hold the superblock; the protocol needs size > 0.
MIN_IMAGE_BYTES = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE


@dataclass(frozen=True, slots=True)
class OpenedImage:
    """An image fd the helper vetted; `path` is the resolved path it was opened by."""

    path: str
    fd: int
    mode: str  # "ro" | "rw": the fd's access mode matches it
    is_block_device: bool
    size: int

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def resolve_image_path(path: str) -> str:
    """The absolute path of the image, refusing any symbolic link on the way.

    Comparing the lexical absolute path with realpath catches a link in any
    component (a link in a parent directory makes them differ too). The open
    below re-checks with the kernel (openat2 RESOLVE_NO_SYMLINKS), so a link
    swapped in after this check still fails.
    """
    absolute = os.path.normpath(os.path.abspath(path))
    if not os.path.lexists(absolute):
        raise HelperError(f"image {path} does not exist")
    try:
        real = os.path.realpath(absolute)
    except OSError as err:  # a link removed while realpath read it
        raise HelperError(f"image {path}: {err.strerror}") from None
    if real != absolute:
        raise HelperError(
            f"refusing image path {path}: it goes through a symbolic link (resolves to {real});"
            " name the image by its real path"
        )
    return absolute


def open_image(path: str, mode: str, *, allow_block_device: bool = True) -> OpenedImage:
    """Open the image for `mode` ("ro" or "rw") and check what it is.

    `allow_block_device=False` refuses block devices before opening them (the
    policy has the final word either way; see mount_command.py).
    """
    resolved = resolve_image_path(path)
    flags = os.O_RDONLY if mode == "ro" else os.O_RDWR
    # O_NONBLOCK: opening a FIFO must not hang the helper; cleared below once
    # the fd is known to be a file or a device.
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        pre = os.lstat(resolved)
    except OSError as err:
        raise HelperError(f"cannot open image {path}: {err.strerror}") from None
    if stat.S_ISBLK(pre.st_mode):
        if not allow_block_device:
            raise HelperError(f"refusing image {path}: it is a block device")
        if mode == "rw":
            flags |= os.O_EXCL  # a block device mounted by the kernel refuses EBUSY
    elif not stat.S_ISREG(pre.st_mode):
        raise HelperError(
            f"refusing image {path}: it is a {_kind(pre.st_mode)}, not a regular file"
            " or block device"
        )
    fd = _open_no_symlinks(path, resolved, flags, mode)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (pre.st_dev, pre.st_ino):
            raise HelperError(f"image {path} changed while it was being opened; try again")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        is_block = stat.S_ISBLK(st.st_mode)
        size = os.lseek(fd, 0, os.SEEK_END) if is_block else st.st_size
        os.lseek(fd, 0, os.SEEK_SET)
        if size < MIN_IMAGE_BYTES:
            raise HelperError(f"image {path} is {size} bytes, too small to be ext4")
    except BaseException:
        os.close(fd)
        raise
    return OpenedImage(resolved, fd, mode, is_block, size)


def _open_no_symlinks(path: str, resolved: str, flags: int, mode: str) -> int:
    try:
        fd = _openat2(resolved, flags)
        if fd is None:  # no openat2 here: O_NOFOLLOW guards the last component
            fd = os.open(resolved, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise HelperError(
                f"refusing image path {path}: it goes through a symbolic link"
            ) from None
        if err.errno == errno.ENOENT:
            raise HelperError(f"image {path} does not exist") from None
        if err.errno == errno.EBUSY:
            raise HelperError(f"image {path} is in use (a mounted block device)") from None
        access = "read-only" if mode == "ro" else "read-write"
        raise HelperError(f"cannot open image {path} {access}: {err.strerror}") from None
    return fd


def _openat2(path: str, flags: int) -> int | None:
    """openat2(RESOLVE_NO_SYMLINKS): the kernel refuses a link in any component."""
    try:
        return syscalls.openat2(
            syscalls.AT_FDCWD, path, flags,
            syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS,
        )  # fmt: skip
    except OSError as err:
        if err.errno in (errno.ENOSYS, errno.EPERM):  # old kernel, or a seccomp filter said no
            return None
        raise


def lock_image(image: OpenedImage) -> None:
    """flock the open file description: shared for ro, exclusive for rw.

    The lock belongs to the open file description, which the server's copy
    of the fd shares: it lasts until the server exits, not the helper.
    """
    operation = (fcntl.LOCK_SH if image.mode == "ro" else fcntl.LOCK_EX) | fcntl.LOCK_NB
    try:
        fcntl.flock(image.fd, operation)
    except BlockingIOError:
        if image.mode == "ro":
            raise HelperError(f"image {image.path} is already mounted read-write") from None
        raise HelperError(
            f"image {image.path} is already mounted (a read-write mount needs it unused)"
        ) from None
    except OSError as err:
        raise HelperError(f"cannot lock image {image.path}: {err.strerror}") from None


def read_superblock(image: OpenedImage) -> Superblock:
    """Parse the 1024 superblock bytes, the only image bytes the helper reads."""
    try:
        raw = os.pread(image.fd, SUPERBLOCK_SIZE, SUPERBLOCK_OFFSET)
    except OSError as err:
        raise HelperError(f"cannot read image {image.path}: {err.strerror}") from None
    try:
        return Superblock.parse(raw)
    except Ext4Error as err:
        raise HelperError(f"image {image.path} is not a usable ext4 filesystem: {err}") from None


def check_features(image: OpenedImage, refused: tuple[str, ...], rule: str | None) -> None:
    """Refuse the image if its superblock has a feature the matching rule refuses."""
    if not refused:
        return
    present = set(read_superblock(image).feature_names())
    hits = [name for name in refused if name in present]
    if hits:
        raise HelperError(
            f"refusing image {image.path}: it has ext4 feature(s) {', '.join(hits)}"
            f', refused by rule "{rule}"'
        )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "special file"
