"""Block and inode allocation over the group bitmaps.

Both allocators read and write bitmaps, descriptors and superblock counts
only through the MetadataWriter, so their changes commit in crash-safe
order, and frees are deferred by it: a freed block or inode keeps its bit
set (and cannot be handed out again) until the metadata that dropped it is
on the device.

Bitmaps are checked when first read: the checksum (metadata_csum) and, for
block bitmaps, that every block of the group's own metadata is marked used.
A bitmap that fails either is Corrupt, so a hostile image cannot make us
allocate over an inode table; allocation skips such a group (bad_groups).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ext4box.ext4.format import bitmap as B
from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import Corrupt, NoSpace, Unsupported, group_where
from ext4box.ext4.format.group_desc import (
    BG_BLOCK_UNINIT,
    GroupDesc,
    blocks_in_group,
    group_first_block,
    group_metadata_runs,
)
from ext4box.ext4.format.superblock import Superblock
from ext4box.ext4.write.bad_groups import BadGroups
from ext4box.ext4.write.caller import Caller, current_caller
from ext4box.ext4.write.metawriter import MetadataWriter


def has_group_desc_csum(sb: Superblock) -> bool:
    """UNINIT flags and itable_unused only mean something with descriptor checksums."""
    return sb.has_ro_compat(F.RO_COMPAT_METADATA_CSUM | F.RO_COMPAT_GDT_CSUM)


def kernel_reserve_blocks(sb: Superblock) -> int:
    """The blocks ext4 keeps back from every caller (s_resv_clusters: 2% of the
    clusters, at most 4096, on extent-mapped filesystems), so that delayed
    allocation and extent splits still find room on a full filesystem."""
    if not sb.has_incompat(F.INCOMPAT_EXTENTS):
        return 0
    cluster_ratio = sb.cluster_size // sb.block_size
    return min(sb.blocks_count // cluster_ratio // 50, 4096) * cluster_ratio


class BlockAllocator:
    """Goal-based allocation of contiguous block runs; frees deferred until commit."""

    def __init__(self, writer: MetadataWriter) -> None:
        sb = writer.sb
        if sb.has_ro_compat(F.RO_COMPAT_BIGALLOC):
            raise Unsupported("bigalloc", detail="writing clustered allocation is not implemented")
        self.writer = writer
        self.sb = sb
        self._lock = writer.lock
        self._csum = has_group_desc_csum(sb)
        self._flex_size = (
            1 << int(sb.fields["log_groups_per_flex"]) if sb.has_incompat(F.INCOMPAT_FLEX_BG) else 1
        )
        self._flex_size = min(max(self._flex_size, 1), sb.group_count)
        self._metadata: dict[int, list[tuple[int, int]]] | None = None
        self._verified: set[int] = set()
        self._bad = BadGroups("block")
        self._pending: dict[int, bytearray] = {}  # group -> bits with a free pending
        self._pending_count = 0
        # FITRIM's memory (trim.py): groups discarded whole since their last free,
        # and the minlen that discarded them.
        self.trimmed_groups: set[int] = set()
        self.last_trim_minlen = 0
        self.free_blocks = sum(writer.group_desc(g).free_blocks_count for g in self._groups())
        # Like the kernel, trust the descriptors over the lazily updated superblock total.
        if self.free_blocks != sb.free_blocks_count:
            writer.update_superblock(free_blocks_count=self.free_blocks)

    def _groups(self) -> range:
        return range(self.writer.group_count)

    @property
    def pending_free_blocks(self) -> int:
        """Blocks freed but not yet released (they become free at the next commit)."""
        return self._pending_count

    # ---- group metadata and bitmaps ------------------------------------

    def metadata_runs(self, group: int) -> list[tuple[int, int]]:
        if self._metadata is None:
            descs = [self.writer.group_desc(g) for g in self._groups()]
            self._metadata = group_metadata_runs(self.sb, descs)
        return self._metadata[group]

    def _uninit(self, desc: GroupDesc) -> bool:
        return self._csum and bool(desc.flags & BG_BLOCK_UNINIT)

    def bitmap(self, group: int) -> bytearray:
        """The group's current block bitmap (built if the group is BLOCK_UNINIT)."""
        desc = self.writer.group_desc(group)
        nbits = blocks_in_group(self.sb, group)
        if self._uninit(desc):
            return self._build_uninit_bitmap(group, desc, nbits)
        bitmap = bytearray(self.writer.read(desc.block_bitmap))
        if group not in self._verified:
            self._verify(group, desc, bitmap, nbits)
            self._verified.add(group)
        return bitmap

    def _build_uninit_bitmap(self, group: int, desc: GroupDesc, nbits: int) -> bytearray:
        bitmap = bytearray(self.sb.block_size)
        for offset, length in self.metadata_runs(group):
            B.set_range(bitmap, offset, min(length, nbits - offset), nbits)
        B.mark_padding(bitmap, nbits)
        free = B.count_zeros(bitmap, nbits)
        if free != desc.free_blocks_count:
            raise Corrupt(
                "group descriptor",
                group_where(group),
                f"BLOCK_UNINIT group has {desc.free_blocks_count} free blocks, layout says {free}",
            )
        return bitmap

    def _verify(self, group: int, desc: GroupDesc, bitmap: bytearray, nbits: int) -> None:
        sb = self.sb
        where = f"block {desc.block_bitmap} ({group_where(group)})"
        if sb.metadata_csum:
            assert sb.csum_seed is not None
            want = B.block_bitmap_checksum(
                sb.csum_seed, bitmap, int(sb.fields["clusters_per_group"])
            )
            stored = desc.block_bitmap_csum
            if sb.desc_size < 64:
                want &= 0xFFFF
            if want != stored:
                raise Corrupt("block bitmap", where, f"checksum 0x{stored:x} != 0x{want:x}")
        for offset, length in self.metadata_runs(group):
            if not B.range_is_set(bitmap, offset, length):
                raise Corrupt("block bitmap", where, f"group metadata at +{offset} marked free")
        # Without checksums nothing else tells a bitmap that marks a file's blocks
        # free (a damaged logged copy, a moved pointer) from a real one; handing
        # those blocks out would overwrite the file. The kernel refuses a group
        # whose bitmap and descriptor disagree on the free count, and so do we.
        free = B.count_zeros(bitmap, nbits)
        if free != desc.free_blocks_count:
            raise Corrupt(
                "block bitmap",
                where,
                f"{free} blocks free in the bitmap, {desc.free_blocks_count} in the descriptor",
            )

    def _store(self, group: int, bitmap: bytearray, free_delta: int) -> None:
        """Write the bitmap back and update descriptor and superblock counts."""
        sb = self.sb
        desc = self.writer.group_desc(group)
        csum = desc.block_bitmap_csum
        if sb.metadata_csum:
            assert sb.csum_seed is not None
            csum = B.block_bitmap_checksum(
                sb.csum_seed, bitmap, int(sb.fields["clusters_per_group"])
            )
        self.writer.write(desc.block_bitmap, bytes(bitmap), bitmap=True)
        self._verified.add(group)
        self.writer.set_group_desc(
            dataclasses.replace(
                desc,
                free_blocks_count=desc.free_blocks_count + free_delta,
                flags=desc.flags & ~BG_BLOCK_UNINIT,
                block_bitmap_csum=csum,
            )
        )
        self.free_blocks += free_delta
        self.writer.update_superblock(free_blocks_count=self.free_blocks)

    def initialise_group(self, group: int) -> None:
        """Give a BLOCK_UNINIT group a real bitmap on disk (the inode allocator
        needs this before it uses the group's inodes, as e2fsck expects)."""
        with self._lock:
            desc = self.writer.group_desc(group)
            if self._uninit(desc):
                self._store(group, self.bitmap(group), 0)

    # ---- allocation ----------------------------------------------------

    def _group_order(self, goal_group: int) -> Iterator[int]:
        """The goal's group, the rest of its flex group, then all others in order."""
        count = self.writer.group_count
        flex_first = goal_group - goal_group % self._flex_size
        flex_end = min(flex_first + self._flex_size, count)
        yield goal_group
        for group in range(goal_group + 1, flex_end):
            yield group
        for group in range(flex_first, goal_group):
            yield group
        for step in range(count - (flex_end - flex_first)):
            yield (flex_end + step) % count

    def kept_back(self, caller: Caller) -> int:
        """Free blocks `caller` may not take, as ext4_has_free_clusters decides: the
        kernel's own reserve (s_resv_clusters) from everyone, and the reserved blocks
        (s_r_blocks_count) from all but root, s_def_resuid and members of a
        s_def_resgid other than group 0."""
        sb = self.sb
        kept = kernel_reserve_blocks(sb)
        resgid = int(sb.fields["def_resgid"])
        if not (caller.privileged or caller.uid == int(sb.fields["def_resuid"])
                or (resgid != 0 and caller.gid == resgid)):
            kept += sb.r_blocks_count
        return kept

    def available(self) -> int:
        """Free blocks the current caller may take (`kept_back`; may be negative)."""
        return self.free_blocks - self.kept_back(current_caller())

    def alloc(
        self, goal: int, count: int, *, min_count: int = 1, reserve_ok: bool = False
    ) -> tuple[int, int]:
        """Allocate one contiguous run of n blocks, min_count <= n <= count, near
        `goal`; returns (first block, n). What the current caller may take is
        `kept_back`'s rule; `reserve_ok` takes any free block (the kernel's
        EXT4_MB_USE_RESERVED). Raises NoSpace."""
        if count < 1 or min_count < 1 or min_count > count:
            raise ValueError(f"bad allocation request count={count} min_count={min_count}")
        sb = self.sb
        with self._lock:
            kept = 0 if reserve_ok else self.kept_back(current_caller())
            available = self.free_blocks - kept
            if available < min_count:
                raise NoSpace(f"{max(available, 0)} blocks available, {min_count} needed")
            count = min(count, available)
            if not sb.first_data_block <= goal < sb.blocks_count:
                goal = sb.first_data_block
            goal_group = (goal - sb.first_data_block) // sb.blocks_per_group
            goal_offset = goal - group_first_block(sb, goal_group)

            # Grow in place when the goal block itself is free.
            if self.writer.group_desc(goal_group).free_blocks_count >= min_count and (
                    bitmap := self._bad.usable(goal_group, self.bitmap)) is not None:
                run = B.find_zero_run(bitmap, blocks_in_group(sb, goal_group), goal_offset, count)
                if run is not None and run[0] == goal_offset and run[1] >= min_count:
                    return self._take(goal_group, bitmap, *run)
            # Then the first whole run of `count`, then the longest >= min_count.
            for want in (count, min_count) if min_count < count else (count,):
                for group in self._group_order(goal_group):
                    if self.writer.group_desc(group).free_blocks_count < want:
                        continue
                    bitmap = self._bad.usable(group, self.bitmap)
                    if bitmap is None:
                        continue
                    offset = goal_offset if group == goal_group else 0
                    run = B.find_zero_run(bitmap, blocks_in_group(sb, group), offset, count)
                    if run is not None and run[1] >= want:
                        return self._take(group, bitmap, *run)
            raise NoSpace(f"no run of {min_count} free blocks (fragmented or pending frees)")

    def _take(self, group: int, bitmap: bytearray, offset: int, length: int) -> tuple[int, int]:
        B.set_range(bitmap, offset, length, blocks_in_group(self.sb, group))
        self._store(group, bitmap, -length)
        return group_first_block(self.sb, group) + offset, length

    def alloc_block(self, goal: int) -> int:
        """One block for tree/directory/xattr metadata (the writers' callback shape)."""
        pblk = self.alloc(goal, 1)[0]
        self.writer.note_new_metadata(pblk)
        return pblk

    # ---- recovery: set bits directly -------------------------------------

    def mark(self, pblk: int, count: int, *, used: bool) -> int:
        """Set (used) or clear the bits of [pblk, pblk + count) now, not at a commit, and
        count only the bits that changed, as the kernel's ext4_mb_mark_bb does during
        fast-commit replay. Clearing group metadata is Corrupt. Returns the bits changed."""
        sb = self.sb
        if count < 1 or pblk < sb.first_data_block or pblk + count > sb.blocks_count:
            raise Corrupt("block bitmap", f"block {pblk}", f"run of {count} outside the filesystem")
        changed = 0
        with self._lock:
            start, left = pblk, count
            while left:
                group = (start - sb.first_data_block) // sb.blocks_per_group
                offset = start - group_first_block(sb, group)
                nbits = blocks_in_group(sb, group)
                length = min(left, nbits - offset)
                if not used:
                    for meta_offset, meta_length in self.metadata_runs(group):
                        if offset < meta_offset + meta_length and meta_offset < offset + length:
                            raise Corrupt("block bitmap", f"block {start} ({group_where(group)})",
                                          "freeing a run that overlaps group metadata")
                bitmap = self.bitmap(group)
                before = B.count_zeros(bitmap, nbits)
                if used:
                    B.set_range(bitmap, offset, length, nbits)
                else:
                    B.clear_range(bitmap, offset, length, nbits)
                delta = B.count_zeros(bitmap, nbits) - before
                if delta:
                    self._store(group, bitmap, delta)
                    self.trimmed_groups.discard(group)
                changed += abs(delta)
                start += length
                left -= length
        return changed

    # ---- freeing -------------------------------------------------------

    def free(self, pblk: int, count: int, *, metadata: bool = False) -> None:
        """Free [pblk, pblk + count) at the next commit, after the metadata that
        dropped the blocks is written. Freeing a free block, a block already
        pending, or group metadata is Corrupt (checked now, so the release can't fail).
        `metadata`: the blocks held metadata (tree, directory, symlink, xattr
        blocks), whose buffered updates the commit forgets."""
        with self._lock:
            pieces = self.check_free(pblk, count)
            for group, offset, length in pieces:
                pending = self._pending.setdefault(group, bytearray(self.sb.block_size))
                B.set_range(pending, offset, length)
                self._pending_count += length
                self.writer.defer(self._releaser(group, offset, length, metadata))

    def check_free(self, pblk: int, count: int) -> list[tuple[int, int, int]]:
        """Raise Corrupt if `free(pblk, count)` would; returns the (group, offset, length)
        pieces. Callers that must not fail half-way check everything they will free first."""
        sb = self.sb
        if count < 1 or pblk < sb.first_data_block or pblk + count > sb.blocks_count:
            raise Corrupt("block free", f"block {pblk}", f"run of {count} outside the filesystem")
        with self._lock:
            pieces = []
            start, left = pblk, count
            while left:
                group = (start - sb.first_data_block) // sb.blocks_per_group
                offset = start - group_first_block(sb, group)
                length = min(left, blocks_in_group(sb, group) - offset)
                pieces.append((group, offset, length))
                start += length
                left -= length
            for group, offset, length in pieces:
                self._check_free(group, offset, length)
        return pieces

    def _check_free(self, group: int, offset: int, length: int) -> None:
        where = f"block {group_first_block(self.sb, group) + offset} ({group_where(group)})"
        bitmap = self.bitmap(group)
        if not B.range_is_set(bitmap, offset, length):
            raise Corrupt("block free", where, f"{length} blocks not all allocated")
        pending = self._pending.get(group)
        if pending is not None and not B.range_is_clear(pending, offset, length):
            raise Corrupt("block free", where, "freed twice before commit")
        for meta_offset, meta_length in self.metadata_runs(group):
            if offset < meta_offset + meta_length and meta_offset < offset + length:
                raise Corrupt("block free", where, "run overlaps group metadata")

    def _releaser(self, group: int, offset: int, length: int, metadata: bool):  # -> Release
        def release() -> None:
            with self._lock:
                bitmap = self.bitmap(group)
                B.clear_range(bitmap, offset, length)
                self._store(group, bitmap, length)
                B.clear_range(self._pending[group], offset, length)
                self._pending_count -= length
                self.trimmed_groups.discard(group)
                self.writer.block_released(group_first_block(self.sb, group) + offset, length,
                                           forget=metadata)

        return release
