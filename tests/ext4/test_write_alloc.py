"""Block and inode allocators on real images: files built by hand, then e2fsck and the kernel."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
from helpers_debugfs import make_image
from write_support import (
    WriteStack,
    debugfs_write,
    dumpe2fs_counts,
    e2fsck_clean,
    group_flags,
    open_stack,
    regular_file,
    run,
)

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import Corrupt, NoSpace
from ext4box.ext4.format.group_desc import blocks_in_group, group_first_block
from ext4box.ext4.write.alloc import kernel_reserve_blocks
from ext4box.ext4.write.caller import Caller, acting_as
from support.kernel import kernel_mount, why_no_kernel_mounts

VARIANTS = {
    "4k-64bit-csum-flex": ["-t", "ext4", "-b", "4096"],
    "1k-64bit-csum-flex": ["-t", "ext4", "-b", "1024"],
    "4k-gdt_csum-32bit": ["-t", "ext4", "-O", "^metadata_csum,uninit_bg,^64bit"],
    "1k-noflex-csum": ["-t", "ext4", "-b", "1024", "-O", "^flex_bg"],
    "4k-nocsum": ["-t", "ext4", "-O", "^metadata_csum,^uninit_bg"],
    "1k-meta_bg": ["-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"],
    "ext2-blockmap": ["-t", "ext2"],
}

kernel = pytest.mark.skipif(why_no_kernel_mounts() is not None, reason=str(why_no_kernel_mounts()))


def _add_file(stack: WriteStack, parent_ino: int, goal: int, nblocks: int, tail: int = 100):
    """Allocate an inode and up to 4 runs totalling `nblocks`, write random data;
    returns (ino, content)."""
    ino = stack.inodes.alloc(parent_ino, is_dir=False)
    bs = stack.sb.block_size
    runs = []
    lblk = 0
    while lblk < nblocks:
        pblk, n = stack.blocks.alloc(goal, nblocks - lblk)
        runs.append((lblk, n, pblk))
        lblk += n
        goal = pblk + n
    assert len(runs) <= 4
    content = os.urandom(nblocks * bs - tail)
    for lblk, n, pblk in runs:
        stack.dev.pwrite(pblk * bs, content[lblk * bs : (lblk + n) * bs].ljust(n * bs, b"\0"))
    uses_extents = stack.sb.has_incompat(F.INCOMPAT_EXTENTS)
    regular_file(stack, ino, len(content), runs, extents=uses_extents)
    return ino, content


def _check_kernel(image: Path, tmp: Path, files: dict[str, bytes]) -> None:
    if why_no_kernel_mounts() is not None:
        return
    with kernel_mount(image, tmp / "mnt") as mnt:
        for name, content in files.items():
            assert (mnt / name).read_bytes() == content, name
    # The kernel accepts our bitmaps, counts and checksums when it allocates too.
    with kernel_mount(image, tmp / "mnt", readonly=False) as mnt:
        (mnt / "after").write_bytes(b"k" * 200_000)
        (mnt / "afterdir").mkdir()
    e2fsck_clean(image)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_files_built_by_hand(tmp_path: Path, variant: str) -> None:
    image = make_image(tmp_path / "fs.img", 24, *VARIANTS[variant])
    free_blocks, free_inodes = dumpe2fs_counts(image)
    stack = open_stack(image)
    files = {}
    try:
        sizes = [1, 12] if variant == "ext2-blockmap" else [1, 12, 300]
        inos = {}
        for i, nblocks in enumerate(sizes):
            goal = stack.sb.blocks_count // 2 if i == 1 else 0
            ino, content = _add_file(stack, 2, goal, nblocks)
            inos[f"f{i}"] = ino
            files[f"f{i}"] = content
        stack.writer.commit(durable=True)
    finally:
        stack.close()
    for name, ino in inos.items():
        debugfs_write(image, f"link <{ino}> /{name}")
    e2fsck_clean(image)
    assert dumpe2fs_counts(image) == (free_blocks - sum(sizes), free_inodes - len(sizes))
    _check_kernel(image, tmp_path, files)


UNINIT_VARIANTS = {
    "1k-csum": (64, ["-b", "1024"]),
    "1k-gdt_csum-32bit": (64, ["-b", "1024", "-O", "^metadata_csum,uninit_bg,^64bit"]),
    "4k-csum-noflex": (96, ["-b", "4096", "-g", "4096", "-O", "^flex_bg"]),
}


@pytest.mark.parametrize("variant", sorted(UNINIT_VARIANTS))
def test_uninit_groups_initialised(tmp_path: Path, variant: str) -> None:
    """Groups mkfs left BLOCK_UNINIT/INODE_UNINIT (and an inode table never zeroed)."""
    size_mb, args = UNINIT_VARIANTS[variant]
    image = make_image(
        tmp_path / "fs.img", size_mb, "-t", "ext4", *args, "-E", "lazy_itable_init=1,nodiscard"
    )
    flags = group_flags(image)
    group = next(g for g, f in flags.items() if {"INODE_UNINIT", "BLOCK_UNINIT"} <= f and g > 1)
    assert "ITABLE_ZEROED" not in flags[group]
    stack = open_stack(image)
    ipg = stack.sb.inodes_per_group
    desc = stack.writer.group_desc(group)
    # Garbage in the never-zeroed table: allowed while the group is uninitialised.
    itable_bytes = ipg * stack.sb.inode_size
    stack.dev.pwrite(desc.inode_table * stack.sb.block_size, b"\xa5" * itable_bytes)
    stack.close()
    e2fsck_clean(image)

    stack = open_stack(image)
    files = {}
    try:
        goal = group_first_block(stack.sb, group) + 100
        inos = []
        for i in range(3):
            ino, content = _add_file(stack, group * ipg + 1, goal, 5 + i)
            assert (ino - 1) // ipg == group
            inos.append(ino)
            files[f"u{i}"] = content
        stack.writer.commit(durable=True)
    finally:
        stack.close()
    for i, ino in enumerate(inos):
        debugfs_write(image, f"link <{ino}> /u{i}")
    e2fsck_clean(image)
    after = group_flags(image)[group]
    assert "INODE_UNINIT" not in after and "BLOCK_UNINIT" not in after
    _check_kernel(image, tmp_path, files)


class RecordingDevice(BlockDevice):
    """The real device, remembering the order of writes (offset, length)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        super().__init__(fd, writable=True)
        self.writes: list[tuple[int, int]] = []

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writes.append((offset, len(data)))
        super().pwrite(offset, data)


@pytest.mark.parametrize("block_size", [1024, 4096])
def test_fill_to_nospace_then_delete(tmp_path: Path, block_size: int) -> None:
    image = make_image(tmp_path / "fs.img", 8, "-t", "ext4", "-b", str(block_size))
    stack = open_stack(image)
    r_blocks = stack.sb.r_blocks_count
    assert r_blocks > 0
    files: list[tuple[int, list[tuple[int, int, int]]]] = []
    try:
        for reserve_ok in (False, True):
            while True:
                runs: list[tuple[int, int, int]] = []
                try:
                    # First as an ordinary user: the reserved blocks and the
                    # kernel's own reserve stay free; then taking everything.
                    with acting_as(Caller(1000, 1000)):
                        while len(runs) < 4:
                            lblk = sum(n for _, n, _ in runs)
                            pblk, n = stack.blocks.alloc(0, 1 << 15, reserve_ok=reserve_ok)
                            runs.append((lblk, n, pblk))
                except NoSpace:
                    pass
                if runs:
                    ino = stack.inodes.alloc(2, False)
                    total = sum(n for _, n, _ in runs)
                    regular_file(stack, ino, total * block_size, runs)
                    files.append((ino, runs))
                if len(runs) < 4:
                    break
            if not reserve_ok:
                assert stack.blocks.free_blocks == r_blocks + kernel_reserve_blocks(stack.sb)
        assert stack.blocks.free_blocks == 0
        with pytest.raises(NoSpace):
            stack.blocks.alloc(0, 1, reserve_ok=True)
        stack.writer.commit(durable=True)
    finally:
        stack.close()
    for index, (ino, _) in enumerate(files):
        debugfs_write(image, f"link <{ino}> /fill{index}")
    e2fsck_clean(image)
    assert dumpe2fs_counts(image)[0] == 0

    # Delete the first file: unlink the name, then clear the inode and free.
    victim, victim_runs = files[0]
    debugfs_write(image, "unlink /fill0")
    dev = RecordingDevice(image)
    stack = open_stack(image, dev)
    try:
        inode = stack.table.read(victim)
        stack.table.write(dataclasses.replace(inode, links_count=0, dtime=int(time.time())))
        for _, n, pblk in victim_runs:
            stack.blocks.free(pblk, n)
        stack.inodes.free(victim, was_dir=False)
        with pytest.raises(NoSpace):  # freed blocks are not reused before commit
            stack.blocks.alloc(victim_runs[0][2], 1, reserve_ok=True)
        itable_block, _ = stack.table.locate(victim)
        group = (victim_runs[0][2] - stack.sb.first_data_block) // stack.sb.blocks_per_group
        bitmap_block = stack.writer.group_desc(group).block_bitmap
        dev.writes.clear()
        stats = stack.writer.commit(durable=True)
        assert stats.releases == len(victim_runs) + 1
        order = [offset // block_size for offset, _ in dev.writes]
        assert order.index(itable_block) < order.index(bitmap_block)
    finally:
        stack.close()
    e2fsck_clean(image)
    freed = sum(n for _, n, _ in victim_runs)
    assert dumpe2fs_counts(image)[0] == freed


def test_deferred_free_reused_only_after_commit(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img", 16, "-t", "ext4", "-b", "1024")
    stack = open_stack(image)
    try:
        pblk, n = stack.blocks.alloc(5000, 8)
        stack.writer.commit()
        stack.blocks.free(pblk, n)
        assert stack.blocks.pending_free_blocks == n
        with pytest.raises(Corrupt):
            stack.blocks.free(pblk, 1)  # a second free of a pending block
        again, _ = stack.blocks.alloc(pblk, 8)
        assert not pblk <= again < pblk + n
        stack.blocks.free(again, 8)
        stack.writer.commit()
        assert stack.blocks.pending_free_blocks == 0
        assert stack.blocks.alloc(pblk, 8) == (pblk, 8)
        stack.blocks.free(pblk, 8)
        # Group metadata can never be freed (or allocated).
        with pytest.raises(Corrupt):
            stack.blocks.free(stack.writer.group_desc(0).inode_table, 1)
        stack.writer.commit(durable=True)
    finally:
        stack.close()
    e2fsck_clean(image)


def test_inodes_run_out(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img", 8, "-t", "ext4", "-N", "64")
    stack = open_stack(image)
    inos = []
    try:
        while True:
            try:
                ino = stack.inodes.alloc(2, False)
            except NoSpace:
                break
            assert ino >= stack.sb.first_ino
            regular_file(stack, ino, 0, [])
            inos.append(ino)
        assert (
            len(inos)
            == len(set(inos))
            == stack.sb.inodes_count
            - stack.sb.first_ino
            + 1
            - (stack.sb.inodes_count - stack.sb.free_inodes_count - (stack.sb.first_ino - 1))
        )
        stack.writer.commit(durable=True)
    finally:
        stack.close()
    script = tmp_path / "links"
    script.write_text("".join(f"link <{ino}> /e{ino}\n" for ino in inos))
    assert run(["debugfs", "-w", "-f", str(script), str(image)]).returncode == 0
    e2fsck_clean(image)
    assert dumpe2fs_counts(image)[1] == 0


def test_directories_spread_files_stay_near_parent(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img", 64, "-t", "ext4", "-b", "1024")
    stack = open_stack(image)
    try:
        ipg = stack.sb.inodes_per_group
        groups = {(stack.inodes.alloc(2, True) - 1) // ipg for _ in range(8)}
        assert len(groups) >= 4  # top-level directories go to different groups
        for group in (3, 5):
            ino = stack.inodes.alloc(group * ipg + 1, False)
            assert (ino - 1) // ipg == group
        # Goal-directed blocks land in the goal's group, outside its metadata.
        for group in range(stack.writer.group_count):
            goal = group_first_block(stack.sb, group) + blocks_in_group(stack.sb, group) // 2
            pblk, _ = stack.blocks.alloc(goal, 4)
            assert (pblk - stack.sb.first_data_block) // stack.sb.blocks_per_group == group
            for offset, length in stack.blocks.metadata_runs(group):
                start = group_first_block(stack.sb, group) + offset
                assert not start <= pblk < start + length
        # Nothing committed: the image is untouched.
    finally:
        stack.close()
    e2fsck_clean(image)
