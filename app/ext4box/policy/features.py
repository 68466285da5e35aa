"""ext4 feature names a policy may refuse.

The policy layer knows nothing about superblocks (and imports nothing from
ext4/): it only checks that a name in ``refuse_features`` is a real ext4
feature, spelled the way dumpe2fs prints it, and hands the canonical names to
the helper, which compares them with the image's superblock. A few other
spellings are mapped to the canonical name so the helper sees one spelling.
"""

from __future__ import annotations

COMPAT_NAMES = (
    "dir_prealloc",
    "imagic_inodes",
    "has_journal",
    "ext_attr",
    "resize_inode",
    "dir_index",
    "lazy_bg",
    "snapshot_bitmap",
    "sparse_super2",
    "fast_commit",
    "stable_inodes",
    "orphan_file",
)

RO_COMPAT_NAMES = (
    "sparse_super",
    "large_file",
    "huge_file",
    "uninit_bg",
    "dir_nlink",
    "extra_isize",
    "quota",
    "bigalloc",
    "metadata_csum",
    "replica",
    "read-only",
    "project",
    "shared_blocks",
    "verity",
    "orphan_present",
)

INCOMPAT_NAMES = (
    "compression",
    "filetype",
    "needs_recovery",
    "journal_dev",
    "extent",
    "meta_bg",
    "64bit",
    "mmp",
    "flex_bg",
    "ea_inode",
    "dirdata",
    "metadata_csum_seed",
    "large_dir",
    "inline_data",
    "encrypt",
    "casefold",
)

KNOWN_FEATURES = frozenset(COMPAT_NAMES + RO_COMPAT_NAMES + INCOMPAT_NAMES)

# Other spellings accepted by e2fsprogs tools → the name dumpe2fs prints.
FEATURE_ALIASES = {
    "extents": "extent",
    "gdt_csum": "uninit_bg",
    "exclude_bitmap": "snapshot_bitmap",
    "fname_encoding": "casefold",
}


def canonical_feature(name: str) -> str | None:
    """The canonical spelling of a feature name, or None if it is not an ext4 feature."""
    name = FEATURE_ALIASES.get(name, name)
    return name if name in KNOWN_FEATURES else None
