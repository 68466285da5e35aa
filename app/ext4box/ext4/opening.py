"""Which facade serves an image: read-only or read-write, after replaying its journal?

`open_filesystem` is the one way in from the layers above. It checks the
superblock against the device, replays a journal that needs recovery (in
memory for a read-only mount, onto the device for a read-write one, fast
commits included) and builds the facade: `read.filesystem.Filesystem` or
`write.writable.WritableFilesystem`. It sits above `ext4.write`,
`ext4.journal` and `ext4.read`, so none of them needs to know the others
exist to be opened: the read facade never imports the write side, and
journal recovery gets the write side's fast-commit replay passed in.
"""

from __future__ import annotations

import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import Corrupt, NotExt4, ReadOnly, Unsupported
from ext4box.ext4.format.inode import ROOT_INO
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock
from ext4box.ext4.journal import fast_commit_recovery
from ext4box.ext4.journal.overlay import OverlayDevice
from ext4box.ext4.journal.recovery import plan_recovery, replay_onto_device
from ext4box.ext4.read.filesystem import CacheSizes, Filesystem
from ext4box.ext4.write import mount_state
from ext4box.ext4.write.fast_commit_replay import replay_on_copy
from ext4box.ext4.write.writable import WritableFilesystem

log = structlog.get_logger("ext4box.ext4")


def open_filesystem(
    dev: BlockDevice, *, readonly: bool = True, caches: CacheSizes | None = None
) -> Filesystem:
    """The filesystem on `dev`: a `Filesystem`, or with readonly=False a
    `WritableFilesystem` (after the read-write mount checks of mount_state)."""
    if dev.size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE:
        raise NotExt4(f"device of {dev.size} bytes is too small for ext4")
    sb = Superblock.parse(dev.pread(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
    unsupported = sb.incompat_unsupported()
    if unsupported:
        raise Unsupported(
            "incompatible features", detail="image uses " + ", ".join(unsupported)
        )
    if sb.blocks_count * sb.block_size > dev.size:
        raise Corrupt(
            "superblock",
            "block 0 offset 1024",
            f"{sb.blocks_count} blocks of {sb.block_size} bytes exceed the device "
            f"({dev.size} bytes): truncated image?",
        )
    if sb.has_incompat(F.INCOMPAT_RECOVER):
        dev, sb = _recover_journal(dev, sb, readonly=readonly)
    fs: Filesystem
    if readonly:
        fs = Filesystem(dev, sb, caches or CacheSizes())
    else:
        fs = WritableFilesystem.open_rw(dev, sb, caches or CacheSizes())
    for group, reason in fs.groups.bad.items():
        log.error("corrupt", what="group descriptor", where=f"group {group}", why=reason)
    fs.inode(ROOT_INO)  # fail at mount, not at first lookup, if the root is bad
    log.info(
        "filesystem_opened",
        block_size=sb.block_size,
        blocks=sb.blocks_count,
        groups=sb.group_count,
        features=" ".join(sb.feature_names()),
    )
    return fs


def _recover_journal(
    dev: BlockDevice, sb: Superblock, *, readonly: bool
) -> tuple[BlockDevice, Superblock]:
    """needs_recovery: replay the journal in memory (read-only: the device and
    superblock to serve) or onto the device (read-write: the superblock after)."""
    if not sb.has_compat(F.COMPAT_HAS_JOURNAL):
        if not readonly:
            raise ReadOnly("refusing a read-write mount: needs_recovery is set but the "
                           "filesystem has no journal; run e2fsck first")
        log.warning("needs_recovery_without_journal", detail="serving the device as it is")
        return dev, sb
    if not readonly:
        # Refuse before writing anything if the mount would be refused anyway.
        mount_state.check_rw_mount(sb, dev, recovering=True)
    # The journal is read as it is on the device, before any replay.
    journal_fs = Filesystem(dev, sb, CacheSizes(metadata_blocks=64, inodes=4, mappers=1,
                                                directories=1))
    blocks, plan = plan_recovery(journal_fs)
    overlay = OverlayDevice(dev, sb.block_size, plan.copies)
    # Fast commits follow the full ones: replayed onto an in-memory copy of the
    # full-commit view (nothing is written yet).
    replayed = fast_commit_recovery.replay(blocks, plan, overlay, readonly=readonly,
                                           replay_tags=replay_on_copy)
    if readonly:
        view = overlay if replayed is None else replayed
        log.info("journal_replayed_in_memory", transactions=plan.transactions,
                 blocks=overlay.overlaid_blocks,
                 fast_commit_blocks=0 if replayed is None else len(replayed.dirty_blocks()))
        return view, Superblock.parse(view.pread(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
    if replayed is not None:
        plan = fast_commit_recovery.write_replayed(dev, overlay, replayed, plan)
    return dev, replay_onto_device(dev, blocks, plan, sb.block_size)
