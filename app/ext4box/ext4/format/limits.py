"""How large may a file grow? ext4's per-format size limits, as the kernel computes them.

The kernel works out two limits at mount from the block size and the
huge_file feature alone (not from the extent feature):

- s_maxbytes, for extent-mapped inodes: a logical block number is 32 bits
  and the last block is kept free so that one extent's length can still
  cover the whole file, so (2^32 - 1) blocks. Without huge_file, i_blocks
  counts 512-byte sectors in 32 bits, which caps the file at that many
  sectors rounded down to whole blocks.
- s_bitmap_maxbytes, for every inode without the extents flag (indirect
  block maps, and inline-data inodes, which the kernel keeps without it):
  what 12 direct, one single, one double and one triple indirect block
  address, unless i_blocks (2^32 - 1 sectors without huge_file, 2^48 - 1
  with it) runs out first, counting the indirect blocks a dense file needs.

Both are capped at MAX_LFS_FILESIZE (2^63 - 1 on 64-bit). A truncate or
setattr to a size above the inode's limit fails with EFBIG; a write that
starts at or past it fails with EFBIG, and one that crosses it is cut short
at the limit (generic_write_checks and ext4_write_checks).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import FileTooBig
from ext4box.ext4.format.inode import FL_EXTENTS

if TYPE_CHECKING:
    from ext4box.ext4.format.inode import Inode
    from ext4box.ext4.format.superblock import Superblock

# The VFS's largest file offset on a 64-bit kernel (LLONG_MAX).
MAX_LFS_FILESIZE = (1 << 63) - 1
# Block pointers held in i_block before the indirect ones.
_DIRECT_BLOCKS = 12
_SECTOR_BITS = 9


def _i_blocks_capacity(block_bits: int, huge_file: bool) -> int:
    """How many filesystem blocks i_blocks can count for one inode."""
    if huge_file:
        return (1 << 48) - 1  # 48 bits, and in block units when an inode needs it
    return ((1 << 32) - 1) >> (block_bits - _SECTOR_BITS)  # 32 bits of 512-byte sectors


@lru_cache(maxsize=16)
def extent_max_bytes(block_size: int, huge_file: bool) -> int:
    """s_maxbytes: the largest size of an extent-mapped file."""
    block_bits = block_size.bit_length() - 1
    limit = ((1 << 32) - 1) << block_bits
    if not huge_file:
        limit = min(limit, _i_blocks_capacity(block_bits, huge_file) << block_bits)
    return min(limit, MAX_LFS_FILESIZE)


@lru_cache(maxsize=16)
def blockmap_max_bytes(block_size: int, huge_file: bool) -> int:
    """s_bitmap_maxbytes: the largest size of a file without the extents flag."""
    block_bits = block_size.bit_length() - 1
    per_block = block_size // 4  # block numbers in one indirect block
    capacity = _i_blocks_capacity(block_bits, huge_file)
    addressed = _DIRECT_BLOCKS + per_block + per_block**2 + per_block**3
    # Indirect blocks of a dense file that uses every pointer.
    tree_blocks = 1 + (1 + per_block) + (1 + per_block + per_block**2)
    if addressed + tree_blocks <= capacity:
        blocks = addressed
    else:
        # i_blocks runs out first: the data blocks that fit once the indirect
        # blocks needed to reach them are counted too.
        beyond_single = capacity - _DIRECT_BLOCKS - per_block
        if beyond_single < per_block**2:
            tree_blocks = 1 + 1 + _ceil_div(beyond_single, per_block)
        else:
            beyond_double = beyond_single - per_block**2
            tree_blocks = (1 + (1 + per_block) + 1 + _ceil_div(beyond_double, per_block)
                           + _ceil_div(beyond_double, per_block**2))
        blocks = capacity - tree_blocks
    return min(blocks << block_bits, MAX_LFS_FILESIZE)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def max_file_size(sb: Superblock, inode: Inode) -> int:
    """The largest i_size `inode` may have on the filesystem of `sb`.

    An inode with the extents flag gets s_maxbytes; any other (block map,
    inline data) the smaller of s_maxbytes and s_bitmap_maxbytes, since the
    kernel checks both for it."""
    huge_file = sb.has_ro_compat(F.RO_COMPAT_HUGE_FILE)
    limit = extent_max_bytes(sb.block_size, huge_file)
    if not inode.flags & FL_EXTENTS:
        limit = min(limit, blockmap_max_bytes(sb.block_size, huge_file))
    return limit


def check_size(sb: Superblock, inode: Inode, size: int) -> None:
    """Raise FileTooBig (EFBIG) if `inode` may not have i_size `size`."""
    limit = max_file_size(sb, inode)
    if size > limit:
        raise FileTooBig(f"size {size} above the limit {limit} of inode {inode.ino}")


def writable_length(sb: Superblock, inode: Inode, pos: int, length: int) -> int:
    """How many of `length` bytes a write at `pos` may write: all of them, or those
    below the limit; FileTooBig (EFBIG) when `pos` is at or past it."""
    limit = max_file_size(sb, inode)
    if pos >= limit:
        raise FileTooBig(f"write at {pos}, at or past the limit {limit} of inode {inode.ino}")
    return min(length, limit - pos)
