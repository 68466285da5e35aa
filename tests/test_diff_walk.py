"""The diff walk: every variant image, mounted by the kernel and by ext4box, must match.

Each image is walked through a read-only kernel loop mount and through
`ext4box serve -o ro`; every field of every entry (type, mode, owners, link
count, size, ns timestamps, rdev, inode number, block count, link target,
xattrs, content hash) must be identical.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from support import images
from support.images import VARIANTS, ImageCache, Variant
from support.kernel import kernel_mount
from support.serve import served, server_kind
from support.walk import Entry, compare, format_differences, walk

_VARIANT_PARAMS = [pytest.param(v, id=v.name) for v in VARIANTS]


def _entries(tree: dict[str, Entry | str]) -> list[Entry]:
    return [e for e in tree.values() if isinstance(e, Entry)]


@pytest.mark.kernel
@pytest.mark.parametrize("variant", _VARIANT_PARAMS)
def test_variant_image_has_the_structures_it_claims(
    variant: Variant, image_cache: ImageCache
) -> None:
    """The images exercise what they are meant to (checked with debugfs/dumpe2fs)."""
    image = image_cache.image(variant)
    header = images.dumpe2fs_header(image)
    features = set(header["Filesystem features"].split())
    if variant.extents:
        assert "extent" in features
        assert images.extent_tree_depth(image, images.FRAGMENTED_FILE) >= 1
    else:
        assert "extent" not in features
    assert images.htree_levels(image, images.HTREE_DIR) is not None
    if variant.big_dir_entries:
        assert images.htree_levels(image, images.BIG_DIR) == 1
    assert images.xattr_block_of(image, images.BIG_XATTR_FILE) != 0
    if variant.name == "ext4-inline":
        assert "inline_data" in features
        assert "Size of inline data" in images.debugfs(image, 'stat "/files/tiny.txt"')
    if variant.name == "ext4-tea-hash":
        assert header["Default directory hash"] == "tea"
        assert "Hash Version: 2" in images.debugfs(image, f'htree "/{images.HTREE_DIR}"')
    if variant.name == "ext4-unsigned-hash":
        assert "unsigned_directory_hash" in header["Filesystem flags"]
    if variant.name == "ext4-small-inodes":
        assert header["Inode size"] == "128"
    if variant.name in ("ext2", "ext3"):
        assert ("has_journal" in features) == (variant.name == "ext3")
    for feature, present in (("metadata_csum", "no-csum" not in variant.name),
                             ("64bit", "no-64bit" not in variant.name and variant.extents),
                             ("flex_bg", "no-flex-bg" not in variant.name)):
        if variant.name.startswith("ext4"):
            assert (feature in features) == present, feature


@pytest.mark.kernel
def test_kernel_walk_sees_the_rich_tree(image_cache: ImageCache, tmp_path: Path) -> None:
    """The kernel's view of the default image has every kind of thing the tree promises."""
    with kernel_mount(image_cache.image("ext4-4k"), tmp_path / "mnt") as mnt:
        tree = walk(mnt)
    entries = _entries(tree)
    assert len(entries) == len(tree), "the kernel failed to stat some entries"
    kinds = {e.kind for e in entries}
    assert kinds == {"reg", "dir", "lnk", "chr", "blk", "fifo", "sock"}
    assert any(e.nlink == 3 and e.kind == "reg" for e in entries)
    assert tree["times/pre-1970"].mtime_ns < 0  # type: ignore[union-attr]
    assert tree["times/y2100"].mtime_ns == images.Y2100_NS - 7  # type: ignore[union-attr]
    assert tree["owners/huge"].uid == 4_000_000_000  # type: ignore[union-attr]
    assert stat.S_IMODE(tree["modes/all-bits"].mode) == 0o7777  # type: ignore[union-attr]
    assert os.major(tree["special/char-big-numbers"].rdev) == 259  # type: ignore[union-attr]
    big = dict(tree[images.BIG_XATTR_FILE].xattrs)  # type: ignore[union-attr,arg-type]
    assert len(big[b"user.big"]) == 600
    acl_dir = dict(tree["acl/dir"].xattrs)  # type: ignore[union-attr,arg-type]
    assert {b"system.posix_acl_access", b"system.posix_acl_default"} <= acl_dir.keys()
    assert len(tree[f"{images.HTREE_DIR}"].children) == 300  # type: ignore[union-attr,arg-type]


@pytest.mark.kernel
@pytest.mark.fuse
@pytest.mark.parametrize("variant", _VARIANT_PARAMS)
def test_diff_walk_matches_kernel(
    variant: Variant, image_cache: ImageCache, need_fuse: None, tmp_path: Path
) -> None:
    image = image_cache.image(variant)
    with kernel_mount(image, tmp_path / "kernel") as mnt:
        reference = walk(mnt)
    with served(image, tmp_path / "fuse") as handle:
        candidate = walk(handle.mountpoint)
        assert handle.alive(), handle.stderr_text()
    differences = compare(reference, candidate, "kernel", server_kind())
    assert not differences, f"{variant.name}: " + format_differences(differences)


@pytest.mark.kernel
def test_kernel_walk_is_repeatable(image_cache: ImageCache, tmp_path: Path) -> None:
    """Walking changes nothing the walk compares (atime included): two walks agree."""
    image = image_cache.image("ext4-1k")
    with kernel_mount(image, tmp_path / "first") as mnt:
        first = walk(mnt)
    with kernel_mount(image, tmp_path / "second") as mnt:
        second = walk(mnt)
    assert not compare(first, second, "first walk", "second walk")
