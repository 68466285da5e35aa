"""Every image variant of the read-only suite, written to by ext4box: e2fsck-clean, kernel-equal.

For each variant of tests/support/images.py (1k/4k blocks, ext2/ext3/ext4,
block maps, inline_data, no metadata_csum, no 64bit, meta_bg, 128-byte
inodes...) the variant's own builder makes a small image (a small tree instead
of the rich one, fewer directory entries), then one fixed mixed workload runs
on a kernel rw mount and on `ext4box serve -o rw` of copies of it: create,
write, append, sparse write, truncate down and up, mkdir, rename (file and
directory, across directories, replacing), link, unlink, rmdir, xattr set and
remove, fast and slow symlinks, creates and deletes in the hash-indexed
directory. Both images must pass `e2fsck -fn`, the trees must walk the same
(not times, inode numbers), and the kernel's view of the ext4box image must be
what the ext4box mount showed (rw_support.on_both).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from rw_support import assert_same_on_both, attempt, skip_unless_possible

from support.fileops import truncate_by_fd
from support.images import HTREE_DIR, VARIANTS, SourceTree, Variant, build_image

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

_HTREE_ENTRIES = 200  # enough for a hash-indexed directory of several leaves on 1k blocks


def _small_tree(root: Path) -> SourceTree:
    """A few entries of each kind the workload then changes."""
    root.mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / "tiny.txt").write_bytes(b"hello, ext4box\n")
    (root / "files" / "one-block.bin").write_bytes(os.urandom(4096))
    (root / "files" / "medium.bin").write_bytes(bytes(range(256)) * 400)  # indirect on ext2
    (root / "files" / "doomed.bin").write_bytes(b"d" * 9000)
    (root / "empty-dir").mkdir()
    (root / "old-dir" / "inner").mkdir(parents=True)
    (root / "old-dir" / "inner" / "leaf.txt").write_bytes(b"leaf\n")
    os.setxattr(root / "files" / "tiny.txt", "user.keep", b"kept")
    os.setxattr(root / "files" / "medium.bin", "user.drop", b"dropped")
    os.symlink("files/tiny.txt", root / "link-to-tiny")
    return SourceTree(root)


def _write_file(path: Path, data: bytes, flags: int = os.O_CREAT | os.O_WRONLY | os.O_TRUNC,
                offset: int | None = None) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        if offset is None:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _workload(root: Path) -> list[object]:
    """The fixed mixed workload; returns what it observed on the way (values or errnos)."""
    seen: list[object] = []
    new = root / "new"
    os.mkdir(new, 0o755)
    _write_file(new / "a.txt", b"alpha " * 1000)
    _write_file(root / "files" / "tiny.txt", b"appended " * 40, os.O_WRONLY | os.O_APPEND)
    _write_file(new / "sparse.bin", b"far out", os.O_CREAT | os.O_WRONLY, offset=300_000)
    _write_file(new / "sparse.bin", b"start", os.O_WRONLY, offset=0)
    truncate_by_fd(root / "files" / "medium.bin", 5000)
    truncate_by_fd(new / "a.txt", 70_000)  # up: a hole at the end
    truncate_by_fd(root / "files" / "one-block.bin", 100)
    os.makedirs(new / "sub" / "deeper")
    os.rename(new / "a.txt", new / "sub" / "b.txt")
    os.rename(new / "sub" / "deeper", root / "moved-dir")
    os.rename(root / "old-dir", new / "sub" / "old-dir")  # a directory with contents
    _write_file(new / "victim", b"replaced by rename")
    os.rename(root / "files" / "one-block.bin", new / "victim")
    os.link(new / "sub" / "b.txt", new / "hard")
    os.unlink(root / "files" / "doomed.bin")
    os.rmdir(root / "empty-dir")
    seen.append(attempt(os.rmdir, new / "sub"))  # ENOTEMPTY
    os.setxattr(new / "hard", "user.added", b"x" * 100)
    os.setxattr(root / "files" / "tiny.txt", "user.keep", b"changed")
    os.removexattr(root / "files" / "medium.bin", "user.drop")
    seen.append(attempt(os.removexattr, root / "files" / "medium.bin", "user.drop"))
    os.symlink("sub/b.txt", new / "fast-link")
    os.symlink("x" * 100 + "/slow/target", new / "slow-link")
    os.mknod(new / "fifo", 0o600 | 0o010000)
    htree = root / HTREE_DIR
    htree.mkdir(exist_ok=True)  # variants without one get a plain directory
    names = sorted(os.listdir(htree))
    for name in names[::3]:
        os.unlink(htree / name)
    for i in range(60):
        _write_file(htree / f"added-{i:03d}", b"%d" % i)
    seen.append(len(os.listdir(htree)))
    seen.append(os.stat(new / "hard").st_nlink)
    return seen


def _small(variant: Variant) -> Variant:
    return dataclasses.replace(
        variant, size_mb=24, htree_entries=_HTREE_ENTRIES if variant.htree_entries else 0,
        big_dir_entries=min(variant.big_dir_entries, 1500))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_mixed_workload_on_variant(tmp_path: Path, variant: Variant) -> None:
    skip_unless_possible()
    tree = _small_tree(tmp_path / "tree")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    image = build_image(_small(variant), tree, tmp_path / f"{variant.name}.img", scratch)
    seen = assert_same_on_both(tmp_path, image, _workload)
    assert seen[0] == "ENOTEMPTY"
