"""Fast commits in recovery: find them after the full commits, replay them onto an
in-memory copy, and (read-write mount) put the result on the device.

ext4/opening.py calls `replay` with the full-commit plan and its overlay. A
read-only mount serves the returned copy; a read-write mount writes it with
`write_replayed` before the journal is marked empty, so a crash in between
replays everything again (the full commits put back the blocks they log, the
fast commits apply again on top, as the kernel's replay is repeatable).

Fast commits we cannot replay — unknown HEAD features, a corrupt area (no
valid fast commit before the first bad tag or tail), tags our replay refuses —
refuse a read-write mount with that error; a read-only mount serves the full
commits only, with a warning, as before fast-commit replay existed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock
from ext4box.ext4.journal.cow_device import CopyOnWriteDevice
from ext4box.ext4.journal.fast_commit import FastCommitTag, scan_fast_commits
from ext4box.ext4.journal.log import JournalBlocks
from ext4box.ext4.journal.overlay import OverlayDevice
from ext4box.ext4.journal.recovery import RecoveryPlan

log = structlog.get_logger("ext4box.ext4.journal")


# Replays fast-commit tags onto an in-memory copy of a device and returns the copy
# (frozen). The write side provides it (write/fast_commit_replay.replay_on_copy):
# replay edits the filesystem with the read-write facade's writers.
ReplayTags = Callable[[BlockDevice, Superblock, tuple[FastCommitTag, ...]], CopyOnWriteDevice]


def replay(blocks: JournalBlocks, plan: RecoveryPlan, overlay: OverlayDevice, *,
           readonly: bool, replay_tags: ReplayTags) -> CopyOnWriteDevice | None:
    """The filesystem with the fast commits replayed (in memory) by `replay_tags`, or
    None when there are none to replay. Raises what refuses them on a read-write mount."""
    jsb = plan.journal
    if not jsb.start or not jsb.fast_commit:
        return None  # the kernel replays fast commits only after a log it recovers
    sb = Superblock.parse(overlay.pread(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
    try:
        scanned = scan_fast_commits(blocks, jsb, plan.end_sequence, sb.inode_size)
        if not scanned.pending:
            return None
        if scanned.stopped:
            log.info("fast_commit_area_ends", where=scanned.stopped)
        replayed = replay_tags(overlay, sb, scanned.tags)
    except Ext4Error as err:
        if not readonly:
            raise
        log.warning("journal_fast_commit_not_replayed", why=str(err),
                    detail="serving the full commits only")
        return None
    log.info("fast_commits_replayed_in_memory", commits=scanned.commits,
             tags=len(scanned.tags), blocks=len(replayed.dirty_blocks()))
    return replayed


def write_replayed(dev: BlockDevice, overlay: OverlayDevice, replayed: CopyOnWriteDevice,
                   plan: RecoveryPlan) -> RecoveryPlan:
    """Write the full commits' blocks and the fast commits' changes onto `dev` (flushed);
    returns the plan left to run: only emptying the journal and clearing
    needs_recovery (recovery.replay_onto_device with no copies)."""
    bs = overlay.block_size
    changed = replayed.dirty_blocks()
    for target in sorted(set(plan.copies) | set(changed)):
        data = changed.get(target)
        if data is None:
            data = overlay.pread(target * bs, bs)
        dev.pwrite(target * bs, data)
    dev.flush()
    return dataclasses.replace(plan, copies={})
