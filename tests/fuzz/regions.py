"""Where an image's metadata lives, how to mutate it, and how to re-seal its checksums.

`metadata_regions` walks a clean image with our own parsers and lists every
structure the read side parses (superblock, group descriptors, inodes, extent
and indirect blocks, directory and htree blocks, xattr blocks, the inodes and
tree blocks of EA inodes, the journal inode, the journal superblock and every
descriptor, commit and revoke block of a log that needs recovery, and the
logged copies) as a byte range with its kind. On an image whose journal needs
recovery the structures are located in the replayed view; those the journal
holds a newer copy of are listed a second time, inside that logged copy,
which is where an edit changes what recovery serves.

A `Mutation` edits bytes inside one region; `reseal` then recomputes that
structure's checksum with the engine's own checksum functions (and, when the
journal is checksummed and an edit touched it, every checksum of the log:
journal_walk.reseal_journal), so a mutation of a metadata_csum image can get
past the checksum gate and reach the parsing logic behind it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format import features as F
from ext4box.ext4.format.blockmap import BlockMapMapper
from ext4box.ext4.format.checksum import crc32c_raw, inode_csum_seed
from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.format.extents import ExtentMapper, block_max_entries, tail_offset
from ext4box.ext4.format.group_desc import CHECKSUM_OFFSET as GD_CHECKSUM_OFFSET
from ext4box.ext4.format.group_desc import descriptor_block, descriptor_checksum
from ext4box.ext4.format.htree import DX_NODE_ENTRIES_OFFSET, DX_ROOT_ENTRIES_OFFSET, dx_csum
from ext4box.ext4.format.inode import inode_checksum
from ext4box.ext4.format.superblock import CHECKSUM_OFFSET as SB_CHECKSUM_OFFSET
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock
from ext4box.ext4.format.xattr import xattr_block_checksum
from ext4box.ext4.journal.overlay import OverlayDevice
from ext4box.ext4.journal.superblock import BLOCK_COMMIT, BLOCK_DESCRIPTOR, SUPERBLOCK_BYTES
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.read.filesystem import Filesystem
from fuzz.journal_walk import journal_device_blocks, journal_superblock, reseal_journal, walk_log

SUPERBLOCK = "superblock"
GROUP_DESC = "group_desc"
INODE = "inode"
EXTENT_BLOCK = "extent_block"
INDIRECT_BLOCK = "indirect_block"
DIR_BLOCK = "dir_block"
XATTR_BLOCK = "xattr_block"
EA_INODE = "ea_inode"  # the inode record of an xattr value inode
JOURNAL_SB = "journal_sb"
JOURNAL_DESCRIPTOR = "journal_descriptor"
JOURNAL_COMMIT = "journal_commit"
JOURNAL_REVOKE = "journal_revoke"
JOURNAL_LOGGED = "journal_logged"  # a logged copy (index: the block it replays onto)
JOURNAL_KINDS = (JOURNAL_SB, JOURNAL_DESCRIPTOR, JOURNAL_COMMIT, JOURNAL_REVOKE, JOURNAL_LOGGED)

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_INODE_GENERATION = 0x64
_INODE_EXTRA_ISIZE = 0x80
_INODE_CSUM_LO = 0x7C
_INODE_CSUM_HI = 0x82


@dataclass(frozen=True, slots=True)
class Region:
    kind: str
    offset: int  # device byte offset
    length: int
    ino: int = 0  # owner inode (inode, extent, dir, xattr, indirect regions)
    index: int = 0  # group for descriptors, logical block for directory blocks, else pblk


@dataclass(frozen=True, slots=True)
class Mutation:
    region: int  # index into the region list (taken modulo its length)
    offset: int  # inside the region (modulo its length)
    op: int  # see `_apply_one`
    value: int


def _walk_inodes(fs: Filesystem, limit: int = 4096) -> list[int]:
    """Inode numbers reachable from the root, parents first."""
    seen = {2}
    order = [2]
    pending = [2]
    while pending and len(order) < limit:
        ino = pending.pop(0)
        if not fs.inode(ino).is_dir:
            continue
        for item in sorted(fs.readdir(ino), key=lambda item: item.ino):
            if item.name in (b".", b"..") or item.ino in seen:
                continue
            seen.add(item.ino)
            order.append(item.ino)
            pending.append(item.ino)
    return order


def metadata_regions(image: bytes) -> list[Region]:
    """Every metadata structure of a clean image, located with our own parsers."""
    fd = os.memfd_create("fuzz-regions")
    try:
        os.write(fd, image)
        fs = open_filesystem(BlockDevice(fd))
        regions = _regions(fs)
        regions += _ea_inode_regions(fs)
        regions += _journal_regions(fs, image)
        if isinstance(fs.dev, OverlayDevice):
            regions += _in_logged_copies(fs.dev, regions, fs.block_size)
        return regions
    finally:
        os.close(fd)


def _inode_region(fs: Filesystem, kind: str, ino: int) -> Region:
    sb = fs.sb
    group, slot = divmod(ino - 1, sb.inodes_per_group)
    offset = fs.groups[group].inode_table * fs.block_size + slot * sb.inode_size
    return Region(kind, offset, sb.inode_size, ino=ino)


def _tree_regions(fs: Filesystem, ino: int) -> list[Region]:
    inode = fs.inode(ino)
    mapper = fs._mapper(inode)
    kind = EXTENT_BLOCK if isinstance(mapper, ExtentMapper) else INDIRECT_BLOCK
    assert isinstance(mapper, ExtentMapper | BlockMapMapper)
    return [Region(kind, pblk * fs.block_size, fs.block_size, ino, pblk)
            for pblk in mapper.tree_blocks()]


def _ea_inode_regions(fs: Filesystem) -> list[Region]:
    """The inode records (and tree blocks) of the inodes holding xattr values."""
    regions: list[Region] = []
    seen: set[int] = set()
    for ino in _walk_inodes(fs):
        for entry in fs._xattrs(fs.inode(ino)):
            if entry.value_inum and entry.value_inum not in seen:
                seen.add(entry.value_inum)
                regions.append(_inode_region(fs, EA_INODE, entry.value_inum))
                regions += _tree_regions(fs, entry.value_inum)
    return regions


def _journal_regions(fs: Filesystem, image: bytes) -> list[Region]:
    """The journal inode, its superblock and, when it needs recovery, every block of the
    log: header blocks by type, logged copies by the block they replay onto."""
    journal_ino = int(fs.sb.fields["journal_inum"])
    journal = journal_device_blocks(image)
    if not journal_ino or not journal:
        return []
    bs = fs.block_size
    regions = [_inode_region(fs, INODE, journal_ino), *_tree_regions(fs, journal_ino),
               Region(JOURNAL_SB, journal[0] * bs, SUPERBLOCK_BYTES, journal_ino)]
    jsb = journal_superblock(image, journal, bs)
    if jsb is None:
        return regions
    kinds = {BLOCK_DESCRIPTOR: JOURNAL_DESCRIPTOR, BLOCK_COMMIT: JOURNAL_COMMIT}
    for entry in walk_log(image, journal, jsb):
        offset = journal[entry.position] * bs
        regions.append(Region(kinds.get(entry.kind, JOURNAL_REVOKE), offset, bs, journal_ino,
                              entry.position))
        for tag, position in zip(entry.tags, entry.logged, strict=True):
            regions.append(Region(JOURNAL_LOGGED, journal[position] * bs, bs, journal_ino,
                                  tag.target))
    return regions


def _in_logged_copies(overlay: OverlayDevice, regions: list[Region], bs: int) -> list[Region]:
    """The structures recovery serves from a logged copy, located inside that copy."""
    moved = []
    for region in regions:
        block = region.offset // bs
        copy = overlay.copy_of(block)
        if copy is None or region.kind in JOURNAL_KINDS or (
                region.offset + region.length > (block + 1) * bs):
            continue
        offset = copy.device_block * bs + region.offset % bs
        moved.append(Region(region.kind, offset, region.length, region.ino, region.index))
    return moved


def _regions(fs: Filesystem) -> list[Region]:
    sb = fs.sb
    bs = fs.block_size
    regions = [Region(SUPERBLOCK, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE)]
    per_block = bs // sb.desc_size
    for group in range(sb.group_count):
        pblk = descriptor_block(sb, group // per_block)
        offset = pblk * bs + (group % per_block) * sb.desc_size
        regions.append(Region(GROUP_DESC, offset, sb.desc_size, index=group))
    for ino in _walk_inodes(fs):
        inode = fs.inode(ino)
        group, slot = divmod(ino - 1, sb.inodes_per_group)
        offset = fs.groups[group].inode_table * bs + slot * sb.inode_size
        regions.append(Region(INODE, offset, sb.inode_size, ino=ino))
        if inode.file_acl:
            regions.append(Region(XATTR_BLOCK, inode.file_acl * bs, bs, ino, inode.file_acl))
        if inode.has_inline_data or (inode.is_symlink and fs._is_fast_symlink(inode)):
            continue
        if inode.is_reg or inode.is_dir or inode.is_symlink:
            mapper = fs._mapper(inode)
            kind = EXTENT_BLOCK if isinstance(mapper, ExtentMapper) else INDIRECT_BLOCK
            assert isinstance(mapper, ExtentMapper | BlockMapMapper)
            for pblk in mapper.tree_blocks():
                regions.append(Region(kind, pblk * bs, bs, ino, pblk))
        if inode.is_dir:
            nblocks = -(-inode.size // bs)
            for run in fs.map_blocks(inode, 0, nblocks):
                if run.pblk is None:
                    continue
                for i in range(run.length):
                    regions.append(
                        Region(DIR_BLOCK, (run.pblk + i) * bs, bs, ino, run.lblk + i)
                    )
    return regions


# Values that sit on the edges the parsers check: zero, one, all ones, sign
# bits, powers of two, and near the filesystem's own sizes.
def interesting_values(image_size: int, block_size: int) -> tuple[int, ...]:
    blocks = image_size // block_size
    return (
        0, 1, 2, 3, 4, 5, 6, 11, 12, 16, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0x8001,
        0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, block_size - 12, block_size - 1,
        block_size, block_size + 1, blocks - 1, blocks, blocks + 1, 2 * blocks, 1 << 20,
    )


def apply_mutations(
    image: bytearray, regions: list[Region], mutations: list[Mutation], block_size: int
) -> list[Region]:
    """Apply `mutations` in place; returns the regions touched (for `reseal`)."""
    touched: list[Region] = []
    values = interesting_values(len(image), block_size)
    for mutation in mutations:
        region = regions[mutation.region % len(regions)]
        _apply_one(image, region, mutation, values)
        if region not in touched:
            touched.append(region)
    return touched


def _apply_one(image: bytearray, region: Region, m: Mutation, values: tuple[int, ...]) -> None:
    op = m.op % 9
    width = (1, 2, 4, 1, 4, 4, 16, 2, 8)[op]
    if region.length < width:
        return
    # Align to the field width: most on-disk fields are naturally aligned.
    offset = region.offset + (m.offset % (region.length - width + 1)) // width * width
    if op == 0:
        image[offset] = m.value & 0xFF
    elif op == 1:
        _U16.pack_into(image, offset, m.value & 0xFFFF)
    elif op == 2:
        _U32.pack_into(image, offset, m.value & 0xFFFFFFFF)
    elif op == 3:
        image[offset] ^= 1 << (m.value % 8)
    elif op == 4:
        _U32.pack_into(image, offset, values[m.value % len(values)] & 0xFFFFFFFF)
    elif op == 5:
        # Point at another structure of the image: a block number seen elsewhere.
        source = region.offset + (m.value % max(1, region.length - 3))
        image[offset : offset + 4] = image[source : source + 4]
    elif op == 6:
        image[offset : offset + 16] = bytes(16)
    elif op == 7:
        _U16.pack_into(image, offset, values[m.value % len(values)] & 0xFFFF)
    else:
        image[offset : offset + 8] = (m.value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")


def reseal(image: bytearray, touched: list[Region], journal: tuple[int, ...] = (),
           block_size: int = 0) -> None:
    """Recompute the checksums of the touched structures, if the image has them; with
    `journal` (the seed's journal blocks), those of the log when an edit reached it."""
    _reseal_structures(image, touched)
    if journal:
        bs = block_size
        in_journal = {pblk * bs for pblk in journal}
        if any(r.kind in JOURNAL_KINDS or r.offset // bs * bs in in_journal for r in touched):
            reseal_journal(image, journal, bs)


def _reseal_structures(image: bytearray, touched: list[Region]) -> None:
    try:
        sb_raw = bytes(image[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE])
        ro_compat = _U32.unpack_from(sb_raw, 0x64)[0]
        if ro_compat & F.RO_COMPAT_METADATA_CSUM:
            _U32.pack_into(image, SUPERBLOCK_OFFSET + SB_CHECKSUM_OFFSET,
                           crc32c_raw(0xFFFFFFFF, image[SUPERBLOCK_OFFSET:
                                                        SUPERBLOCK_OFFSET + SB_CHECKSUM_OFFSET]))
        sb = Superblock.parse(bytes(image[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE]))
    except (Ext4Error, struct.error):
        return  # a superblock we cannot parse: nothing else can be sealed
    for region in touched:
        if region.kind == SUPERBLOCK and region.offset != SUPERBLOCK_OFFSET:
            # A logged copy of the superblock: sealed like the primary.
            if ro_compat & F.RO_COMPAT_METADATA_CSUM:
                end = region.offset + SB_CHECKSUM_OFFSET
                _U32.pack_into(image, end, crc32c_raw(0xFFFFFFFF, image[region.offset:end]))
            continue
        if region.kind == GROUP_DESC:
            raw = bytes(image[region.offset : region.offset + region.length])
            want = descriptor_checksum(sb, region.index, raw)
            if want is not None:
                _U16.pack_into(image, region.offset + GD_CHECKSUM_OFFSET, want & 0xFFFF)
        if sb.csum_seed is None:
            continue
        if region.kind in (INODE, EA_INODE):
            _reseal_inode(image, region, sb.csum_seed)
        elif region.kind == XATTR_BLOCK:
            block = bytes(image[region.offset : region.offset + region.length])
            _U32.pack_into(image, region.offset + 16,
                           xattr_block_checksum(block, region.index, sb.csum_seed))
        elif region.kind in (EXTENT_BLOCK, DIR_BLOCK):
            seed = _owner_seed(image, sb, region.ino)
            if seed is None:
                continue
            if region.kind == EXTENT_BLOCK:
                _reseal_extent_block(image, region, seed)
            else:
                _reseal_dir_block(image, region, seed)


def _inode_offset(image: bytearray, sb: Superblock, ino: int) -> int | None:
    """Device offset of inode `ino`, read from the (possibly mutated) descriptors."""
    if not 1 <= ino <= sb.inodes_count:
        return None
    group, slot = divmod(ino - 1, sb.inodes_per_group)
    per_block = sb.block_size // sb.desc_size
    gd_off = (descriptor_block(sb, group // per_block) * sb.block_size
              + (group % per_block) * sb.desc_size)
    table = _U32.unpack_from(image, gd_off + 8)[0]
    if sb.desc_size >= 64:
        table |= _U32.unpack_from(image, gd_off + 0x28)[0] << 32
    offset = table * sb.block_size + slot * sb.inode_size
    return offset if offset + sb.inode_size <= len(image) else None


def _owner_seed(image: bytearray, sb: Superblock, ino: int) -> int | None:
    offset = _inode_offset(image, sb, ino)
    if offset is None or sb.csum_seed is None:
        return None
    generation = _U32.unpack_from(image, offset + _INODE_GENERATION)[0]
    return inode_csum_seed(sb.csum_seed, ino, generation)


def _reseal_inode(image: bytearray, region: Region, fs_seed: int) -> None:
    raw = bytes(image[region.offset : region.offset + region.length])
    generation = _U32.unpack_from(raw, _INODE_GENERATION)[0]
    seed = inode_csum_seed(fs_seed, region.ino, generation)
    has_hi = False
    if len(raw) > 128:
        extra_isize = _U16.unpack_from(raw, _INODE_EXTRA_ISIZE)[0]
        has_hi = extra_isize >= 4 and 128 + extra_isize <= len(raw)
    crc = inode_checksum(raw, seed, has_hi)
    _U16.pack_into(image, region.offset + _INODE_CSUM_LO, crc & 0xFFFF)
    if has_hi:
        _U16.pack_into(image, region.offset + _INODE_CSUM_HI, crc >> 16)


def _reseal_extent_block(image: bytearray, region: Region, seed: int) -> None:
    eh_max = _U16.unpack_from(image, region.offset + 4)[0]
    if not 1 <= eh_max <= block_max_entries(region.length):
        return
    tail = tail_offset(eh_max)
    _U32.pack_into(image, region.offset + tail,
                   crc32c_raw(seed, image[region.offset : region.offset + tail]))


def _reseal_dir_block(image: bytearray, region: Region, seed: int) -> None:
    start, bs = region.offset, region.length
    block = bytes(image[start : start + bs])
    tail_rec_len = _U16.unpack_from(block, bs - 8)[0]
    if tail_rec_len == 12 and block[bs - 5] == 0xDE:
        _U32.pack_into(image, start + bs - 4, crc32c_raw(seed, block[: bs - 12]))
        return
    # A dx root (logical block 0) or an interior dx node.
    entries_at = DX_ROOT_ENTRIES_OFFSET if region.index == 0 else DX_NODE_ENTRIES_OFFSET
    limit, count = struct.unpack_from("<HH", block, entries_at)
    tail_at = entries_at + limit * 8
    if tail_at + 8 > bs or count > limit:
        return
    _U32.pack_into(image, start + tail_at + 4, dx_csum(seed, block, entries_at, count, limit))
