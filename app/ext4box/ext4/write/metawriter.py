"""The one place metadata blocks are written: buffered, ordered, with deferred frees.

Every writer (allocators, inode table, extent trees, directories, xattrs)
changes metadata through `MetadataWriter.write` and reads it back through
`MetadataWriter.read`, which always returns the latest version. Nothing
reaches the device until `commit`, which writes in an order that keeps a
crash (of the process, or with `durable=True` also of the machine) from
leaving a pointer to a block the bitmaps call free, or a freed block owned
by two files:

1. allocation side: bitmap blocks, then the group descriptor blocks
   (newly set bits, cleared UNINIT flags, counts, bitmap checksums);
2. barrier (fsync, only when durable): file data written before the commit
   and the bitmaps are on the device before anything points at them;
3. every other metadata block (inode tables, extent/directory/xattr blocks):
   the pointers;
4. barrier, then the deferred releases run (freed blocks and inodes are
   cleared from their bitmaps only now, so they were never handed out again
   while old pointers to them could still be on the device), and the
   bitmaps and descriptors they dirtied are written;
5. the superblock (free counts, state, times), then fsync if durable.

With a jbd2 journal attached (`attach_journal`), one commit is one
transaction instead: the releases run first, and every block the commit
changes (bitmaps, descriptor blocks, other metadata, the superblock's block)
is logged and committed together (journal/writer.py: data and log blocks
flushed before the commit block), then written in place. Atomicity replaces
the ordering above, and a freed block is still reusable only after the
transaction that freed it has committed. A commit too large for the log
falls back to the ordered writes above, after emptying the log.

The writer also owns the mutable copies of the group descriptors and the
superblock fields; readers of group geometry in a read-write mount must ask
`group_desc()` here rather than the mount-time GroupTable.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ext4box.blockdev import BlockDevice, DeviceRangeError, MetadataCache
from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import Corrupt, ReadOnly, block_where, group_where
from ext4box.ext4.format.group_desc import (
    GroupDesc,
    GroupTable,
    descriptor_block,
    encode_group_desc,
    gdt_block_count,
    group_first_block,
    group_metadata_runs,
)
from ext4box.ext4.format.superblock import (
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
    Superblock,
    encode_superblock,
)
from ext4box.ext4.journal.writer import JournalWriter

Release = Callable[[], None]
log = structlog.get_logger("ext4box.ext4")


@dataclass(frozen=True, slots=True)
class CommitStats:
    """What one commit wrote, for logs and tests."""

    bitmap_blocks: int
    descriptor_blocks: int
    metadata_blocks: int
    releases: int
    superblock: bool


class MetadataWriter:
    def __init__(
        self, dev: BlockDevice, meta_cache: MetadataCache, sb: Superblock, groups: GroupTable
    ) -> None:
        if not dev.writable:
            raise ReadOnly("the device is open read-only")
        if groups.bad:
            group, reason = next(iter(groups.bad.items()))
            raise Corrupt("group descriptor", group_where(group), f"{reason}; refusing to write")
        self.dev = dev
        self.cache = meta_cache
        self.sb = sb  # geometry and mount-time fields; current values via `superblock()`
        self.block_size = sb.block_size
        self._descs: list[GroupDesc] = list(groups.descs)
        self._descs_per_block = sb.block_size // sb.desc_size
        self._bitmaps: dict[int, bytes] = {}
        self._blocks: dict[int, bytes] = {}
        self._dirty_groups: set[int] = set()
        self._sb_changes: dict[str, int | bytes] = {}
        self._sb_dirty = False
        self._releases: list[Release] = []
        self._journal: JournalWriter | None = None
        # Set when a transaction could not be written: as the kernel aborts its
        # journal, nothing more is changed (the log keeps what did commit).
        self._aborted: str | None = None
        # Metadata blocks allocated since the last commit (ordered writes put them first).
        self._new_blocks: set[int] = set()
        # One lock for the writer and everything that changes metadata through it
        # (the allocators share it): commit runs releases that take allocator
        # state, so two locks would be a lock-order inversion.
        self.lock = threading.RLock()
        self._lock = self.lock
        # Blocks only the writer itself may write: boot block, superblock, primary GDT.
        self._protected_end = sb.first_data_block + 1 + gdt_block_count(sb)
        self._gdt_blocks = {descriptor_block(sb, index) for index in range(gdt_block_count(sb))}
        # Blocks nobody may write: every superblock/GDT/reserved-GDT copy (sorted runs).
        self._fixed = _fixed_metadata_runs(sb)
        self._fixed_starts = [start for start, _ in self._fixed]
        self._check_descriptor_layout(groups.descs)

    # ---- blocks ----------------------------------------------------------

    def read(self, pblk: int) -> bytes:
        """The latest version of metadata block `pblk` (dirty buffer, cache, device)."""
        with self._lock:
            data = self._blocks.get(pblk)
            if data is None:
                data = self._bitmaps.get(pblk)
            if data is not None:
                return data
        self._check_block(pblk)
        try:
            return self.cache.read(pblk)
        except DeviceRangeError as err:
            raise Corrupt(
                "metadata block", block_where(pblk), "past the end of the device"
            ) from err

    def write(self, pblk: int, data: bytes, *, bitmap: bool = False) -> None:
        """Buffer a whole-block update. `bitmap=True` for allocation bitmaps, which
        are written before the other metadata at commit."""
        self._refuse_if_aborted()
        self._check_block(pblk)
        if pblk < self._protected_end or pblk in self._gdt_blocks or self._overlaps_fixed(pblk, 1):
            raise Corrupt("metadata write", block_where(pblk), "would overwrite superblock or GDT")
        journal = self._journal
        if journal is not None and journal.blocks.holds_device_block(pblk):
            raise Corrupt("metadata write", block_where(pblk), "would overwrite the journal")
        if len(data) != self.block_size:
            raise ValueError(f"block {pblk}: {len(data)} bytes, block size {self.block_size}")
        with self._lock:
            target, other = (
                (self._bitmaps, self._blocks) if bitmap else (self._blocks, self._bitmaps)
            )
            if pblk in other:
                raise ValueError(f"block {pblk} written both as bitmap and as metadata")
            target[pblk] = bytes(data)
        # Nobody may read the device's older copy out of the cache from now on.
        self.cache.invalidate(pblk)

    def _check_block(self, pblk: int) -> None:
        if pblk < 0 or pblk >= self.sb.blocks_count:
            raise Corrupt("metadata block", block_where(pblk), "outside the filesystem")

    def _overlaps_fixed(self, start: int, length: int) -> bool:
        index = bisect.bisect_right(self._fixed_starts, start + length - 1) - 1
        return index >= 0 and self._fixed[index][1] > start

    def _check_descriptor_layout(self, descs: list[GroupDesc]) -> None:
        """Refuse to write when a group's bitmaps or inode table sit on a superblock or
        GDT copy (or the reserved GDT blocks) or on another group's metadata, or
        (without flex_bg) outside their group: initialising or updating them would
        overwrite what is there (the kernel's ext4_check_descriptors refuses such
        a mount, except the overlap between groups, which costs us one sort)."""
        sb = self.sb
        itable_blocks = -(-sb.inodes_per_group * sb.inode_size // sb.block_size)
        flex_bg = sb.has_incompat(F.INCOMPAT_FLEX_BG)
        placed: list[tuple[int, int, str, int]] = []
        for desc in descs:
            # Without flex_bg a group's own metadata lies inside the group.
            low = sb.first_data_block if flex_bg else group_first_block(sb, desc.group)
            high = sb.blocks_count if flex_bg else low + sb.blocks_per_group
            for what, start, length in (("block bitmap", desc.block_bitmap, 1),
                                        ("inode bitmap", desc.inode_bitmap, 1),
                                        ("inode table", desc.inode_table, itable_blocks)):
                if self._overlaps_fixed(start, length):
                    raise Corrupt("group descriptor", group_where(desc.group),
                                  f"{what} at block {start} overlaps a superblock or GDT copy")
                if start < low or start + length > high:
                    raise Corrupt("group descriptor", group_where(desc.group),
                                  f"{what} at block {start} outside the group")
                placed.append((start, start + length, what, desc.group))
        # Two groups' bitmaps on one block, or a bitmap inside an inode table: writing
        # one would overwrite the other.
        placed.sort()
        self._group_meta = [(start, end) for start, end, _, _ in placed]
        self._group_meta_starts = [start for start, _ in self._group_meta]
        for (_, end, what, group), (start, _, other, other_group) in itertools.pairwise(placed):
            if start < end:
                raise Corrupt("group descriptor", group_where(other_group),
                              f"{other} at block {start} overlaps the {what} of group {group}")

    # ---- group descriptors and superblock ---------------------------------

    @property
    def group_count(self) -> int:
        return len(self._descs)

    def group_desc(self, group: int) -> GroupDesc:
        if group < 0 or group >= len(self._descs):
            raise Corrupt("group number", group_where(group), f"outside 0..{len(self._descs) - 1}")
        return self._descs[group]

    def set_group_desc(self, desc: GroupDesc) -> None:
        with self._lock:
            self.group_desc(desc.group)
            self._descs[desc.group] = desc
            self._dirty_groups.add(desc.group)

    def update_superblock(self, **changes: int | bytes) -> None:
        """Record superblock field changes (names as `encode_superblock` takes them)."""
        with self._lock:
            self._sb_changes.update(changes)
            self._sb_dirty = True

    def superblock(self) -> Superblock:
        """The superblock as it will be after the next commit."""
        with self._lock:
            return Superblock.parse(encode_superblock(self.sb, self._sb_changes))

    # ---- deferred frees ---------------------------------------------------

    def defer(self, release: Release) -> None:
        """Run `release` at the next commit, after the metadata that stopped
        pointing at the freed object is written. Releases clear bitmap bits and
        raise free counts; they must not fail (check everything when deferring)."""
        with self._lock:
            self._releases.append(release)

    def note_new_metadata(self, pblk: int) -> None:
        """`pblk` was just allocated for metadata: nothing on the device points at it yet."""
        with self._lock:
            self._new_blocks.add(pblk)

    def block_released(self, pblk: int, count: int, *, forget: bool) -> None:
        """A release (run by commit) freed [pblk, pblk + count). With `forget` (the
        blocks held metadata) a buffered update of them is dropped, neither logged
        nor written in place, as the kernel forgets a freed metadata buffer: a logged
        copy would be replayed over whatever the block holds once it is reused, say
        file data. (Freed file data is not forgotten: in a damaged image the same
        block may also be another structure's, whose update must not be lost.) A
        journal revokes older logged copies either way."""
        blocks = self._blocks
        if forget and blocks:
            if count <= len(blocks):
                for block in range(pblk, pblk + count):
                    blocks.pop(block, None)
            else:
                for block in [b for b in blocks if pblk <= b < pblk + count]:
                    del blocks[block]
        if self._journal is not None:
            self._journal.block_released(pblk, count)

    # ---- the journal ----------------------------------------------------------

    def attach_journal(self, journal: JournalWriter) -> None:
        """Commit through `journal` from now on (everything before is committed)."""
        with self._lock:
            if self.dirty:
                raise ValueError("attach the journal to a clean writer")
            self._check_journal_placement(journal)
            journal.start()
            self._journal = journal

    def _check_journal_placement(self, journal: JournalWriter) -> None:
        """The log is written block by block: refuse a journal inode whose blocks
        lie on a superblock/GDT copy or on a group's bitmaps or inode table."""
        for start, length in journal.blocks.device_runs:
            where = f"journal inode {journal.blocks.ino}"
            if start < self.sb.first_data_block or start + length > self.sb.blocks_count:
                raise Corrupt("journal", where, f"blocks {start}+{length} outside the filesystem")
            if self._overlaps_fixed(start, length):
                raise Corrupt("journal", where,
                              f"blocks {start}+{length} overlap a superblock or GDT copy")
            index = bisect.bisect_right(self._group_meta_starts, start + length - 1) - 1
            # Group metadata runs do not overlap each other (checked above), so the
            # nearest one starting before the journal run's end is the only candidate.
            if index >= 0 and self._group_meta[index][1] > start:
                raise Corrupt("journal", where,
                              f"blocks {start}+{length} overlap a bitmap or inode table")

    def detach_journal(self) -> None:
        """Commit what is buffered, empty the log and go back to ordered writes."""
        with self._lock:
            journal = self._journal
            if journal is None:
                return
            self.commit(durable=True)
            journal.close()
            self._journal = None

    @property
    def journaled(self) -> bool:
        return self._journal is not None

    @property
    def wants_commit(self) -> bool:
        """Whether enough is buffered that the next transaction should commit now
        (a quarter of the log, as jbd2 bounds a transaction)."""
        journal = self._journal
        if journal is None:
            return False
        with self._lock:
            pending = len(self._blocks) + len(self._bitmaps) + len(self._dirty_groups)
        return pending >= journal.soft_limit

    @property
    def dirty(self) -> bool:
        with self._lock:
            return bool(
                self._bitmaps
                or self._blocks
                or self._dirty_groups
                or self._sb_dirty
                or self._releases
            )

    # ---- commit -----------------------------------------------------------

    def _refuse_if_aborted(self) -> None:
        if self._aborted is not None:
            raise ReadOnly(f"the journal was aborted ({self._aborted}); the image needs "
                           "recovery by the next mount, e2fsck or the kernel")

    def commit(self, *, durable: bool = False) -> CommitStats:
        """Write everything buffered, in crash-safe order; fsync when `durable`
        (a journaled commit is always durable, as jbd2's)."""
        with self._lock:
            self._refuse_if_aborted()
            journal = self._journal
            if journal is not None:
                if self._fits_in_log(journal):
                    return self._commit_journaled(journal)
                log.warning("transaction_exceeds_journal", blocks=self._pending_bound(),
                            detail="written in place with ordered writes instead")
                # Nothing older may be replayed over what is written in place now.
                journal.reclaim()
                durable = True
            bitmaps = self._write_all(self._bitmaps)
            descriptors = self._write_descriptors()
            if durable and (bitmaps or descriptors):
                self.dev.flush()
            # New blocks first (nothing points at them yet: a directory split's new
            # leaf holds its entries before the old leaf loses them), then inodes
            # before the entries and tree blocks that name or follow them (an entry
            # must not name a slot still holding a deleted inode's block pointers),
            # then everything else.
            new = self._new_blocks & self._blocks.keys()
            metadata = self._write_all(self._blocks, only=new)
            metadata += self._write_all(self._blocks, only=self._inode_table_blocks())
            if durable and metadata:
                self.dev.flush()
            metadata += self._write_all(self._blocks)
            self._new_blocks.clear()
            releases = self._releases
            self._releases = []
            if releases:
                if durable and metadata:
                    self.dev.flush()
                for release in releases:
                    release()
                bitmaps += self._write_all(self._bitmaps)
                descriptors += self._write_descriptors()
                metadata += self._write_all(self._blocks)
            wrote_sb = self._write_superblock()
            if durable:
                self.dev.flush()
            return CommitStats(bitmaps, descriptors, metadata, len(releases), wrote_sb)

    def _pending_bound(self) -> int:
        """At most how many blocks a commit of what is buffered changes (releases
        each touch one group's bitmap and its descriptor block)."""
        releases = min(len(self._releases), len(self._descs))
        gdt = min(len(self._dirty_groups) + releases, len(self._gdt_blocks))
        return len(self._bitmaps) + len(self._blocks) + gdt + releases + 1

    def _fits_in_log(self, journal: JournalWriter) -> bool:
        return journal.fits(self._pending_bound(), journal.revoke_bound)

    def _commit_journaled(self, journal: JournalWriter) -> CommitStats:
        releases = self._releases
        self._releases = []
        for release in releases:
            release()
        copies: dict[int, bytes] = dict(self._bitmaps)
        copies.update(self._blocks)
        descriptors = self._descriptor_images()
        copies.update(descriptors)
        wrote_sb = self._sb_dirty
        if wrote_sb:
            pblk, image = self._superblock_image()
            copies[pblk] = image
        if not copies and not journal.pending_revokes:
            return CommitStats(0, 0, 0, len(releases), False)
        try:
            journal.log_transaction(copies)
        except OSError as err:
            # The releases above already made freed blocks allocatable in memory;
            # handing them out before this transaction commits could expose their
            # old contents after a crash. Stop changing anything, as jbd2 aborts.
            self._aborted = f"writing transaction failed: {err.strerror}"
            log.error("journal_aborted", why=self._aborted)
            try:
                journal.record_abort(err.errno or errno.EIO)
            except OSError as also:
                log.error("journal_abort_not_recorded", why=also.strerror)
            raise
        # The checkpoint: in place, unflushed (the log holds the transaction until
        # the journal reclaims its space, which flushes first).
        bs = self.block_size
        for pblk in sorted(copies):
            self.dev.pwrite(pblk * bs, copies[pblk])
            self.cache.invalidate(pblk)
        stats = CommitStats(len(self._bitmaps), len(descriptors), len(self._blocks),
                            len(releases), wrote_sb)
        self._new_blocks.clear()
        self._bitmaps.clear()
        self._blocks.clear()
        self._dirty_groups.clear()
        self._sb_dirty = False
        return stats

    def _descriptor_images(self) -> dict[int, bytes]:
        """The group descriptor blocks holding every dirty group, re-encoded."""
        sb = self.sb
        size = sb.desc_size
        by_block: dict[int, list[int]] = {}
        for group in self._dirty_groups:
            by_block.setdefault(group // self._descs_per_block, []).append(group)
        images = {}
        for index, groups in by_block.items():
            pblk = descriptor_block(sb, index)
            block = bytearray(self.read(pblk))
            for group in groups:
                slot = (group % self._descs_per_block) * size
                base = bytes(block[slot : slot + size])
                block[slot : slot + size] = encode_group_desc(self._descs[group], sb, base)
            images[pblk] = bytes(block)
        return images

    def _superblock_image(self) -> tuple[int, bytes]:
        """The block holding the primary superblock, with the superblock re-encoded."""
        pblk = SUPERBLOCK_OFFSET // self.block_size
        block = bytearray(self.dev.pread(pblk * self.block_size, self.block_size))
        start = SUPERBLOCK_OFFSET - pblk * self.block_size
        block[start : start + SUPERBLOCK_SIZE] = encode_superblock(self.sb, self._sb_changes)
        return pblk, bytes(block)

    def _inode_table_blocks(self) -> set[int]:
        """The buffered blocks that lie in inode tables."""
        found = set()
        for pblk in self._blocks:
            index = bisect.bisect_right(self._group_meta_starts, pblk) - 1
            # Bitmaps are buffered apart, so a group metadata run here is an inode table.
            if index >= 0 and pblk < self._group_meta[index][1]:
                found.add(pblk)
        return found

    def _write_all(self, pending: dict[int, bytes], only: set[int] | None = None) -> int:
        # In block order (sequential I/O); a block leaves the buffer only once written,
        # so a failed write can be retried by the next commit.
        count = 0
        for pblk in sorted(pending if only is None else only):
            self.dev.pwrite(pblk * self.block_size, pending[pblk])
            del pending[pblk]
            self.cache.invalidate(pblk)
            count += 1
        return count

    def _write_descriptors(self) -> int:
        if not self._dirty_groups:
            return 0
        images = self._descriptor_images()
        for pblk in sorted(images):
            self.dev.pwrite(pblk * self.block_size, images[pblk])
            self.cache.invalidate(pblk)
        self._dirty_groups.clear()
        return len(images)

    def _write_superblock(self) -> bool:
        if not self._sb_dirty:
            return False
        raw = encode_superblock(self.sb, self._sb_changes)
        self.dev.pwrite(SUPERBLOCK_OFFSET, raw)
        first = SUPERBLOCK_OFFSET // self.block_size
        last = (SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE - 1) // self.block_size
        for pblk in range(first, last + 1):
            self.cache.invalidate(pblk)
        self._sb_dirty = False
        return True


def _fixed_metadata_runs(sb: Superblock) -> list[tuple[int, int]]:
    """Sorted, merged [start, end) block runs of every superblock, GDT and reserved GDT
    copy (block 0 included), as the allocator lays out each group's fixed metadata."""
    runs = [(0, sb.first_data_block + 1)]
    for group, pieces in group_metadata_runs(sb, []).items():
        first = group_first_block(sb, group)
        runs.extend((first + offset, first + offset + length) for offset, length in pieces)
    merged: list[tuple[int, int]] = []
    for start, end in sorted(runs):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
