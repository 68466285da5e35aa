"""Whether an image may be mounted read-write, and the superblock state of such a mount.

Refused read-write (read-only stays possible) as the kernel refuses or as
writing without the missing machinery would damage the image:
- a journal that still needs recovery (Filesystem.open replays it before
  checking, see ext4/journal/recovery.py), an external journal;
- the errors flag (the image wants e2fsck first);
- RO_COMPAT features we do not write correctly (unknown bits, quota files we
  would not update, readonly, bigalloc, snapshots, replica, shared blocks);
- MMP (the multi-mount protection protocol is not implemented, and a
  sequence other than "clean" means another node or e2fsck has it);
- orphan_file with inodes recorded in it (processing it is not implemented).

A rw mount marks the superblock not clean and counts the mount, as the kernel
does without a journal, frees what the orphan list holds, and a clean close
writes the state back.
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4 import features as F
from ext4box.ext4 import orphans
from ext4box.ext4.errors import ReadOnly, Unsupported
from ext4box.ext4.superblock import (
    STATE_ERROR,
    STATE_VALID,
    Superblock,
    clean_unmount_changes,
    mount_changes,
)

if TYPE_CHECKING:
    from ext4box.ext4.writable import WritableFilesystem

log = structlog.get_logger("ext4box.ext4")

# RO_COMPAT bits whose structures we keep right when writing.
_RO_COMPAT_WRITABLE = (
    F.RO_COMPAT_SPARSE_SUPER
    | F.RO_COMPAT_LARGE_FILE
    | F.RO_COMPAT_BTREE_DIR
    | F.RO_COMPAT_HUGE_FILE
    | F.RO_COMPAT_GDT_CSUM
    | F.RO_COMPAT_DIR_NLINK
    | F.RO_COMPAT_EXTRA_ISIZE
    | F.RO_COMPAT_METADATA_CSUM
    | F.RO_COMPAT_ORPHAN_PRESENT
    | F.RO_COMPAT_PROJECT
    | F.RO_COMPAT_VERITY
)
_MMP_MAGIC = 0x004D4D50
_MMP_SEQ_CLEAN = 0xFF4D4D50
_MMP_HEAD = struct.Struct("<II")


def rw_refusal(sb: Superblock, dev: BlockDevice, *, recovering: bool = False) -> str | None:
    """Why `sb` must not be mounted read-write, or None. `recovering`: the caller is
    about to replay the journal, so needs_recovery itself is no reason."""
    if sb.has_incompat(F.INCOMPAT_RECOVER) and not recovering:
        return "the journal needs recovery; open it through Filesystem.open, which replays it"
    if sb.has_incompat(F.INCOMPAT_JOURNAL_DEV):
        return "an external journal device"
    if int(sb.fields["state"]) & STATE_ERROR:
        return "the filesystem has the errors flag set; run e2fsck first"
    refused = int(sb.fields["feature_ro_compat"]) & ~_RO_COMPAT_WRITABLE
    if refused:
        names = ", ".join(F.ro_compat_names(refused))
        return f"read-only compatible features not supported for writing: {names}"
    if sb.has_incompat(F.INCOMPAT_MMP):
        return "multi-mount protection: " + _mmp_state(sb, dev)
    if sb.has_compat(F.COMPAT_ORPHAN_FILE) and sb.has_ro_compat(F.RO_COMPAT_ORPHAN_PRESENT):
        return "the orphan file holds inodes (orphan_file processing is not implemented)"
    return None


def _mmp_state(sb: Superblock, dev: BlockDevice) -> str:
    block = int(sb.fields["mmp_block"])
    if not 0 < block < sb.blocks_count:
        return f"MMP block {block} outside the filesystem"
    magic, seq = _MMP_HEAD.unpack(dev.pread(block * sb.block_size, _MMP_HEAD.size))
    if magic != _MMP_MAGIC:
        return f"MMP block {block} has a bad magic"
    if seq != _MMP_SEQ_CLEAN:
        return f"in use (MMP sequence 0x{seq:x})"
    return "the MMP protocol is not implemented"


def check_rw_mount(sb: Superblock, dev: BlockDevice, *, recovering: bool = False) -> None:
    """Raise ReadOnly (EROFS) or Unsupported when the image may only be read."""
    if not dev.writable:
        raise ReadOnly("the device is open read-only")
    if sb.has_ro_compat(F.RO_COMPAT_BIGALLOC):
        raise Unsupported("bigalloc", detail="writing clustered allocation is not implemented")
    reason = rw_refusal(sb, dev, recovering=recovering)
    if reason is not None:
        raise ReadOnly(f"refusing a read-write mount: {reason}")
    if not int(sb.fields["state"]) & STATE_VALID:
        log.warning("mounting_unchecked_fs", detail="not cleanly unmounted; e2fsck is advised")


def _now() -> int:
    return int(time.time())


def begin_rw_mount(fs: WritableFilesystem) -> None:
    """Record the mount in the superblock and free what the orphan list holds."""
    with fs.lock:
        fs.writer.update_superblock(**mount_changes(fs.mount_sb, _now()))
        # The superblock (state "not clean") is on the device before anything else.
        fs.writer.commit(durable=True)
        orphans.process_at_mount(fs)
        fs.writer.commit(durable=True)


def end_rw_mount(fs: WritableFilesystem) -> None:
    """Write everything and mark the filesystem clean again (if it was at mount)."""
    fs.writer.commit(durable=True)
    changes = clean_unmount_changes(fs.writer.superblock(), _now())
    mount_state = int(fs.mount_sb.fields["state"])
    if not mount_state & STATE_VALID:
        changes["state"] = int(changes["state"]) & ~STATE_VALID  # it was not clean before us
    fs.writer.update_superblock(**changes)
    fs.writer.commit(durable=True)
