"""Inode allocation over the group inode bitmaps.

Directories are spread Orlov-like over the groups, files kept near their
parent. As with blocks (alloc.py), bitmaps, descriptors and superblock
counts change only through the MetadataWriter, and a freed inode keeps its
bit set until the commit that wrote its cleared slot and removed entry.
An inode bitmap failing its checksum is skipped for allocation (bad_groups).
"""

from __future__ import annotations

import dataclasses
import struct

from ext4box.ext4.format import bitmap as B
from ext4box.ext4.format.errors import Corrupt, NoSpace, group_where, inode_where
from ext4box.ext4.format.group_desc import (
    BG_BLOCK_UNINIT,
    BG_INODE_UNINIT,
    BG_INODE_ZEROED,
    GroupDesc,
)
from ext4box.ext4.write.alloc import BlockAllocator, has_group_desc_csum
from ext4box.ext4.write.bad_groups import BadGroups
from ext4box.ext4.write.inode_table import InodeTable
from ext4box.ext4.write.metawriter import MetadataWriter

_LINKS_COUNT = struct.Struct("<H")  # i_links_count, at 0x1A of an inode

ROOT_INO = 2


class InodeAllocator:
    """Inode numbers: directories spread Orlov-like, files near their parent."""

    def __init__(
        self, writer: MetadataWriter, blocks: BlockAllocator, inode_table: InodeTable
    ) -> None:
        self.writer = writer
        self.blocks = blocks
        self.table = inode_table
        self.sb = writer.sb
        self._lock = writer.lock
        self._csum = has_group_desc_csum(self.sb)
        self._verified: set[int] = set()
        self._bad = BadGroups("inode")
        self._pending: set[int] = set()
        self._dir_rotor = 0
        self.free_inodes = sum(
            writer.group_desc(g).free_inodes_count for g in range(writer.group_count)
        )
        if self.free_inodes != self.sb.free_inodes_count:
            writer.update_superblock(free_inodes_count=self.free_inodes)

    # ---- bitmaps -------------------------------------------------------

    def _reserved_bits(self, group: int) -> int:
        """Leading inodes of `group` that are below s_first_ino (never handed out)."""
        ipg = self.sb.inodes_per_group
        return max(0, min(ipg, self.sb.first_ino - 1 - group * ipg))

    def bitmap(self, group: int) -> bytearray:
        sb = self.sb
        desc = self.writer.group_desc(group)
        ipg = sb.inodes_per_group
        if self._csum and desc.flags & BG_INODE_UNINIT:
            bitmap = bytearray(sb.block_size)
            B.mark_padding(bitmap, ipg)
            if desc.free_inodes_count != ipg - self._reserved_bits(group):
                raise Corrupt(
                    "group descriptor",
                    group_where(group),
                    f"INODE_UNINIT group has {desc.free_inodes_count} free inodes of {ipg}",
                )
            B.set_range(bitmap, 0, self._reserved_bits(group), ipg)
            return bitmap
        bitmap = bytearray(self.writer.read(desc.inode_bitmap))
        if group not in self._verified and sb.metadata_csum:
            assert sb.csum_seed is not None
            want = B.inode_bitmap_checksum(sb.csum_seed, bitmap, ipg)
            if sb.desc_size < 64:
                want &= 0xFFFF
            if want != desc.inode_bitmap_csum:
                raise Corrupt(
                    "inode bitmap",
                    f"block {desc.inode_bitmap} ({group_where(group)})",
                    f"checksum 0x{desc.inode_bitmap_csum:x} != 0x{want:x}",
                )
        self._verified.add(group)
        return bitmap

    def _store(self, group: int, bitmap: bytearray, desc: GroupDesc, free_delta: int) -> None:
        sb = self.sb
        csum = desc.inode_bitmap_csum
        if sb.metadata_csum:
            assert sb.csum_seed is not None
            csum = B.inode_bitmap_checksum(sb.csum_seed, bitmap, sb.inodes_per_group)
        self.writer.write(desc.inode_bitmap, bytes(bitmap), bitmap=True)
        self._verified.add(group)
        self.writer.set_group_desc(
            dataclasses.replace(
                desc,
                free_inodes_count=desc.free_inodes_count + free_delta,
                inode_bitmap_csum=csum,
            )
        )
        self.free_inodes += free_delta
        self.writer.update_superblock(free_inodes_count=self.free_inodes)

    # ---- choosing a group ----------------------------------------------

    def _dir_group(self, parent_group: int, top_level: bool) -> int | None:
        """Orlov-like: spread top-level directories over groups with above-average
        free inodes and blocks and the fewest directories; keep deeper ones near
        their parent unless its group is already crowded."""
        sb = self.sb
        count = self.writer.group_count
        descs = [self.writer.group_desc(g) for g in range(count)]
        avg_inodes = sum(d.free_inodes_count for d in descs) // count
        avg_blocks = sum(d.free_blocks_count for d in descs) // count
        avg_dirs = sum(d.used_dirs_count for d in descs) // count
        if top_level:
            start = self._dir_rotor % count
            self._dir_rotor += 1
            best = None
            for step in range(count):
                d = descs[(start + step) % count]
                if (
                    d.free_inodes_count
                    and d.free_inodes_count >= avg_inodes
                    and (d.free_blocks_count >= avg_blocks)
                    and (best is None or d.used_dirs_count < best.used_dirs_count)
                ):
                    best = d
            if best is not None:
                return best.group
        else:
            max_dirs = avg_dirs + sb.inodes_per_group // 16
            min_inodes = max(avg_inodes - sb.inodes_per_group // 4, 1)
            min_blocks = max(avg_blocks - sb.blocks_per_group // 4, 0)
            for step in range(count):
                d = descs[(parent_group + step) % count]
                if (
                    d.used_dirs_count < max_dirs
                    and d.free_inodes_count >= min_inodes
                    and d.free_blocks_count >= min_blocks
                ):
                    return d.group
        for step in range(count):
            d = descs[(parent_group + step) % count]
            if d.free_inodes_count >= max(avg_inodes, 1):
                return d.group
        return self._any_group(parent_group)

    def _file_group(self, parent_group: int) -> int | None:
        count = self.writer.group_count
        for step in range(count):
            d = self.writer.group_desc((parent_group + step) % count)
            if d.free_inodes_count and d.free_blocks_count:
                return d.group
        return self._any_group(parent_group)

    def _any_group(self, start: int) -> int | None:
        count = self.writer.group_count
        for step in range(count):
            d = self.writer.group_desc((start + step) % count)
            if d.free_inodes_count:
                return d.group
        return None

    # ---- allocation ----------------------------------------------------

    def alloc(self, parent_ino: int, is_dir: bool) -> int:
        """A free inode number for a new child of `parent_ino`; NoSpace if none.

        The inode's slot in the table is zeroed when the group's table was
        never zeroed (no ITABLE_ZEROED), so the caller starts from a clean slot."""
        sb = self.sb
        ipg = sb.inodes_per_group
        if not 1 <= parent_ino <= sb.inodes_count:
            raise Corrupt("inode number", inode_where(parent_ino), "parent outside the table")
        with self._lock:
            if self.free_inodes <= 0:
                raise NoSpace("no free inodes")
            parent_group = (parent_ino - 1) // ipg
            tried: set[int] = set()
            group = (
                self._dir_group(parent_group, parent_ino == ROOT_INO)
                if is_dir
                else self._file_group(parent_group)
            )
            # Descriptor counts can disagree with a bitmap only on a damaged
            # image; then try the other groups before giving up.
            while group is not None and group not in tried:
                tried.add(group)
                ino = self._alloc_in_group(group, is_dir)
                if ino is not None:
                    return ino
                group = next(
                    (
                        g
                        for g in range(self.writer.group_count)
                        if g not in tried and self.writer.group_desc(g).free_inodes_count
                    ),
                    None,
                )
            raise NoSpace("no free inodes")

    def _alloc_in_group(self, group: int, is_dir: bool) -> int | None:
        sb = self.sb
        ipg = sb.inodes_per_group
        bitmap = self._bad.usable(group, self.bitmap)
        if bitmap is None:
            return None
        search = bytearray(bitmap)
        B.set_range(search, 0, self._reserved_bits(group), ipg)
        index = B.find_first_zero(search, ipg, 0)
        if index is None:
            return None
        ino = group * ipg + index + 1
        desc = self.writer.group_desc(group)
        initialised = not self._csum or (
            index < ipg - desc.itable_unused and desc.flags & BG_INODE_ZEROED)
        if initialised and _LINKS_COUNT.unpack_from(self.table.read_raw(ino), 0x1A)[0]:
            # The bitmap marks a live inode free (a moved or stale bitmap): handing it
            # out again would overwrite a file (the kernel's "doubly allocated?").
            raise Corrupt("inode bitmap", group_where(group),
                          f"marks inode {ino} free, but it has links")
        if self._csum:
            used_end = ipg - desc.itable_unused  # slots [0, used_end) are "initialised"
            if not desc.flags & BG_INODE_ZEROED:
                self._check_zeroable(group, bitmap, used_end, index)
            if desc.flags & BG_BLOCK_UNINIT:
                # e2fsck rejects a group whose inode bitmap is in use while its
                # block bitmap is still uninitialised.
                self.blocks.initialise_group(group)
                desc = self.writer.group_desc(group)
            if not desc.flags & BG_INODE_ZEROED:
                # Slots newly brought under the used mark must not hold garbage.
                for slot in range(used_end, index + 1):
                    self.table.zero(group * ipg + slot + 1)
                if index < used_end:
                    self.table.zero(ino)
            desc = dataclasses.replace(
                desc,
                flags=desc.flags & ~BG_INODE_UNINIT,
                itable_unused=min(desc.itable_unused, ipg - (index + 1)),
            )
        elif not desc.flags & BG_INODE_ZEROED:
            self.table.zero(ino)
        if is_dir:
            desc = dataclasses.replace(desc, used_dirs_count=desc.used_dirs_count + 1)
        B.set_range(bitmap, index, 1, ipg)
        self._store(group, bitmap, desc, -1)
        return ino

    def _check_zeroable(self, group: int, bitmap: bytearray, used_end: int, index: int) -> None:
        """Raise Corrupt unless slots [used_end, index] of the group's never-zeroed table
        are all free, before the caller zeroes them. used_end comes from bg_itable_unused:
        a damaged count (above the group's size, or below its last inode in use) would
        otherwise zero the previous group's table or live inodes of this one."""
        ipg = self.sb.inodes_per_group
        if used_end < 0:
            raise Corrupt("group descriptor", group_where(group),
                          f"{ipg - used_end} unused inodes in a group of {ipg}")
        if used_end < index and not B.range_is_clear(bitmap, used_end, index - used_end):
            raise Corrupt("group descriptor", group_where(group),
                          f"{ipg - used_end} unused inodes, but an inode in use lies among them")

    # ---- recovery: set a bit directly ------------------------------------

    def mark_used(self, ino: int, is_dir: bool) -> bool:
        """Mark inode `ino` in use (its bitmap bit, the group's counts, INODE_UNINIT and
        itable_unused), as the kernel's ext4_mark_inode_used does for fast-commit replay.
        Slots brought under the used mark of a never-zeroed table are zeroed first, so
        write the inode after this. False if it was already in use."""
        sb = self.sb
        if ino < 1 or ino > sb.inodes_count:
            raise Corrupt("inode number", inode_where(ino), f"outside 1..{sb.inodes_count}")
        ipg = sb.inodes_per_group
        group, index = divmod(ino - 1, ipg)
        with self._lock:
            bitmap = self.bitmap(group)
            if not B.range_is_clear(bitmap, index, 1):
                return False
            desc = self.writer.group_desc(group)
            if self._csum:
                used_end = 0 if desc.flags & BG_INODE_UNINIT else ipg - desc.itable_unused
                if not desc.flags & BG_INODE_ZEROED:
                    self._check_zeroable(group, bitmap, used_end, index)
                if desc.flags & BG_BLOCK_UNINIT:
                    self.blocks.initialise_group(group)
                    desc = self.writer.group_desc(group)
                if not desc.flags & BG_INODE_ZEROED:
                    for slot in range(used_end, index + 1):
                        self.table.zero(group * ipg + slot + 1)
                desc = dataclasses.replace(
                    desc, flags=desc.flags & ~BG_INODE_UNINIT,
                    itable_unused=min(desc.itable_unused if used_end else ipg, ipg - (index + 1)))
            if is_dir:
                desc = dataclasses.replace(desc, used_dirs_count=desc.used_dirs_count + 1)
            B.set_range(bitmap, index, 1, ipg)
            self._store(group, bitmap, desc, -1)
        return True

    # ---- freeing -------------------------------------------------------

    def check_free(self, ino: int) -> tuple[int, int]:
        """Raise Corrupt if `free(ino)` would; returns (group, index in group)."""
        sb = self.sb
        if ino < sb.first_ino or ino > sb.inodes_count:
            raise Corrupt("inode free", inode_where(ino), "reserved or outside the inode table")
        with self._lock:
            group, index = divmod(ino - 1, sb.inodes_per_group)
            if ino in self._pending:
                raise Corrupt("inode free", inode_where(ino), "freed twice before commit")
            bitmap = self.bitmap(group)
            if B.range_is_clear(bitmap, index, 1):
                raise Corrupt("inode free", inode_where(ino), "inode is not allocated")
        return group, index

    @property
    def pending_free_inodes(self) -> int:
        return len(self._pending)

    def free(self, ino: int, was_dir: bool) -> None:
        """Free inode `ino` at the next commit (after its directory entry removal
        and its cleared on-disk inode are written)."""
        sb = self.sb
        with self._lock:
            group, index = self.check_free(ino)
            self._pending.add(ino)

            def release() -> None:
                with self._lock:
                    current = self.bitmap(group)
                    B.clear_range(current, index, 1, sb.inodes_per_group)
                    desc = self.writer.group_desc(group)
                    if was_dir and desc.used_dirs_count:
                        desc = dataclasses.replace(desc, used_dirs_count=desc.used_dirs_count - 1)
                    self._store(group, current, desc, 1)
                    self._pending.discard(ino)

            self.writer.defer(release)
