"""The read-write facade against the kernel: the same operations, identical trees.

Each scenario runs twice on copies of one mkfs image: through
`WritableFilesystem` (in-process, data written the way the iomap executor
will: `write_begin`, data straight to the device with new blocks zero-filled,
`write_end`), and through a read-write kernel mount with plain syscalls. Then
`e2fsck -fn` must call our image clean, and kernel read-only mounts of both
images must walk to the same tree (names, types, modes, owners, sizes,
content hashes, xattrs, link counts, symlink targets, device numbers).

The harness here is shared with test_writable_state.py.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.format.inode import ROOT_INO
from support.facade import (
    Ours,
    assert_clean,
    kernel_walk,
    make_image,
    need_kernel,
    pattern,
    tree_diff,
)
from support.fileops import truncate_by_fd
from support.kernel import kernel_mount

pytestmark = pytest.mark.kernel

# mkfs arguments per image variant (all small: 24 MiB).
VARIANTS = {
    "ext4-1k-csum": ["-t", "ext4", "-b", "1024"],
    "ext4-4k-nocsum-32bit": ["-t", "ext4", "-b", "4096", "-O", "^metadata_csum,^64bit"],
    "ext4-4k-inline": ["-t", "ext4", "-b", "4096", "-O", "inline_data"],
    "ext3-4k": ["-t", "ext3", "-b", "4096"],
    "ext2-1k": ["-t", "ext2", "-b", "1024"],
}
COMPARED = ("kind", "mode", "uid", "gid", "nlink", "size", "rdev", "link_target", "xattrs",
            "sha256", "children")
# An access ACL: user::rw-, user:1000:r--, group::r--, mask::r--, other::---
ACL_VALUE = (b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff"
             + b"\x02\x00\x04\x00\xe8\x03\x00\x00" + b"\x04\x00\x04\x00\xff\xff\xff\xff"
             + b"\x10\x00\x04\x00\xff\xff\xff\xff" + b"\x20\x00\x00\x00\xff\xff\xff\xff")


_libc = ctypes.CDLL(None, use_errno=True)


class Kernel:
    """The same operations as syscalls on a read-write kernel mount."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def p(self, path: str) -> Path:
        return self.root / path

    def create(self, path: str, mode: int = 0o644, rdev: int = 0) -> None:
        if stat.S_IFMT(mode) in (0, stat.S_IFREG):
            os.close(os.open(self.p(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode & 0o7777))
        else:
            os.mknod(self.p(path), mode, rdev)
        os.chmod(self.p(path), mode & 0o7777)  # creation modes are masked by umask

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(self.p(path))
        os.chmod(self.p(path), mode)

    def symlink(self, path: str, target: bytes) -> None:
        os.symlink(target, os.fsencode(self.p(path)))

    def link(self, src: str, dst: str) -> None:
        os.link(self.p(src), self.p(dst))

    def unlink(self, path: str) -> None:
        os.unlink(self.p(path))

    def rmdir(self, path: str) -> None:
        os.rmdir(self.p(path))

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        at_fdcwd = -100
        if _libc.renameat2(at_fdcwd, os.fsencode(self.p(src)), at_fdcwd,
                           os.fsencode(self.p(dst)), flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def write(self, path: str, offset: int, data: bytes) -> None:
        fd = os.open(self.p(path), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def truncate(self, path: str, size: int) -> None:
        truncate_by_fd(self.p(path), size)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self.p(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self.p(path), uid, gid, follow_symlinks=False)

    def setxattr(self, path: str, name: bytes, value: bytes, flags: int = 0) -> None:
        os.setxattr(self.p(path), name, value, flags, follow_symlinks=False)

    def removexattr(self, path: str, name: bytes) -> None:
        os.removexattr(self.p(path), name, follow_symlinks=False)


Scenario = Callable[[object], None]


def run_both(tmp: Path, mkfs_args: list[str], scenario: Scenario,
             size_mb: int = 24) -> tuple[Path, Path]:
    """Run `scenario` through our facade and through the kernel on copies of one image;
    check e2fsck on ours and that both trees are the same."""
    need_kernel()
    base = make_image(tmp / "base.img", mkfs_args, size_mb)
    ours_img, kernel_img = tmp / "ours.img", tmp / "kernel.img"
    shutil.copyfile(base, ours_img)
    shutil.copyfile(base, kernel_img)
    ours = Ours(ours_img)
    try:
        scenario(ours)
    finally:
        ours.close()
    mnt = tmp / "rw"
    mnt.mkdir()
    old_umask = os.umask(0)
    try:
        with kernel_mount(kernel_img, mnt, readonly=False) as root:
            scenario(Kernel(root))
    finally:
        os.umask(old_umask)
    assert_clean(ours_img)
    diff = tree_diff(kernel_walk(ours_img, tmp), kernel_walk(kernel_img, tmp),
                     compared=COMPARED)
    assert not diff, "\n".join(diff[:50])
    return ours_img, kernel_img


def everyday(fs) -> None:
    """Every namespace and data operation once, in a small tree."""
    fs.mkdir("a")
    fs.mkdir("a/b", 0o700)
    fs.mkdir("c")
    fs.create("a/f1", 0o640)
    fs.write("a/f1", 0, pattern(1, 5000))
    fs.write("a/f1", 2000, b"overwrite")
    fs.create("a/sparse")
    fs.write("a/sparse", 3 * 4096 + 17, pattern(2, 100))
    fs.write("a/sparse", 70_000, pattern(3, 9000))
    fs.create("tiny")
    fs.write("tiny", 0, b"small file body")
    fs.write("tiny", 10, b"grows a little more than sixty bytes, so inline data expands")
    fs.create("c/big")
    fs.write("c/big", 0, pattern(4, 300_000))
    fs.truncate("c/big", 123_457)  # down, into the middle of a block
    fs.truncate("c/big", 200_000)  # up again: the tail must read as zeros
    fs.create("c/grow")
    fs.truncate("c/grow", 10_000)
    fs.write("c/grow", 9000, b"end")
    fs.create("fifo", stat.S_IFIFO | 0o600)
    fs.create("chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    fs.create("blk", stat.S_IFBLK | 0o600, os.makedev(259, 70000))
    fs.symlink("fast", b"a/f1")
    fs.symlink("slow", b"s" * 59 + b"/" + b"t" * 100)
    fs.symlink("a/b/edge", b"x" * 59)
    fs.link("a/f1", "c/f1-link")
    fs.link("a/f1", "f1-link2")
    fs.unlink("f1-link2")
    fs.create("c/victim")
    fs.write("c/victim", 0, b"replaced by rename")
    fs.create("c/mover")
    fs.write("c/mover", 0, b"moves over the victim")
    fs.rename("c/mover", "c/victim")
    fs.rename("a/b", "c/b")  # a directory changes parent: '..' and link counts
    fs.mkdir("c/empty")
    fs.mkdir("a/replaced")
    fs.rename("c/empty", "a/replaced")  # a directory replaces an empty one
    fs.create("x1")
    fs.create("x2")
    fs.write("x2", 0, b"two")
    fs.rename("x1", "a/x1", 1)  # RENAME_NOREPLACE
    fs.rename("x2", "c/b", 2)  # RENAME_EXCHANGE of a file and a directory
    fs.mkdir("gone")
    fs.rmdir("gone")
    fs.setxattr("a/f1", b"user.small", b"v")
    fs.setxattr("a/f1", b"user.big", pattern(5, 3000 if fs_block(fs) >= 4096 else 700))
    fs.setxattr("a/f1", b"trusted.t", b"trusted value")
    fs.removexattr("a/f1", b"user.small")
    fs.setxattr("c", b"user.dir", b"on a directory")
    fs.setxattr("tiny", b"system.posix_acl_access", ACL_VALUE)
    fs.chmod("tiny", 0o4750)
    fs.chown("a/f1", 1000, 100)
    fs.chmod("c/big", 0o600)


def fs_block(fs) -> int:
    return fs.bs if isinstance(fs, Ours) else os.statvfs(fs.root).f_bsize


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_everyday_operations_match_kernel(tmp_path: Path, variant: str) -> None:
    run_both(tmp_path, VARIANTS[variant], everyday)


def big_directory(fs) -> None:
    fs.mkdir("d")
    for i in range(2500):
        fs.create(f"d/entry-with-a-longish-name-{i:05d}")
    for i in range(0, 2500, 3):
        fs.unlink(f"d/entry-with-a-longish-name-{i:05d}")
    for i in range(0, 600, 3):
        fs.create(f"d/entry-with-a-longish-name-{i:05d}")
    fs.rename("d/entry-with-a-longish-name-00001", "moved-out")


@pytest.mark.parametrize("variant", ["ext4-1k-csum", "ext2-1k", "ext4-4k-inline"])
def test_large_directory_becomes_htree(tmp_path: Path, variant: str) -> None:
    ours, _ = run_both(tmp_path, VARIANTS[variant], big_directory)
    text = subprocess.run(["debugfs", "-R", "htree d", str(ours)], capture_output=True,
                          text=True, check=True).stdout
    assert "Root node dump" in text


def many_extents(fs) -> None:
    """A file of hundreds of extents (an extent tree of depth >= 1), cut back in steps."""
    fs.create("frag")
    bs = fs_block(fs)
    for i in range(0, 1200, 2):
        fs.write("frag", i * bs, pattern(i, 10))
    for size in (1100 * bs + 5, 700 * bs, 123 * bs + 1, 3 * bs, 0):
        fs.truncate("frag", size)
    fs.write("frag", 5 * bs, b"after")
    fs.create("keep")
    for i in range(0, 600, 2):
        fs.write("keep", i * bs, pattern(i, 100))
    fs.truncate("keep", 301 * bs - 7)


@pytest.mark.parametrize("variant", ["ext4-1k-csum", "ext3-4k"])
def test_fragmented_file_grows_and_shrinks(tmp_path: Path, variant: str) -> None:
    run_both(tmp_path, VARIANTS[variant], many_extents, size_mb=32)


# ---- errors -------------------------------------------------------------------------


def expect(code: int, call: Callable[[], object]) -> None:
    with pytest.raises(Ext4Error) as info:
        call()
    assert info.value.errno == code, f"{info.value!r}: errno {info.value.errno} != {code}"


@pytest.mark.parametrize("variant", ["ext4-1k-csum", "ext4-4k-inline"])
def test_errors_are_the_kernels(tmp_path: Path, variant: str) -> None:
    need_kernel()
    image = make_image(tmp_path / "e.img", VARIANTS[variant])
    ours = Ours(image)
    fs = ours.fs
    try:
        ours.mkdir("d")
        ours.mkdir("d/sub")
        ours.create("d/file")
        ours.create("f")
        d, sub, file_ = ours.resolve("d"), ours.resolve("d/sub"), ours.resolve("d/file")
        expect(errno.EEXIST, lambda: fs.create(d, b"file", 0o100644, 0, 0))
        expect(errno.EEXIST, lambda: fs.mkdir(d, b"sub", 0o755, 0, 0))
        expect(errno.EEXIST, lambda: fs.symlink(d, b"file", b"x", 0, 0))
        expect(errno.EEXIST, lambda: fs.link(file_, d, b"sub"))
        expect(errno.ENOENT, lambda: fs.unlink(d, b"missing", still_open=False))
        expect(errno.ENOENT, lambda: fs.rmdir(d, b"missing"))
        expect(errno.ENOENT, lambda: fs.rename(d, b"missing", d, b"x"))
        expect(errno.ENOENT, lambda: fs.rename(d, b"file", d, b"missing", 2))
        expect(errno.ENOTEMPTY, lambda: fs.rmdir(ROOT_INO, b"d"))
        expect(errno.ENOTDIR, lambda: fs.rmdir(d, b"file"))
        expect(errno.ENOTDIR, lambda: fs.create(file_, b"x", 0o100644, 0, 0))
        expect(errno.ENOTDIR, lambda: fs.rename(d, b"sub", d, b"file"))
        expect(errno.EINVAL, lambda: fs.rename(ROOT_INO, b"d", d, b"file"))
        expect(errno.EISDIR, lambda: fs.unlink(d, b"sub", still_open=False))
        expect(errno.EISDIR, lambda: fs.rename(d, b"file", d, b"sub"))
        fs.rename(ROOT_INO, b"f", ROOT_INO, b"f2")
        expect(errno.ENOTEMPTY, lambda: fs.rename(d, b"sub", ROOT_INO, b"d"))
        expect(errno.ENOTEMPTY, lambda: fs.rename(d, b"file", ROOT_INO, b"d"))
        expect(errno.EINVAL, lambda: fs.rename(ROOT_INO, b"d", sub, b"inside"))
        expect(errno.EINVAL, lambda: fs.rename(ROOT_INO, b"d", d, b"self"))
        expect(errno.EEXIST, lambda: fs.rename(d, b"file", d, b"sub", 1))
        expect(errno.EINVAL, lambda: fs.rename(d, b"file", d, b"x", 3))
        expect(errno.ENAMETOOLONG, lambda: fs.create(d, b"n" * 256, 0o100644, 0, 0))
        expect(errno.ENAMETOOLONG, lambda: fs.symlink(d, b"l", b"t" * fs.block_size, 0, 0))
        expect(errno.EPERM, lambda: fs.link(sub, ROOT_INO, b"dirlink"))
        expect(errno.ENODATA, lambda: fs.removexattr(file_, b"user.none"))
        expect(errno.ENODATA, lambda: fs.setxattr(file_, b"user.none", b"v", 2))
        fs.setxattr(file_, b"user.once", b"v", 1)
        expect(errno.EEXIST, lambda: fs.setxattr(file_, b"user.once", b"w", 1))
        expect(errno.EOPNOTSUPP, lambda: fs.setxattr(file_, b"bogus.name", b"v"))
        expect(errno.ENOSPC, lambda: fs.setxattr(file_, b"user.huge", bytes(fs.block_size)))
        fs.create(d, b"n" * 255, 0o100644, 0, 0)  # 255 is allowed
        assert fs.lookup(ROOT_INO, b"f2") == ours.resolve("f2")
    finally:
        ours.close()
    assert_clean(image)
    mnt = tmp_path / "m"
    mnt.mkdir()
    with kernel_mount(image, mnt) as root:
        assert sorted(os.listdir(root / "d")) == sorted(["file", "sub", "n" * 255])
        assert os.getxattr(root / "d/file", "user.once") == b"v"
        assert os.stat(root / "d").st_nlink == 3


def test_write_into_unwritten_extents(tmp_path: Path) -> None:
    """Blocks the kernel preallocated (fallocate: unwritten extents) become written
    where we write; the rest still reads as zeros."""
    need_kernel()
    image = make_image(tmp_path / "u.img", VARIANTS["ext4-1k-csum"])
    mnt = tmp_path / "m"
    mnt.mkdir()
    with kernel_mount(image, mnt, readonly=False) as root:
        fd = os.open(root / "pre", os.O_CREAT | os.O_WRONLY, 0o644)
        os.posix_fallocate(fd, 0, 65536)
        os.close(fd)
    ours = Ours(image)
    inode = ours.fs.inode(ours.resolve("pre"))
    assert all(run.unwritten for run in ours.fs.map_blocks(inode, 0, 64))
    ours.write("pre", 5000, b"inside the preallocation")
    ours.close()
    assert_clean(image)
    with kernel_mount(image, mnt) as root:
        body = (root / "pre").read_bytes()
    expected = bytearray(65536)
    expected[5000:5024] = b"inside the preallocation"
    assert body == bytes(expected)
