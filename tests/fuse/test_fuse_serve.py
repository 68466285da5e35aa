"""ext4box serve against the kernel's own ext4 on the same image."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from pathlib import Path

import pytest

from ext4box.bdi import READ_AHEAD_KB

STAT_FIELDS = (
    "st_mode",
    "st_ino",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blocks",
    "st_blksize",
    "st_rdev",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
)


def _walk(root: Path) -> list[str]:
    """Every path under root (relative), directories included, not following links."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_contents_match_source(mounts: tuple[Path, Path], source_tree: Path) -> None:
    fuse, _ = mounts
    checked = 0
    for rel in _walk(source_tree):
        src = source_tree / rel
        if src.is_symlink() or not src.is_file():
            continue
        assert _sha256(fuse / rel) == _sha256(src), rel
        checked += 1
    assert checked >= 8


def test_sparse_files_read_holes_as_zeros(mounts: tuple[Path, Path], source_tree: Path) -> None:
    fuse, _ = mounts
    data = (fuse / "sparse_middle").read_bytes()
    assert data == (source_tree / "sparse_middle").read_bytes()
    assert data[5000:300_000] == bytes(295_000)
    assert data[304_096:] == bytes(1_000_000 - 304_096)
    start = (fuse / "sparse_start").read_bytes()
    assert start[:900_000] == bytes(900_000) and start[900_000:900_009] == b"tail data"


def test_stat_matches_kernel(mounts: tuple[Path, Path]) -> None:
    fuse, kernel = mounts
    paths = _walk(kernel)
    assert _walk(fuse) == paths
    for rel in ["", *paths]:
        ours = os.lstat(fuse / rel)
        theirs = os.lstat(kernel / rel)
        for name in STAT_FIELDS:
            assert getattr(ours, name) == getattr(theirs, name), (rel, name)


def test_readdir_matches_kernel(mounts: tuple[Path, Path]) -> None:
    fuse, kernel = mounts
    for rel in ["", "dir", "dir/nested", "lost+found"]:
        ours = {(e.name, e.inode(), e.is_dir(), e.is_symlink()) for e in os.scandir(fuse / rel)}
        theirs = {(e.name, e.inode(), e.is_dir(), e.is_symlink()) for e in os.scandir(kernel / rel)}
        assert ours == theirs, rel


def test_root_inode_is_ext4_root(mounts: tuple[Path, Path]) -> None:
    fuse, _ = mounts
    assert os.stat(fuse).st_ino == 2


def test_xattrs_match_kernel(mounts: tuple[Path, Path]) -> None:
    fuse, kernel = mounts
    for rel in ["small.txt", "medium.bin", "dir", "empty", "link_short"]:
        names = sorted(os.listxattr(kernel / rel, follow_symlinks=False))
        assert sorted(os.listxattr(fuse / rel, follow_symlinks=False)) == names, rel
        for name in names:
            expected = os.getxattr(kernel / rel, name, follow_symlinks=False)
            assert os.getxattr(fuse / rel, name, follow_symlinks=False) == expected, (rel, name)
    assert os.getxattr(fuse / "small.txt", "user.greeting") == b"hi"
    assert os.getxattr(fuse / "small.txt", "user.empty") == b""
    assert "system.posix_acl_access" in os.listxattr(fuse / "dir")


def test_missing_xattr_is_enodata(mounts: tuple[Path, Path]) -> None:
    fuse, _ = mounts
    with pytest.raises(OSError) as caught:
        os.getxattr(fuse / "small.txt", "user.nope")
    assert caught.value.errno == errno.ENODATA


def test_readlink(mounts: tuple[Path, Path], source_tree: Path) -> None:
    fuse, _ = mounts
    for name in ("link_short", "link_long", "link_dir"):
        assert os.readlink(fuse / name) == os.readlink(source_tree / name)
    assert (fuse / "link_dir" / "deep.txt").read_bytes() == b"deep\n" * 1000


def test_nonexistent_is_enoent(mounts: tuple[Path, Path]) -> None:
    fuse, _ = mounts
    for rel in ("nope", "dir/nope", "dir/nested/nope/deeper"):
        with pytest.raises(FileNotFoundError):
            os.stat(fuse / rel)


def test_not_a_directory(mounts: tuple[Path, Path]) -> None:
    fuse, _ = mounts
    with pytest.raises(NotADirectoryError):
        os.stat(fuse / "small.txt" / "x")


def test_writes_refused(mounts: tuple[Path, Path]) -> None:
    fuse, _ = mounts
    for attempt in (
        lambda: os.open(fuse / "small.txt", os.O_RDWR),
        lambda: os.open(fuse / "newfile", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.mkdir(fuse / "newdir"),
        lambda: os.setxattr(fuse / "small.txt", "user.x", b"1"),
    ):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS


def test_statfs_matches_kernel(mounts: tuple[Path, Path]) -> None:
    fuse, kernel = mounts
    ours, theirs = os.statvfs(fuse), os.statvfs(kernel)
    for name in (
        "f_bsize",
        "f_frsize",
        "f_blocks",
        "f_bfree",
        "f_bavail",
        "f_files",
        "f_ffree",
        "f_namemax",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_mount_options(mounts: tuple[Path, Path], image: Path) -> None:
    fuse, _ = mounts
    line = next(
        line.split()
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1] == str(fuse)
    )
    device, _, fstype, options = line[:4]
    assert device == str(image)
    assert fstype == "fuse.ext4box"
    assert {"ro", "nosuid", "nodev", "default_permissions", "allow_other"} <= set(
        options.split(",")
    )


def test_unaligned_reads(mounts: tuple[Path, Path], source_tree: Path) -> None:
    fuse, _ = mounts
    expected = (source_tree / "large.bin").read_bytes()
    fd = os.open(fuse / "large.bin", os.O_RDONLY)
    try:
        for offset, length in [
            (1, 10),
            (4095, 2),
            (12345, 700_001),
            (len(expected) - 5, 100),
            (len(expected), 10),
            (len(expected) + 4096, 10),
        ]:
            assert os.pread(fd, length, offset) == expected[offset : offset + length]
    finally:
        os.close(fd)


def test_special_files(mounts: tuple[Path, Path]) -> None:
    fuse, _ = mounts
    assert stat.S_ISFIFO(os.lstat(fuse / "fifo").st_mode)
    chardev = os.lstat(fuse / "chardev")
    assert stat.S_ISCHR(chardev.st_mode) and chardev.st_rdev == os.makedev(4, 64)
    # nodev: opening a device node on the mount is refused.
    with pytest.raises(PermissionError):
        os.open(fuse / "blockdev", os.O_RDONLY)


def test_read_ahead_is_raised_after_init(mounts: tuple[Path, Path]) -> None:
    """FUSE caps a mount's read-ahead at 128 KiB; the server (as root) raises it
    once its FUSE_INIT reply has been processed, so streaming reads arrive as
    large requests (ext4box.bdi)."""
    fuse, _ = mounts
    if os.geteuid() != 0:
        pytest.skip("only root may change a mount's read-ahead")
    dev = os.stat(fuse).st_dev
    setting = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    deadline = time.monotonic() + 5
    while setting.read_text().strip() != str(READ_AHEAD_KB) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert setting.read_text().strip() == str(READ_AHEAD_KB)
