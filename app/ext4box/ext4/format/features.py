"""Feature flags of the superblock: their names and what this implementation serves.

Names follow the spelling of `dumpe2fs` / `mke2fs -O`, so messages and policy
files use the words an administrator already knows.
"""

from __future__ import annotations

from collections.abc import Mapping

# s_feature_compat: the image is safe to read and write even if a bit is unknown.
COMPAT_DIR_PREALLOC = 0x1
COMPAT_IMAGIC_INODES = 0x2
COMPAT_HAS_JOURNAL = 0x4
COMPAT_EXT_ATTR = 0x8
COMPAT_RESIZE_INODE = 0x10
COMPAT_DIR_INDEX = 0x20
COMPAT_LAZY_BG = 0x40
COMPAT_EXCLUDE_BITMAP = 0x100
COMPAT_SPARSE_SUPER2 = 0x200
COMPAT_FAST_COMMIT = 0x400
COMPAT_STABLE_INODES = 0x800
COMPAT_ORPHAN_FILE = 0x1000

# s_feature_incompat: an unknown bit means we cannot interpret the image.
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000

# s_feature_ro_compat: an unknown bit means reading is fine, writing is not.
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_BTREE_DIR = 0x4
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_DIR_NLINK = 0x20
RO_COMPAT_EXTRA_ISIZE = 0x40
RO_COMPAT_HAS_SNAPSHOT = 0x80
RO_COMPAT_QUOTA = 0x100
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
RO_COMPAT_REPLICA = 0x800
RO_COMPAT_READONLY = 0x1000
RO_COMPAT_PROJECT = 0x2000
RO_COMPAT_SHARED_BLOCKS = 0x4000
RO_COMPAT_VERITY = 0x8000
RO_COMPAT_ORPHAN_PRESENT = 0x10000

COMPAT_NAMES: Mapping[int, str] = {
    COMPAT_DIR_PREALLOC: "dir_prealloc",
    COMPAT_IMAGIC_INODES: "imagic_inodes",
    COMPAT_HAS_JOURNAL: "has_journal",
    COMPAT_EXT_ATTR: "ext_attr",
    COMPAT_RESIZE_INODE: "resize_inode",
    COMPAT_DIR_INDEX: "dir_index",
    COMPAT_LAZY_BG: "lazy_bg",
    COMPAT_EXCLUDE_BITMAP: "snapshot_bitmap",
    COMPAT_SPARSE_SUPER2: "sparse_super2",
    COMPAT_FAST_COMMIT: "fast_commit",
    COMPAT_STABLE_INODES: "stable_inodes",
    COMPAT_ORPHAN_FILE: "orphan_file",
}

INCOMPAT_NAMES: Mapping[int, str] = {
    INCOMPAT_COMPRESSION: "compression",
    INCOMPAT_FILETYPE: "filetype",
    INCOMPAT_RECOVER: "needs_recovery",
    INCOMPAT_JOURNAL_DEV: "journal_dev",
    INCOMPAT_META_BG: "meta_bg",
    INCOMPAT_EXTENTS: "extent",
    INCOMPAT_64BIT: "64bit",
    INCOMPAT_MMP: "mmp",
    INCOMPAT_FLEX_BG: "flex_bg",
    INCOMPAT_EA_INODE: "ea_inode",
    INCOMPAT_DIRDATA: "dirdata",
    INCOMPAT_CSUM_SEED: "metadata_csum_seed",
    INCOMPAT_LARGEDIR: "large_dir",
    INCOMPAT_INLINE_DATA: "inline_data",
    INCOMPAT_ENCRYPT: "encrypt",
    INCOMPAT_CASEFOLD: "casefold",
}

RO_COMPAT_NAMES: Mapping[int, str] = {
    RO_COMPAT_SPARSE_SUPER: "sparse_super",
    RO_COMPAT_LARGE_FILE: "large_file",
    RO_COMPAT_BTREE_DIR: "btree_dir",
    RO_COMPAT_HUGE_FILE: "huge_file",
    RO_COMPAT_GDT_CSUM: "uninit_bg",
    RO_COMPAT_DIR_NLINK: "dir_nlink",
    RO_COMPAT_EXTRA_ISIZE: "extra_isize",
    RO_COMPAT_HAS_SNAPSHOT: "snapshot",
    RO_COMPAT_QUOTA: "quota",
    RO_COMPAT_BIGALLOC: "bigalloc",
    RO_COMPAT_METADATA_CSUM: "metadata_csum",
    RO_COMPAT_REPLICA: "replica",
    RO_COMPAT_READONLY: "read-only",
    RO_COMPAT_PROJECT: "project",
    RO_COMPAT_SHARED_BLOCKS: "shared_blocks",
    RO_COMPAT_VERITY: "verity",
    RO_COMPAT_ORPHAN_PRESENT: "orphan_present",
}

# What the read path understands. Encryption, casefold and verity are known
# filesystem-wide so the image can be served; the affected inodes are refused
# one by one (see filesystem.py).
INCOMPAT_READ_SUPPORTED = (
    INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD
)

RO_COMPAT_KNOWN = sum(RO_COMPAT_NAMES)


def _names(bits: int, table: Mapping[int, str]) -> list[str]:
    names = []
    for bit in range(32):
        mask = 1 << bit
        if bits & mask:
            names.append(table.get(mask, f"unknown_0x{mask:x}"))
    return names


def compat_names(bits: int) -> list[str]:
    return _names(bits, COMPAT_NAMES)


def incompat_names(bits: int) -> list[str]:
    return _names(bits, INCOMPAT_NAMES)


def ro_compat_names(bits: int) -> list[str]:
    return _names(bits, RO_COMPAT_NAMES)


def all_feature_names() -> frozenset[str]:
    """Every feature name we know, for validating configuration (policy files)."""
    return frozenset([*COMPAT_NAMES.values(), *INCOMPAT_NAMES.values(), *RO_COMPAT_NAMES.values()])
