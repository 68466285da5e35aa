"""The handle checks of fallocate, lseek and copy_file_range in Operations.

The kernel's VFS makes these checks before it sends a request, so a mount
never shows them; the server repeats them because it must not rely on its
peer. Real images (mkfs.ext4 -d), the real Operations over the real ext4
layer, called as both transports call it; e2fsck -fn clean afterwards.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ext4box.blockdev import BlockDevice
from ext4box.ext4.opening import open_filesystem
from ext4box.fuse.errors import FuseError
from ext4box.fuse.operations import Context, Operations
from ext4box.iomap.engine import IOMapEngine

ROOT = Context(0, 0)
KEEP_SIZE = 0x01


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("mkfs.ext4") is None or shutil.which("e2fsck") is None:
        pytest.skip("needs mkfs.ext4 and e2fsck")
    base = tmp_path_factory.mktemp("handles")
    tree = base / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(b"a" * 10_000)
    (tree / "b").write_bytes(b"b" * 100)
    path = base / "image.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(path), "8M"],
                   check=True, capture_output=True)  # fmt: skip
    return path


@contextmanager
def operations(image: Path, tmp_path: Path, *, writable: bool) -> Iterator[Operations]:
    copy = tmp_path / "copy.ext4"
    shutil.copyfile(image, copy)
    dev = BlockDevice.open(str(copy), writable=writable)
    fs = open_filesystem(dev, readonly=not writable)
    ops = Operations(fs, IOMapEngine(fs, fs.dev))
    try:
        yield ops
        ops.commit(durable=True)
    finally:
        fs.close()
        dev.close()
    fsck = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout


def _errno(call, *args: object) -> int:
    with pytest.raises(FuseError) as refused:
        call(*args)
    return refused.value.errno


def _open(ops: Operations, name: bytes, flags: int) -> int:
    return ops.open(ops.lookup(1, name).ino, flags, ROOT).fh


def test_fallocate_needs_a_handle_open_for_writing(image: Path, tmp_path: Path) -> None:
    with operations(image, tmp_path, writable=True) as ops:
        reader = _open(ops, b"a", os.O_RDONLY)
        writer = _open(ops, b"a", os.O_WRONLY)
        assert _errno(ops.fallocate, reader, KEEP_SIZE, 0, 4096) == errno.EBADF
        assert _errno(ops.fallocate, 999, 0, 0, 4096) == errno.EBADF
        ops.fallocate(writer, 0, 10_000, 8192)
        assert ops.getattr(ops.lookup(1, b"a").ino).size == 18_192


def test_copy_file_range_checks_both_handles(image: Path, tmp_path: Path) -> None:
    with operations(image, tmp_path, writable=True) as ops:
        source = _open(ops, b"a", os.O_RDONLY)
        write_only = _open(ops, b"a", os.O_WRONLY)
        target = _open(ops, b"b", os.O_RDWR)
        appender = _open(ops, b"b", os.O_WRONLY | os.O_APPEND)
        read_only_target = _open(ops, b"b", os.O_RDONLY)
        assert _errno(ops.copy_file_range, write_only, 0, target, 0, 10, 0) == errno.EBADF
        assert _errno(ops.copy_file_range, source, 0, appender, 0, 10, 0) == errno.EBADF
        assert _errno(ops.copy_file_range, source, 0, read_only_target, 0, 10, 0) == errno.EBADF
        assert _errno(ops.copy_file_range, source, 0, 999, 0, 10, 0) == errno.EBADF
        assert _errno(ops.copy_file_range, source, 0, target, 0, 10, 1) == errno.EINVAL
        assert ops.copy_file_range(source, 0, target, 50, 20_000, 0) == 10_000
        assert ops.read(target, 0, 20_000) == b"b" * 50 + b"a" * 10_000


def test_seek_answers_only_data_and_hole(image: Path, tmp_path: Path) -> None:
    with operations(image, tmp_path, writable=False) as ops:
        fh = _open(ops, b"a", os.O_RDONLY)
        assert ops.seek(fh, 0, os.SEEK_DATA) == 0
        assert ops.seek(fh, 0, os.SEEK_HOLE) == 10_000
        assert _errno(ops.seek, fh, 10_000, os.SEEK_DATA) == errno.ENXIO
        assert _errno(ops.seek, fh, 0, os.SEEK_SET) == errno.EINVAL
        assert _errno(ops.seek, 999, 0, os.SEEK_DATA) == errno.EBADF


def test_a_read_only_mount_answers_erofs(image: Path, tmp_path: Path) -> None:
    with operations(image, tmp_path, writable=False) as ops:
        fh = _open(ops, b"a", os.O_RDONLY)
        assert _errno(ops.fallocate, fh, 0, 0, 4096) == errno.EROFS
        assert _errno(ops.copy_file_range, fh, 0, fh, 5000, 10, 0) == errno.EROFS
