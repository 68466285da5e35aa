"""Journal recovery in the three passes of jbd2 and e2fsck.

SCAN finds the end of the valid log: the first transaction whose blocks stop
(bad magic, wrong sequence, unknown type), whose commit block fails its
checksum, or — when a descriptor/revoke checksum failed — the point where the
commit time shows stale blocks (a newer commit time with a bad checksum is
corruption: Corrupt, as the kernel refuses such a journal). REVOKE collects,
for every revoked block, the newest transaction that revoked it. REPLAY keeps,
for every filesystem block, the newest logged copy not revoked by the same or
a later transaction; every copy is checked (target inside the filesystem and
outside the journal, data checksum) before anything is written or served.

Before any pass the journal itself is checked as the kernel checks it: a
reserved, regular, live inode whose blocks overlap no superblock/GDT copy,
bitmap or inode table. After them, a logged copy of the superblock must be a
superblock this device can mount (block size unchanged, no more blocks than
the device, supported features), since it becomes the one served.

The result is a plan; `replay_onto_device` writes it (read-write mount) and
`overlay.OverlayDevice` serves it without writing (read-only mount).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import Corrupt, Ext4Error, Unsupported, inode_where
from ext4box.ext4.format.group_desc import (
    GroupTable,
    descriptor_block,
    gdt_block_count,
    group_first_block,
)
from ext4box.ext4.format.superblock import (
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
    Superblock,
    encode_superblock,
)
from ext4box.ext4.journal.commit import CommitBlock, commit_checksum_ok, crc32_be
from ext4box.ext4.journal.descriptor import (
    data_checksum_ok,
    parse_tags,
    tail_checksum_ok,
    unescape,
)
from ext4box.ext4.journal.log import JournalBlocks, LogBlock, LogCursor, tid_geq
from ext4box.ext4.journal.revoke import parse_revoke
from ext4box.ext4.journal.superblock import (
    BLOCK_COMMIT,
    BLOCK_DESCRIPTOR,
    BLOCK_REVOKE,
    JournalSuperblock,
)

if TYPE_CHECKING:
    from ext4box.ext4.read.filesystem import Filesystem

log = structlog.get_logger("ext4box.ext4.journal")

_MASK32 = 0xFFFFFFFF
_FC_TAG = struct.Struct("<HHII")  # ext4 fast-commit tag, length, head: features, tid
_FC_TAG_HEAD = 0x0009


@dataclass(frozen=True, slots=True)
class ReplayCopy:
    log_block: int  # journal block number of the logged copy
    device_block: int  # where that copy is on the device
    escaped: bool
    sequence: int


@dataclass(frozen=True, slots=True)
class ScanResult:
    end_sequence: int  # first transaction not replayed
    failed_commit: int | None  # a transaction whose commit block failed its checksum


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    journal: JournalSuperblock
    end_sequence: int
    failed_commit: int | None
    copies: dict[int, ReplayCopy] = field(default_factory=dict)  # fs block → copy
    revoke_hits: int = 0
    fast_commit_pending: bool = False

    @property
    def transactions(self) -> int:
        if not self.journal.start:
            return 0
        return (self.end_sequence - self.journal.sequence) & _MASK32


# ---- opening the journal ------------------------------------------------------


def open_journal(fs: Filesystem) -> tuple[JournalBlocks, JournalSuperblock]:
    """The internal journal of `fs` (read as on the device, before any replay)."""
    sb = fs.sb
    journal_ino = int(sb.fields["journal_inum"])
    if journal_ino == 0:
        raise Unsupported(
            "external journal",
            detail="the journal is on a separate device (s_journal_dev/s_journal_uuid); "
            "only journals inside the filesystem (a journal inode) are supported",
        )
    where = inode_where(journal_ino)
    if not 0 < journal_ino < sb.first_ino:
        # As the kernel's special-inode lookup: an ordinary inode (a user's file) as the
        # journal would have replay and journaled writes overwrite that file.
        raise Corrupt("journal inode", where, f"not a reserved inode (first inode "
                      f"{sb.first_ino})")
    inode = fs.inode(journal_ino)
    if not inode.is_reg or inode.links_count == 0:
        raise Corrupt("journal inode", where, "not a regular file in use")
    nblocks = inode.size // fs.block_size
    if nblocks < 2:
        raise Corrupt("journal inode", where, f"size {inode.size} too small")
    if nblocks > sb.blocks_count:
        raise Corrupt("journal inode", where, f"{nblocks} blocks exceed the filesystem")
    runs = fs.map_blocks(inode, 0, nblocks)
    bs = fs.block_size
    blocks = JournalBlocks(runs, lambda pblk: fs.dev.pread(pblk * bs, bs), journal_ino)
    _check_outside_fixed_metadata(blocks, fs.sb, fs.groups)
    jsb = JournalSuperblock.parse(blocks.read(0), fs_block_size=bs, journal_blocks=nblocks)
    return blocks, jsb


def _fixed_metadata(sb: Superblock, groups: GroupTable) -> Iterator[tuple[str, int, int]]:
    """(what, first block, length) of every superblock/GDT copy, bitmap and inode table."""
    meta_bg = sb.has_incompat(F.INCOMPAT_META_BG)
    gdt = 0 if meta_bg else gdt_block_count(sb) + int(sb.reserved_gdt_blocks)
    for group in range(sb.group_count):
        if sb.group_has_super(group):
            first = group_first_block(sb, group) if group else 0
            length = group_first_block(sb, group) - first + 1 + gdt
            yield f"the superblock/GDT copy of group {group}", first, length
    if meta_bg:
        for index in range(gdt_block_count(sb)):
            yield "a group descriptor block", descriptor_block(sb, index), 1
    itable_blocks = -(-sb.inodes_per_group * sb.inode_size // sb.block_size)
    for desc in groups.descs:
        if desc.group in groups.bad:
            continue  # an unusable group: its descriptor's numbers mean nothing
        yield f"the block bitmap of group {desc.group}", desc.block_bitmap, 1
        yield f"the inode bitmap of group {desc.group}", desc.inode_bitmap, 1
        yield f"the inode table of group {desc.group}", desc.inode_table, itable_blocks


def _check_outside_fixed_metadata(blocks: JournalBlocks, sb: Superblock,
                                  groups: GroupTable) -> None:
    """The kernel refuses a journal inode whose blocks overlap the filesystem's fixed
    metadata (its system zone check); replaying from it, or logging into it, would read
    and overwrite inodes, bitmaps or descriptors."""
    for what, first, length in _fixed_metadata(sb, groups):
        if blocks.overlaps(first, length):
            raise Corrupt("journal inode", inode_where(blocks.ino),
                          f"its blocks overlap {what} (blocks {first}..{first + length - 1})")


def _check_replayed_superblock(blocks: JournalBlocks, plan: RecoveryPlan, sb: Superblock,
                               device_size: int) -> None:
    """A logged copy of the superblock becomes the superblock the mount serves: refuse
    one that could not be mounted before anything is replayed."""
    target = SUPERBLOCK_OFFSET // sb.block_size
    copy = plan.copies.get(target)
    if copy is None:
        return
    data = blocks.read(copy.log_block)
    if copy.escaped:
        data = unescape(data)
    at = SUPERBLOCK_OFFSET % sb.block_size
    where = f"journal block {copy.log_block}"
    try:
        replayed = Superblock.parse(data[at : at + SUPERBLOCK_SIZE])
    except Ext4Error as err:
        raise Corrupt("journal", where, f"the logged superblock is not valid: {err}") from err
    problem = None
    if replayed.block_size != sb.block_size:
        problem = f"changes the block size to {replayed.block_size}"
    elif replayed.blocks_count * replayed.block_size > device_size:
        problem = (f"claims {replayed.blocks_count} blocks, more than the device's "
                   f"{device_size // sb.block_size}")
    elif replayed.incompat_unsupported():
        problem = "uses " + ", ".join(replayed.incompat_unsupported())
    if problem is not None:
        raise Corrupt("journal", where, f"the logged superblock {problem}")


# ---- the three passes ---------------------------------------------------------


def scan(blocks: JournalBlocks, jsb: JournalSuperblock) -> ScanResult:
    """PASS_SCAN: where the valid log ends."""
    cursor = LogCursor(blocks, jsb)
    end: int | None = None
    need_time_check = False  # a descriptor/revoke checksum failed: stale or corrupt?
    last_commit_time = 0
    running_crc = _MASK32  # v1 transaction checksum
    while True:
        block = cursor.next_block()
        if block is None:
            break
        if block.kind == BLOCK_DESCRIPTOR:
            if not tail_checksum_ok(block.data, jsb):
                need_time_check = True
            tags = parse_tags(block.data, jsb)
            positions = cursor.take(len(tags))
            if positions is None:
                break
            if jsb.checksum_v1 and not need_time_check and end is None:
                running_crc = crc32_be(running_crc, block.data)
                for position in positions:
                    running_crc = crc32_be(running_crc, blocks.read(position))
            continue
        if block.kind == BLOCK_REVOKE:
            if not tail_checksum_ok(block.data, jsb):
                need_time_check = True
            continue
        if block.kind != BLOCK_COMMIT:
            break
        commit = CommitBlock.parse(block.data)
        if need_time_check:
            if commit.commit_sec >= last_commit_time:
                raise Corrupt("journal transaction", f"transaction {block.sequence}",
                              "a descriptor or revoke block fails its checksum")
            break  # older than the transaction before: stale blocks, the log ends here
        failed = False
        if jsb.checksum_v1:
            if end is not None:
                return ScanResult(end, end)
            failed = not commit.v1_checksum_ok(running_crc)
            running_crc = _MASK32
        if not failed and not commit_checksum_ok(block.data, jsb):
            failed = True
        if failed:
            if commit.commit_sec < last_commit_time:
                break  # stale
            end = block.sequence
            if not jsb.async_commit:
                return ScanResult(end, end)
        last_commit_time = commit.commit_sec
        cursor.commit()
    return ScanResult(cursor.sequence if end is None else end, None)


def collect_revokes(blocks: JournalBlocks, jsb: JournalSuperblock, end: int) -> dict[int, int]:
    """PASS_REVOKE: revoked block → newest transaction revoking it."""
    revoked: dict[int, int] = {}
    for block, _positions in _transactions(blocks, jsb, end):
        if block.kind != BLOCK_REVOKE:
            continue
        where = f"journal block {block.position}"
        for target in parse_revoke(block.data, jsb, where=where):
            newest = revoked.get(target)
            if newest is None or tid_geq(block.sequence, newest):
                revoked[target] = block.sequence
    return revoked


def plan_replay(blocks: JournalBlocks, jsb: JournalSuperblock, scanned: ScanResult,
                revoked: dict[int, int], fs_blocks: int) -> RecoveryPlan:
    """PASS_REPLAY, planned: the newest unrevoked copy of every logged block, all checked."""
    copies: dict[int, ReplayCopy] = {}
    hits = 0
    for block, positions in _transactions(blocks, jsb, scanned.end_sequence):
        if block.kind != BLOCK_DESCRIPTOR:
            continue
        for tag, position in zip(parse_tags(block.data, jsb), positions, strict=True):
            where = f"journal block {position}"
            newest_revoke = revoked.get(tag.target)
            if newest_revoke is not None and tid_geq(newest_revoke, block.sequence):
                hits += 1
                continue
            device_block = blocks.device_block(position)
            if not 0 <= tag.target < fs_blocks:
                raise Corrupt("journal descriptor", f"journal block {block.position}",
                              f"tag names block {tag.target} outside the filesystem "
                              f"({fs_blocks} blocks)")
            if blocks.holds_device_block(tag.target):
                raise Corrupt("journal descriptor", f"journal block {block.position}",
                              f"tag names block {tag.target}, which belongs to the journal")
            if not data_checksum_ok(tag, jsb, block.sequence, blocks.read(position)):
                raise Corrupt("journal block", where,
                              f"logged copy of block {tag.target} in transaction "
                              f"{block.sequence} fails its checksum")
            copies[tag.target] = ReplayCopy(position, device_block, tag.escaped, block.sequence)
    return RecoveryPlan(jsb, scanned.end_sequence, scanned.failed_commit, copies, hits)


def _transactions(blocks: JournalBlocks, jsb: JournalSuperblock,
                  end: int) -> Iterator[tuple[LogBlock, list[int]]]:
    """Header blocks (with the positions of their logged blocks) of transactions before `end`.

    The scan already walked this far, so running out early means the journal
    changed or is inconsistent: Corrupt."""
    cursor = LogCursor(blocks, jsb)
    while not tid_geq(cursor.sequence, end):
        block = cursor.next_block()
        if block is None:
            raise Corrupt("journal", f"transaction {cursor.sequence}",
                          "log ended before the transaction the scan accepted")
        positions: list[int] = []
        if block.kind == BLOCK_DESCRIPTOR:
            taken = cursor.take(len(parse_tags(block.data, jsb)))
            if taken is None:
                raise Corrupt("journal", f"journal block {block.position}",
                              "descriptor runs past the log")
            positions = taken
        elif block.kind == BLOCK_COMMIT:
            cursor.commit()
        elif block.kind != BLOCK_REVOKE:
            raise Corrupt("journal", f"journal block {block.position}",
                          f"unknown block type {block.kind}")
        yield block, positions


def _fast_commit_pending(blocks: JournalBlocks, jsb: JournalSuperblock, end: int) -> bool:
    """Whether the fast-commit area starts a fast commit following the last full commit."""
    if not jsb.fast_commit or jsb.fast_commit_first >= blocks.count:
        return False
    tag, _length, _features, tid = _FC_TAG.unpack_from(blocks.read(jsb.fast_commit_first), 0)
    return tag == _FC_TAG_HEAD and tid == end


def plan_recovery(fs: Filesystem) -> tuple[JournalBlocks, RecoveryPlan]:
    """Everything the journal of `fs` asks to replay (nothing is written)."""
    blocks, jsb = open_journal(fs)
    if not jsb.start:
        return blocks, RecoveryPlan(jsb, jsb.sequence, None)
    scanned = scan(blocks, jsb)
    revoked = collect_revokes(blocks, jsb, scanned.end_sequence)
    plan = plan_replay(blocks, jsb, scanned, revoked, fs.sb.blocks_count)
    _check_replayed_superblock(blocks, plan, fs.sb, fs.dev.size)
    pending = _fast_commit_pending(blocks, jsb, scanned.end_sequence)
    if pending:
        plan = RecoveryPlan(jsb, plan.end_sequence, plan.failed_commit, plan.copies,
                            plan.revoke_hits, fast_commit_pending=True)
    if plan.failed_commit is not None:
        log.warning("journal_transaction_corrupt", transaction=plan.failed_commit,
                    detail="its commit block fails its checksum: replaying the transactions "
                    "before it only")
    log.info("journal_recovery_planned", first=jsb.sequence, end=plan.end_sequence,
             transactions=plan.transactions, blocks=len(plan.copies), revoked=plan.revoke_hits,
             fast_commit_pending=pending)
    return blocks, plan


# ---- replay onto the device ----------------------------------------------------

_STATE_ERROR = 0x2


def replay_onto_device(dev: BlockDevice, blocks: JournalBlocks, plan: RecoveryPlan,
                       block_size: int) -> Superblock:
    """Write the plan, then mark the journal empty and clear needs_recovery, as e2fsck
    does (each step flushed before the next, so a crash in between replays again).
    Returns the filesystem superblock as it is on the device afterwards."""
    for target in sorted(plan.copies):
        copy = plan.copies[target]
        data = blocks.read(copy.log_block)
        if copy.escaped:
            data = unescape(data)
        dev.pwrite(target * block_size, data)
    dev.flush()
    jsb = plan.journal
    if jsb.start:
        journal_block = blocks.read(0)
        emptied = jsb.encode_emptied((plan.end_sequence + 1) & _MASK32, clear_errno=True)
        dev.pwrite(blocks.device_block(0) * block_size,
                   emptied + journal_block[len(emptied):])
        dev.flush()
    sb = Superblock.parse(dev.pread(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
    changes: dict[str, int | bytes] = {
        "feature_incompat": int(sb.fields["feature_incompat"]) & ~F.INCOMPAT_RECOVER
    }
    if plan.failed_commit is not None or jsb.errno:
        # As e2fsck: a corrupt transaction or an error the journal recorded
        # leaves the filesystem marked as having errors.
        changes["state"] = int(sb.fields["state"]) | _STATE_ERROR
    dev.pwrite(SUPERBLOCK_OFFSET, encode_superblock(sb, changes))
    dev.flush()
    log.info("journal_replayed", transactions=plan.transactions, blocks=len(plan.copies),
             next_sequence=(plan.end_sequence + 1) & _MASK32 if jsb.start else jsb.sequence)
    return Superblock.parse(dev.pread(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))


