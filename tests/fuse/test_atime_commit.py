"""An atime update is a dirty inode for the next commit, not a write of its own.

The kernel's touch_atime marks the inode dirty and jbd2 writes it at the
next commit; a read never starts a transaction. Here the real Operations
over the real ext4 layer (as both transports call it) serve many reads of
one file under strictatime, which moves atime on every read: the image file
must not change until the commit, must change at it, and must then show the
last read's atime to debugfs and pass `e2fsck -fn`. A read-only mount never
writes at all, commit or not.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ext4box.blockdev import BlockDevice
from ext4box.ext4.opening import open_filesystem
from ext4box.fuse.atime import take_atime_options
from ext4box.fuse.operations import Context, Operations
from ext4box.iomap.engine import IOMapEngine

ROOT = Context(0, 0)
READS = 50


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if any(shutil.which(tool) is None for tool in ("mkfs.ext4", "e2fsck", "debugfs")):
        pytest.skip("needs mkfs.ext4, e2fsck and debugfs")
    base = tmp_path_factory.mktemp("atime-commit")
    tree = base / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"f" * 10_000)
    path = base / "image.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(path), "8M"],
                   check=True, capture_output=True)  # fmt: skip
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_many(ops: Operations) -> int:
    """READS reads of f through one handle; the atime the server then shows."""
    ino = ops.lookup(1, b"f").ino
    fh = ops.open(ino, os.O_RDONLY, ROOT).fh
    for _ in range(READS):
        assert ops.read(fh, 0, 4096) == b"f" * 4096
    ops.release(fh)
    return ops.getattr(ino).atime_ns


def _debugfs_atime_ns(image: Path) -> int:
    out = subprocess.run(["debugfs", "-R", "stat /f", str(image)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    match = re.search(r"atime: 0x([0-9a-f]+):([0-9a-f]+)", out)
    assert match, out
    seconds, extra = int(match[1], 16), int(match[2], 16)
    return (seconds + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


def test_reads_write_nothing_until_the_commit(image: Path, tmp_path: Path) -> None:
    copy = tmp_path / "rw.ext4"
    shutil.copyfile(image, copy)
    dev = BlockDevice.open(str(copy), writable=True)
    fs = open_filesystem(dev, readonly=False)
    try:
        ops = Operations(fs, IOMapEngine(fs, fs.dev), take_atime_options(["strictatime"])[0])
        before = ops.getattr(ops.lookup(1, b"f").ino).atime_ns
        mounted = _digest(copy)  # the mount itself has marked the image in use
        shown = _read_many(ops)
        assert shown > before
        assert ops.dirty
        assert _digest(copy) == mounted, "a read wrote to the image before the commit"
        ops.commit_tick()
        assert _digest(copy) != mounted, "the commit wrote nothing"
    finally:
        fs.close()
        dev.close()
    assert _debugfs_atime_ns(copy) == shown
    fsck = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout


def test_read_only_never_writes(image: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ro.ext4"
    shutil.copyfile(image, copy)
    before = _digest(copy)
    dev = BlockDevice.open(str(copy), writable=False)
    fs = open_filesystem(dev, readonly=True)
    try:
        ops = Operations(fs, IOMapEngine(fs, fs.dev), take_atime_options(["strictatime"])[0])
        atime = ops.getattr(ops.lookup(1, b"f").ino).atime_ns
        assert _read_many(ops) == atime
        assert not ops.dirty
        ops.commit_tick()
    finally:
        fs.close()
        dev.close()
    assert _digest(copy) == before
