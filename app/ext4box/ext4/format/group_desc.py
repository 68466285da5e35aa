"""Block group descriptors: where each group's bitmaps and inode table live."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ext4box.ext4.format import features as F
from ext4box.ext4.format.checksum import crc16, crc32c_raw
from ext4box.ext4.format.errors import Corrupt, group_where
from ext4box.ext4.format.superblock import Superblock

# bg_flags
BG_INODE_UNINIT = 0x1
BG_BLOCK_UNINIT = 0x2
BG_INODE_ZEROED = 0x4

_LO = struct.Struct("<IIIHHHHIHHHH")  # the 32-byte descriptor
_HI = struct.Struct("<IIIHHHHIHHI")  # the 64bit extension at offset 32
CHECKSUM_OFFSET = 0x1E


@dataclass(frozen=True, slots=True)
class GroupDesc:
    group: int
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free_blocks_count: int
    free_inodes_count: int
    used_dirs_count: int
    flags: int
    exclude_bitmap: int
    block_bitmap_csum: int
    inode_bitmap_csum: int
    itable_unused: int
    checksum: int

    @classmethod
    def parse(cls, raw: bytes, group: int, desc_size: int) -> GroupDesc:
        (bb, ib, it, fb, fi, ud, flags, eb, bbc, ibc, iu, csum) = _LO.unpack_from(raw, 0)
        if desc_size >= 64:
            (bb_hi, ib_hi, it_hi, fb_hi, fi_hi, ud_hi, iu_hi, eb_hi, bbc_hi, ibc_hi, _) = (
                _HI.unpack_from(raw, 32)
            )
            bb |= bb_hi << 32
            ib |= ib_hi << 32
            it |= it_hi << 32
            fb |= fb_hi << 16
            fi |= fi_hi << 16
            ud |= ud_hi << 16
            iu |= iu_hi << 16
            eb |= eb_hi << 32
            bbc |= bbc_hi << 16
            ibc |= ibc_hi << 16
        return cls(group, bb, ib, it, fb, fi, ud, flags, eb, bbc, ibc, iu, csum)


def encode_group_desc(desc: GroupDesc, sb: Superblock, base: bytes = b"") -> bytes:
    """The on-disk bytes of `desc` (sb.desc_size long) with its checksum.

    Bytes past the 64 modelled ones are taken from `base` (the descriptor as
    read), so a larger desc_size keeps whatever a newer kernel put there.
    """
    size = sb.desc_size
    wide = size >= 64
    limit32 = 0xFFFFFFFF if not wide else (1 << 64) - 1
    limit16 = 0xFFFF if not wide else 0xFFFFFFFF
    for name, value, limit in (
        ("block_bitmap", desc.block_bitmap, limit32),
        ("inode_bitmap", desc.inode_bitmap, limit32),
        ("inode_table", desc.inode_table, limit32),
        ("exclude_bitmap", desc.exclude_bitmap, limit32),
        ("free_blocks_count", desc.free_blocks_count, limit16),
        ("free_inodes_count", desc.free_inodes_count, limit16),
        ("used_dirs_count", desc.used_dirs_count, limit16),
        ("itable_unused", desc.itable_unused, limit16),
    ):
        if not 0 <= value <= limit:
            raise ValueError(
                f"group {desc.group}: {name} {value} does not fit a {size}-byte descriptor"
            )
    raw = bytearray(size)
    _LO.pack_into(
        raw,
        0,
        desc.block_bitmap & 0xFFFFFFFF,
        desc.inode_bitmap & 0xFFFFFFFF,
        desc.inode_table & 0xFFFFFFFF,
        desc.free_blocks_count & 0xFFFF,
        desc.free_inodes_count & 0xFFFF,
        desc.used_dirs_count & 0xFFFF,
        desc.flags & 0xFFFF,
        desc.exclude_bitmap & 0xFFFFFFFF,
        desc.block_bitmap_csum & 0xFFFF,
        desc.inode_bitmap_csum & 0xFFFF,
        desc.itable_unused & 0xFFFF,
        0,
    )
    if wide:
        _HI.pack_into(
            raw,
            32,
            desc.block_bitmap >> 32,
            desc.inode_bitmap >> 32,
            desc.inode_table >> 32,
            desc.free_blocks_count >> 16,
            desc.free_inodes_count >> 16,
            desc.used_dirs_count >> 16,
            desc.itable_unused >> 16,
            desc.exclude_bitmap >> 32,
            (desc.block_bitmap_csum >> 16) & 0xFFFF,
            (desc.inode_bitmap_csum >> 16) & 0xFFFF,
            0,
        )
        if size > 64 and len(base) >= size:
            raw[64:size] = base[64:size]
    checksum = descriptor_checksum(sb, desc.group, bytes(raw))
    struct.pack_into("<H", raw, CHECKSUM_OFFSET, checksum if checksum is not None else 0)
    return bytes(raw)


def descriptor_checksum(sb: Superblock, group: int, raw: bytes) -> int | None:
    """The checksum the descriptor should carry, or None if the image has none."""
    group_le = group.to_bytes(4, "little")
    if sb.metadata_csum:
        assert sb.csum_seed is not None
        crc = crc32c_raw(sb.csum_seed, group_le)
        crc = crc32c_raw(crc, raw[:CHECKSUM_OFFSET])
        crc = crc32c_raw(crc, b"\0\0")
        crc = crc32c_raw(crc, raw[CHECKSUM_OFFSET + 2 :])
        return crc & 0xFFFF
    if sb.gdt_csum:
        crc = crc16(0xFFFF, sb.uuid)
        crc = crc16(crc, group_le)
        crc = crc16(crc, raw[:CHECKSUM_OFFSET])
        if len(raw) > 32:
            crc = crc16(crc, raw[32:])
        return crc
    return None


def descriptor_block(sb: Superblock, desc_block_index: int) -> int:
    """Physical block holding the `desc_block_index`-th block of descriptors."""
    first = sb.first_data_block
    if not sb.has_incompat(F.INCOMPAT_META_BG) or desc_block_index < int(sb.first_meta_bg):
        return first + 1 + desc_block_index
    # With meta_bg each block of descriptors lives in the first group it describes.
    descs_per_block = sb.block_size // sb.desc_size
    group = desc_block_index * descs_per_block
    has_super = 1 if sb.group_has_super(group) else 0
    if sb.block_size == 1024 and first == 0:
        has_super += 1
    return group_first_block(sb, group) + has_super


def group_first_block(sb: Superblock, group: int) -> int:
    return sb.first_data_block + group * sb.blocks_per_group


def gdt_block_count(sb: Superblock) -> int:
    descs_per_block = sb.block_size // sb.desc_size
    return -(-sb.group_count // descs_per_block)


def blocks_in_group(sb: Superblock, group: int) -> int:
    """Blocks group `group` covers (the last group may be short)."""
    first = group_first_block(sb, group)
    return min(sb.blocks_per_group, sb.blocks_count - first)


def group_metadata_runs(sb: Superblock, descs: list[GroupDesc]) -> dict[int, list[tuple[int, int]]]:
    """For each group, the (offset in group, length) runs of fixed metadata inside it:
    superblock and GDT copies, reserved GDT blocks, meta_bg descriptor blocks, and
    every group's bitmaps and inode table that live there (with flex_bg they are
    packed into the first groups of the flex group)."""
    runs: dict[int, list[tuple[int, int]]] = {g: [] for g in range(sb.group_count)}
    descs_per_block = sb.block_size // sb.desc_size
    meta_bg = sb.has_incompat(F.INCOMPAT_META_BG)
    first_meta_bg = int(sb.fields["first_meta_bg"])
    if meta_bg:
        old_desc_blocks = first_meta_bg
    else:
        old_desc_blocks = gdt_block_count(sb) + int(sb.fields["reserved_gdt_blocks"])
    for group in range(sb.group_count):
        has_super = 1 if sb.group_has_super(group) else 0
        if has_super:
            runs[group].append((0, 1))
        if not meta_bg or group // descs_per_block < first_meta_bg:
            if has_super and old_desc_blocks:
                runs[group].append((1, old_desc_blocks))
        elif group % descs_per_block in (0, 1, descs_per_block - 1):
            runs[group].append((has_super, 1))
    itable_blocks = -(-sb.inodes_per_group * sb.inode_size // sb.block_size)
    for desc in descs:
        for start, length in (
            (desc.block_bitmap, 1),
            (desc.inode_bitmap, 1),
            (desc.inode_table, itable_blocks),
        ):
            # A run may cross into the next group (a big flex_bg inode table).
            while length > 0:
                group = (start - sb.first_data_block) // sb.blocks_per_group
                if group < 0 or group >= sb.group_count:
                    raise Corrupt(
                        "group descriptor", group_where(desc.group), "metadata outside fs"
                    )
                offset = start - group_first_block(sb, group)
                piece = min(length, sb.blocks_per_group - offset)
                runs[group].append((offset, piece))
                start += piece
                length -= piece
    return runs


class GroupTable:
    """All group descriptors, read once at mount and validated against the geometry.

    A descriptor that fails its checksum or points outside the filesystem
    makes only its own group unusable (as the kernel tolerates on read-only
    mounts): `bad` maps such groups to the reason, and asking for one raises
    Corrupt, so inodes elsewhere stay reachable. A writer must refuse to mount
    while `bad` is non-empty.
    """

    def __init__(self, sb: Superblock, read_block: Callable[[int], bytes]) -> None:
        self.sb = sb
        self.descs: list[GroupDesc] = []
        self.bad: dict[int, str] = {}
        descs_per_block = sb.block_size // sb.desc_size
        inode_table_blocks = -(-sb.inodes_per_group * sb.inode_size // sb.block_size)
        for index in range(gdt_block_count(sb)):
            pblk = descriptor_block(sb, index)
            if pblk >= sb.blocks_count:
                raise Corrupt(
                    "group descriptor table", f"block {pblk}", "descriptor block past the device"
                )
            block = read_block(pblk)
            for slot in range(descs_per_block):
                group = index * descs_per_block + slot
                if group >= sb.group_count:
                    break
                raw = block[slot * sb.desc_size : (slot + 1) * sb.desc_size]
                desc = GroupDesc.parse(raw, group, sb.desc_size)
                want = descriptor_checksum(sb, group, raw)
                if want is not None and want != desc.checksum:
                    self.bad[group] = f"checksum 0x{desc.checksum:04x} != computed 0x{want:04x}"
                else:
                    problem = self._layout_problem(desc, inode_table_blocks)
                    if problem:
                        self.bad[group] = problem
                self.descs.append(desc)

    def _layout_problem(self, desc: GroupDesc, inode_table_blocks: int) -> str | None:
        sb = self.sb
        first = sb.first_data_block
        end = sb.blocks_count
        for what, start, length in (
            ("block bitmap", desc.block_bitmap, 1),
            ("inode bitmap", desc.inode_bitmap, 1),
            ("inode table", desc.inode_table, inode_table_blocks),
        ):
            if start <= first or start + length > end:
                return f"{what} at block {start} (+{length}) outside the filesystem"
        if desc.free_inodes_count > sb.inodes_per_group:
            return f"{desc.free_inodes_count} free inodes in a group of {sb.inodes_per_group}"
        return None

    def __getitem__(self, group: int) -> GroupDesc:
        reason = self.bad.get(group)
        if reason is not None:
            raise Corrupt("group descriptor", group_where(group), reason)
        return self.descs[group]

    def __len__(self) -> int:
        return len(self.descs)
