"""May the helper trust an image's bytes to stay what the policy checked?

A rule that pins a SHA-256 or refuses ext4 features judges the image's
bytes at one moment; the server parses them later. That judgement is worth
something only if nobody can change the bytes in between (issue 14: the
owner set the casefold bit after the decision). So such a rule admits an
image only if

  - no one but root can write it (owner root, no group or other write bit,
    no ACL granting write; a block device may also be writable by the group
    "disk", which is root's in all but name); a loop device is judged by its
    backing file too, and a network block device (nbd) is refused: a
    userspace server supplies its bytes;
  - it is not on a FUSE filesystem (its server decides the bytes at will);
  - nobody has it open for writing now (a read lease, F_RDLCK, fails with
    EAGAIN while any writer exists; for a read-write mount a write lease,
    which fails while the file is open anywhere else). Leases exist for
    regular files only, and need CAP_LEASE for a file one does not own:
    without it (an unprivileged helper) the check is logged as skipped.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import stat
import struct
from pathlib import Path

from ext4box.helper import syscalls
from ext4box.helper.errors import HelperError
from ext4box.helper.image import OpenedImage
from ext4box.log import get_logger
from ext4box.policy import Decision

log = get_logger("ext4box.helper")

_ACL_XATTR = "system.posix_acl_access"
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")  # tag, perm, id
_ACL_USER, _ACL_GROUP, _ACL_MASK = 0x02, 0x08, 0x10
_ACL_WRITE = 0x02
_NBD_MAJOR = 43


def pins_bytes(decision: Decision) -> bool:
    """Does the rule that allowed this judge the image's bytes?"""
    winner = next((v.rule for v in decision.verdicts if v.matched), None)
    return winner is not None and bool(winner.sha256 or winner.refuse_features)


def check_unchangeable(image: OpenedImage, decision: Decision) -> None:
    """Raise HelperError (one line, naming why) unless the image's bytes are safe
    from everyone but root for as long as the mount lasts."""
    why = _why_changeable(image)
    if why is not None:
        raise HelperError(
            f'refusing image {image.path}: rule "{decision.rule}" judges its bytes'
            f" (sha256 or refuse_features), but {why}"
        )


def _why_changeable(image: OpenedImage) -> str | None:
    why = _why_writable(image.fd, image.is_block_device)
    if why is not None:
        return why
    if image.is_block_device:
        return _why_device_changeable(os.fstat(image.fd))
    return _open_elsewhere(image)


def _why_writable(fd: int, is_block_device: bool) -> str | None:
    """Who besides root could write the file (or device node) fd refers to?"""
    st = os.fstat(fd)
    if syscalls.fstatfs_type(fd) == syscalls.FUSE_SUPER_MAGIC:
        return "it is on a FUSE filesystem, whose server can change its bytes at any time"
    if st.st_uid != 0:
        return f"it belongs to uid {st.st_uid}; only images no one but root can write qualify"
    if st.st_mode & 0o002 or (st.st_mode & 0o020 and not _root_group(st, is_block_device)):
        return f"its mode {stat.S_IMODE(st.st_mode):04o} lets others write it"
    if _acl_grants_write(fd):
        return "an ACL lets others write it"
    return None


def _why_device_changeable(st: os.stat_result) -> str | None:
    """A block device's bytes may come from somewhere a user controls."""
    if os.major(st.st_rdev) == _NBD_MAJOR:
        return "it is a network block device, whose bytes a userspace server supplies"
    device = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}").resolve()
    if (device / "partition").exists():
        device = device.parent  # a partition of a loop device: the loop is its parent
    try:
        backing = (device / "loop/backing_file").read_text().strip()
    except OSError:
        return None  # not a loop device
    if backing.endswith(" (deleted)"):
        return "it is a loop device whose backing file was deleted"
    try:
        fd = os.open(backing, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        return f"it is a loop device of {backing}, which cannot be checked ({err.strerror})"
    try:
        why = _why_writable(fd, is_block_device=False)
    finally:
        os.close(fd)
    return None if why is None else f"it is a loop device of {backing}, and {why}"


def _root_group(st: os.stat_result, is_block_device: bool) -> bool:
    if st.st_gid == 0:
        return True
    if not is_block_device:
        return False
    try:
        return grp.getgrgid(st.st_gid).gr_name == "disk"
    except KeyError:
        return False


def _acl_grants_write(fd: int) -> bool:
    try:
        # Through /proc: fgetxattr refuses the O_PATH fd of a loop's backing file.
        raw = os.getxattr(f"/proc/self/fd/{fd}", _ACL_XATTR)
    except OSError:
        return False  # no ACL (ENODATA) or none supported: the mode bits rule
    entries = [
        _ACL_ENTRY.unpack_from(raw, offset)
        for offset in range(_ACL_HEADER.size, len(raw) - _ACL_ENTRY.size + 1, _ACL_ENTRY.size)
    ]
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 0o7)
    return any(
        tag in (_ACL_USER, _ACL_GROUP) and perm & mask & _ACL_WRITE for tag, perm, _ in entries
    )


def _open_elsewhere(image: OpenedImage) -> str | None:
    lease = fcntl.F_RDLCK if image.mode == "ro" else fcntl.F_WRLCK
    try:
        fcntl.fcntl(image.fd, fcntl.F_SETLEASE, lease)
    except OSError as err:
        if err.errno == errno.EAGAIN:
            if image.mode == "ro":
                return "another process has it open for writing"
            return "another process has it open (a read-write mount of it needs it unused)"
        if err.errno == errno.EACCES and os.geteuid() != 0:
            log.info("writer_check_skipped", image=image.path, why="no CAP_LEASE as non-root")
            return None
        return f"whether another process writes it cannot be told (lease: {err.strerror})"
    fcntl.fcntl(image.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return None
