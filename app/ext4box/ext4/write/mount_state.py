"""Whether an image may be mounted read-write, and the superblock state of such a mount.

Refused read-write (read-only stays possible) as the kernel refuses or as
writing without the missing machinery would damage the image:
- a journal that still needs recovery (opening.open_filesystem replays it before
  checking, see ext4/journal/recovery.py), an external journal;
- the errors flag (the image wants e2fsck first);
- RO_COMPAT features we do not write correctly (unknown bits, readonly,
  bigalloc, snapshots, replica, shared blocks); quota is written (quota.py
  keeps the usage in the hidden quota inodes);
- MMP (the multi-mount protection protocol is not implemented, and a
  sequence other than "clean" means another node or e2fsck has it);
- orphan_file with inodes recorded in it (processing it is not implemented).

A rw mount counts the mount and frees what the orphan list holds. Without a
journal it marks the superblock not clean until a clean close writes the
state back, as the kernel does. With one (has_journal), as the kernel does
too, the state stays clean and needs_recovery is set instead: every commit
from then on is a jbd2 transaction (journal/writer.py), and a clean close
empties the log and clears needs_recovery.
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import ReadOnly, Unsupported
from ext4box.ext4.format.superblock import (
    STATE_ERROR,
    STATE_VALID,
    Superblock,
    clean_unmount_changes,
    mount_changes,
)
from ext4box.ext4.journal.recovery import open_journal
from ext4box.ext4.journal.writer import JournalWriter
from ext4box.ext4.write import orphans

if TYPE_CHECKING:
    from ext4box.ext4.write.context import WriteContext

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
    | F.RO_COMPAT_QUOTA
)
_MMP_MAGIC = 0x004D4D50
_MMP_SEQ_CLEAN = 0xFF4D4D50
_MMP_HEAD = struct.Struct("<II")


def rw_refusal(sb: Superblock, dev: BlockDevice, *, recovering: bool = False) -> str | None:
    """Why `sb` must not be mounted read-write, or None. `recovering`: the caller is
    about to replay the journal, so needs_recovery itself is no reason."""
    if sb.has_incompat(F.INCOMPAT_RECOVER) and not recovering:
        return "the journal needs recovery; open it through open_filesystem, which replays it"
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


def begin_rw_mount(fs: WriteContext) -> None:
    """Record the mount in the superblock, start the journal and free what the
    orphan list holds."""
    with fs.lock:
        sb = fs.mount_sb
        changes = mount_changes(sb, _now())
        journal = _journal_writer(fs)
        if journal is not None:
            changes["state"] = int(sb.fields["state"])
            changes["feature_incompat"] = int(sb.fields["feature_incompat"]) | F.INCOMPAT_RECOVER
        fs.writer.update_superblock(**changes)
        # The superblock (not clean, or needs_recovery) is on the device before anything else.
        fs.writer.commit(durable=True)
        if journal is not None:
            fs.writer.attach_journal(journal)
        orphans.process_at_mount(fs)
        fs.writer.commit(durable=True)


def _journal_writer(fs: WriteContext) -> JournalWriter | None:
    """The writer of the image's internal journal (its log empty: recovery ran
    before), or None without has_journal."""
    sb = fs.mount_sb
    if not sb.has_compat(F.COMPAT_HAS_JOURNAL):
        return None
    blocks, jsb = open_journal(fs)
    return JournalWriter(fs.dev, blocks, jsb, metadata_csum=sb.has_ro_compat(
        F.RO_COMPAT_METADATA_CSUM), fs_64bit=sb.has_incompat(F.INCOMPAT_64BIT))


def end_rw_mount(fs: WriteContext) -> None:
    """Write everything and mark the filesystem clean again (if it was at mount)."""
    fs.writer.commit(durable=True)
    # Everything checkpointed and the log empty before needs_recovery goes.
    fs.writer.detach_journal()
    changes = clean_unmount_changes(fs.writer.superblock(), _now())
    changes["feature_incompat"] = (int(fs.writer.superblock().fields["feature_incompat"])
                                   & ~F.INCOMPAT_RECOVER)
    mount_state = int(fs.mount_sb.fields["state"])
    if not mount_state & STATE_VALID:
        changes["state"] = int(changes["state"]) & ~STATE_VALID  # it was not clean before us
    fs.writer.update_superblock(**changes)
    fs.writer.commit(durable=True)
