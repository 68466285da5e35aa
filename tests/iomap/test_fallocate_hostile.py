"""Unwritten extents over stale bytes, and fallocate running out of space.

Blocks under an unwritten extent hold whatever was there before (fallocate
never writes them), and a crafted image can put anything there: none of it may
ever become readable through a read, a partial write, a copy, a seek or a
range operation. The kernel's ext4 on the same image is the reference.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path

import pytest
from falloc_support import (
    COLLAPSE_RANGE,
    INSERT_RANGE,
    KEEP_SIZE,
    ZERO_RANGE,
    Twins,
    e2fsck_clean,
    kernel_fallocate,
    make_image,
    pattern,
)
from test_fallocate_vs_kernel import apply, run_twins, same

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import NoSpace
from ext4box.ext4.format.inode import ROOT_INO
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.write.writable import WritableFilesystem
from ext4box.iomap.engine import IOMapEngine
from support.kernel import kernel_mount, why_no_kernel_mounts

B = 4096
STALE = b"STALE-SECRET-BYTES:"


@pytest.fixture(autouse=True)
def _need_kernel() -> None:
    reason = why_no_kernel_mounts()
    if reason is not None:
        pytest.skip(reason)


def _physical_runs(path: Path) -> list[tuple[int, int]]:
    """(pblk, length) of a mounted file's extents, from the kernel's FIEMAP."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True,
                         check=True).stdout
    runs = []
    for line in out.splitlines():
        match = re.match(r"^\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+)\.\.\s*\d+:\s*(\d+):", line)
        if match:
            runs.append((int(match.group(1)), int(match.group(2))))
    return runs


def _stale_image(tmp_path: Path) -> Path:
    """A kernel-made file of 16 unwritten blocks, those blocks then filled with
    stale bytes on the raw image, as a deleted file's data would be. (No
    journal, and a syncfs before the unmount: the image is complete even if
    another mount namespace keeps a copy of the mount alive.)"""
    image = make_image(tmp_path, {"other": pattern(1, 3 * B)}, mkfs_extra=("-O", "^has_journal"))
    mnt = tmp_path / "prep"
    with kernel_mount(image, mnt, readonly=False) as root:
        fd = os.open(root / "u", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            kernel_fallocate(fd, 0, 0, 16 * B)
            os.fsync(fd)
        finally:
            os.close(fd)
        runs = _physical_runs(root / "u")
        subprocess.run(["sync", "-f", str(root)], check=True)
    assert sum(length for _, length in runs) == 16
    stale = (STALE * (B // len(STALE) + 1))[:B]
    with image.open("r+b") as f:
        for pblk, length in runs:
            for block in range(pblk, pblk + length):
                f.seek(block * B)
                f.write(stale)
    return image


def test_stale_blocks_under_unwritten_extents_never_leak(tmp_path: Path) -> None:
    image = _stale_image(tmp_path)
    seen: list[bytes] = []

    def scenario(twins: Twins, mismatches: list[str]) -> None:
        seen.append(twins.engine.read(twins.fs.inode(twins.ino("u")), 0, 16 * B))
        twins.write("u", 3 * B + 100, b"partial write")  # the rest of block 3 stays zero
        same(mismatches, "copy u->c", twins.copy("u", "c", 0, 0, 16 * B))
        apply(twins, mismatches, [
            ("u", ZERO_RANGE, 5 * B + 7, 3 * B), ("u", COLLAPSE_RANGE, B, B),
            ("u", INSERT_RANGE, 2 * B, 2 * B), ("u", KEEP_SIZE, 20 * B, B),
        ])
        twins.truncate("u", 30 * B)  # up over the rest: zeros
        twins.write("u", 21 * B - 1, b"xy")  # across two unwritten blocks
        for name in ("u", "c"):
            node = twins.fs.inode(twins.ino(name))
            seen.append(twins.engine.read(node, 0, node.size))

    run_twins(tmp_path, {}, scenario, image=image)
    assert seen and not any(STALE[:8] in data for data in seen)


def _open(image: Path) -> tuple[BlockDevice, WritableFilesystem, IOMapEngine]:
    dev = BlockDevice.open(str(image), writable=True)
    fs = open_filesystem(dev, readonly=False)
    assert isinstance(fs, WritableFilesystem)
    return dev, fs, IOMapEngine(fs, dev)


@pytest.mark.parametrize("mode", [0, KEEP_SIZE, ZERO_RANGE])
def test_enospc_leaves_nothing_allocated(tmp_path: Path, mode: int) -> None:
    """The kernel keeps what it allocated before running out; ext4box keeps nothing."""
    image = make_image(tmp_path, {"f": pattern(2, 10 * B + 5), "g": b""}, size_mb=8)
    dev, fs, engine = _open(image)
    try:
        ino = fs.lookup(ROOT_INO, b"f")
        # Fragment f so the failed call would have had many extents to insert.
        for lblk in range(1, 10, 2):
            engine.fallocate(ino, 0x03, lblk * B, B, now_ns=1)
        fs.commit()
        before_inode = fs.inode(ino)
        before_free = fs.statfs().blocks_free
        with pytest.raises(NoSpace):
            engine.fallocate(ino, mode, 2 * B, 64 << 20, now_ns=2)
        after = fs.inode(ino)
        assert (after.size, after.blocks_512, after.i_block, after.mtime_ns) == (
            before_inode.size, before_inode.blocks_512, before_inode.i_block,
            before_inode.mtime_ns)
        assert fs.statfs().blocks_free == before_free
        # Exactly what is left still fits, in one call, and reads as zeros.
        free_now = fs.statfs().blocks_avail
        g = fs.lookup(ROOT_INO, b"g")
        engine.fallocate(g, 0, 0, (free_now - 8) * B, now_ns=3)
        assert engine.read(fs.inode(g), 0, 64 * B) == bytes(64 * B)
    finally:
        fs.close()
        dev.close()
    report = e2fsck_clean(image)
    assert report is None, report


def _fill_host(path: Path, leave: int) -> None:
    with path.open("wb") as filler:
        while True:
            st = os.statvfs(path)
            room = st.f_bavail * st.f_frsize - leave
            if room <= 0:
                break
            filler.write(b"\xff" * min(room, 1 << 20))
            filler.flush()


def test_failed_write_into_unwritten_extent_leaves_it_unwritten(tmp_path: Path) -> None:
    """The image lives on a small tmpfs, the blocks of an unwritten extent are
    holes of the image file, and the host is full: the data write fails. The
    extent must stay allocated and unwritten (reading as zeros), as the kernel
    leaves an unwritten extent whose I/O failed, not be freed or exposed."""
    host = tmp_path / "host"
    host.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(host)], check=True)
    try:
        image = host / "disk.img"
        with image.open("wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", str(B), str(image)], check=True,
                       capture_output=True)
        dev, fs, engine = _open(image)
        try:
            ino = fs.create(ROOT_INO, b"u", 0o100644, 0, 0).ino
            engine.fallocate(ino, 0, 0, 2 << 20, now_ns=1)
            fs.commit()
            before = fs.inode(ino)
            runs_before = fs.map_blocks(before, 0, 512)
            assert all(run.unwritten for run in runs_before)
            filler = host / "filler"
            _fill_host(filler, leave=0)
            with pytest.raises(OSError) as failure:
                engine.write(fs.inode(ino), 100, b"\x5a" * (1 << 20), now_ns=2)
            assert failure.value.errno == errno.ENOSPC
            after = fs.inode(ino)
            assert after.blocks_512 == before.blocks_512
            assert all(run.unwritten for run in fs.map_blocks(after, 0, 512))
            assert engine.read(after, 0, after.size) == bytes(after.size)
            filler.unlink()  # room again: the close can commit
        finally:
            fs.close()
            dev.close()
        report = e2fsck_clean(image)
        assert report is None, report
    finally:
        subprocess.run(["umount", str(host)], check=False)
