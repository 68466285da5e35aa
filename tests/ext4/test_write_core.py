"""Encoders against images made by mkfs.ext4 and the kernel: parse -> encode -> same bytes;
bitmap search against a plain model."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import stat
import subprocess
from pathlib import Path

import pytest
from helpers_debugfs import make_image

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format import bitmap as B
from ext4box.ext4.format import features as F
from ext4box.ext4.format.group_desc import (
    GroupDesc,
    GroupTable,
    descriptor_block,
    encode_group_desc,
    gdt_block_count,
)
from ext4box.ext4.format.inode import Inode, encode_inode
from ext4box.ext4.format.superblock import Superblock, encode_superblock
from support.kernel import kernel_mount, why_no_kernel_mounts

VARIANTS = {
    "ext4-4k-64bit-csum": ["-t", "ext4", "-b", "4096"],
    "ext4-1k": ["-t", "ext4", "-b", "1024"],
    "ext4-gdt_csum-32bit": ["-t", "ext4", "-O", "^metadata_csum,uninit_bg,^64bit"],
    "ext4-nocsum-64bit": ["-t", "ext4", "-O", "^metadata_csum,^uninit_bg,64bit"],
    "ext4-meta_bg": ["-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"],
    "ext3": ["-t", "ext3"],
    "ext2-128": ["-t", "ext2", "-I", "128"],
}


def _tree(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "file").write_bytes(b"x" * 70000)
    (root / "empty").write_bytes(b"")
    (root / "fast").symlink_to("dir/file")
    (root / "slow").symlink_to("d/" * 40 + "target")
    os.mkfifo(root / "fifo")
    os.mknod(root / "chr", stat.S_IFCHR | 0o640, os.makedev(4, 65))
    os.mknod(root / "blk", stat.S_IFBLK | 0o600, os.makedev(259, 70000))
    odd = root / "odd"
    odd.write_bytes(b"y")
    os.chmod(odd, 0o4755)
    os.chown(odd, 4_000_000_000, 70000)
    # Before 1970 and after 2038 (the extra epoch bits).
    os.utime(odd, ns=(-1_000_000_000 * 86400 * 365 + 123, 4_102_444_800_000_000_789))
    old = root / "old"
    old.write_bytes(b"z" * 3000)
    os.utime(old, ns=(-(2**31) * 1_000_000_000, 2**33 * 1_000_000_000 + 5))
    sparse = root / "sparse"
    with sparse.open("wb") as f:
        f.truncate(1 << 30)
        f.seek(1 << 29)
        f.write(b"data")
    os.setxattr(root / "dir" / "file", "user.note", b"v" * 40)


def _open(image: Path) -> tuple[BlockDevice, Superblock]:
    dev = BlockDevice.open(str(image))
    return dev, Superblock.parse(dev.pread(1024, 1024))


def _in_use_inodes(dev: BlockDevice, sb: Superblock):  # -> Iterator[tuple[int, bytes]]
    read = lambda b: dev.pread(b * sb.block_size, sb.block_size)  # noqa: E731
    groups = GroupTable(sb, read)
    for group in range(sb.group_count):
        desc = groups[group]
        bitmap = read(desc.inode_bitmap)
        for index in range(sb.inodes_per_group):
            if not bitmap[index // 8] >> (index % 8) & 1:
                continue
            offset = index * sb.inode_size
            block = read(desc.inode_table + offset // sb.block_size)
            start = offset % sb.block_size
            yield group * sb.inodes_per_group + index + 1, block[start : start + sb.inode_size]


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root for device nodes and chown")
    root = tmp_path_factory.mktemp("tree")
    _tree(root)
    return root


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoders_round_trip_mkfs_images(tmp_path: Path, variant: str, source_tree: Path) -> None:
    image = make_image(tmp_path / "fs.img", 48, *VARIANTS[variant], root_dir=source_tree)
    dev, sb = _open(image)
    try:
        # Superblock: unchanged fields give the same bytes.
        assert encode_superblock(sb, {}) == sb.raw
        # Every descriptor.
        read = lambda b: dev.pread(b * sb.block_size, sb.block_size)  # noqa: E731
        per_block = sb.block_size // sb.desc_size
        for index in range(gdt_block_count(sb)):
            block = read(descriptor_block(sb, index))
            for slot in range(per_block):
                group = index * per_block + slot
                if group >= sb.group_count:
                    break
                raw = block[slot * sb.desc_size : (slot + 1) * sb.desc_size]
                desc = GroupDesc.parse(raw, group, sb.desc_size)
                assert encode_group_desc(desc, sb, raw) == raw, group
        # Every in-use inode.
        huge = sb.has_ro_compat(F.RO_COMPAT_HUGE_FILE)
        count = 0
        for ino, raw in _in_use_inodes(dev, sb):
            inode = Inode.parse(
                raw, ino, fs_csum_seed=sb.csum_seed, huge_file=huge, block_size=sb.block_size
            )
            encoded = encode_inode(
                inode, fs_csum_seed=sb.csum_seed, huge_file=huge, block_size=sb.block_size
            )
            assert encoded == raw, ino
            count += 1
        assert count >= 20
    finally:
        dev.close()


@pytest.mark.skipif(why_no_kernel_mounts() is not None, reason=str(why_no_kernel_mounts()))
@pytest.mark.parametrize("inode_size", [128, 256])
def test_inode_round_trip_kernel_written(tmp_path: Path, inode_size: int) -> None:
    """Inodes the kernel wrote (nanosecond times, xattrs in the inode, a journal)."""
    image = make_image(tmp_path / "fs.img", 32, "-t", "ext4", "-I", str(inode_size))
    with kernel_mount(image, tmp_path / "mnt", readonly=False) as mnt:
        (mnt / "a").write_bytes(os.urandom(100_000))
        (mnt / "d").mkdir()
        os.symlink("a" * 100, mnt / "d" / "long")
        os.utime(mnt / "a", ns=(2_000_000_000_123_456_789, -86400 * 1_000_000_000 + 1))
        os.setxattr(mnt / "a", "user.x", b"1" * 20)
    dev, sb = _open(image)
    try:
        huge = sb.has_ro_compat(F.RO_COMPAT_HUGE_FILE)
        for ino, raw in _in_use_inodes(dev, sb):
            inode = Inode.parse(
                raw, ino, fs_csum_seed=sb.csum_seed, huge_file=huge, block_size=sb.block_size
            )
            encoded = encode_inode(
                inode, fs_csum_seed=sb.csum_seed, huge_file=huge, block_size=sb.block_size
            )
            assert encoded == raw, ino
    finally:
        dev.close()


def test_inode_changes_read_by_debugfs(tmp_path: Path, source_tree: Path) -> None:
    """Changed fields land where debugfs reads them; the checksum stays valid."""
    image = make_image(tmp_path / "fs.img", 32, "-t", "ext4", root_dir=source_tree)
    info = subprocess.run(
        ["debugfs", "-R", "stat /old", str(image)], capture_output=True, text=True, check=True
    )
    assert "Inode checksum" in info.stdout
    from write_support import e2fsck_clean, open_stack

    stack = open_stack(image)
    try:
        ino = int(
            subprocess.run(
                ["debugfs", "-R", "stat /old", str(image)], capture_output=True, text=True
            ).stdout.split()[1]
        )
        inode = stack.table.read(ino)
        changed = dataclasses.replace(
            inode,
            uid=2_000_000_000,
            gid=65536 + 7,
            mode=stat.S_IFREG | 0o600,
            mtime_ns=-5_000_000_000 - 250,  # 1969, with nanoseconds
            atime_ns=15_000_000_000 * 1_000_000_000 + 999_999_999,  # 2445
        )
        stack.table.write(changed)
        stack.writer.commit(durable=True)
        assert stack.table.read(ino) == dataclasses.replace(changed, raw=stack.table.read_raw(ino))
    finally:
        stack.close()
    text = subprocess.run(
        ["debugfs", "-R", "stat /old", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert "User: 2000000000" in text and "Group: 65543" in text
    assert "Mode:  0600" in text
    assert "Inode checksum: 0x" in text
    e2fsck_clean(image)
    if why_no_kernel_mounts() is None:
        with kernel_mount(image, tmp_path / "mnt") as mnt:
            st = os.stat(mnt / "old")
            assert (st.st_uid, st.st_gid) == (2_000_000_000, 65543)
            assert st.st_mtime_ns == -5_000_000_000 - 250
            assert st.st_atime_ns == 15_000_000_000 * 1_000_000_000 + 999_999_999


def test_superblock_changes_read_by_dumpe2fs(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img", 16, "-t", "ext4")
    dev, sb = _open(image)
    try:
        raw = encode_superblock(sb, {"mnt_count": 7, "wtime": 2_000_000_000, "state": 1})
        again = Superblock.parse(raw)
        assert again.fields["mnt_count"] == 7
        # Past 2106 the value spreads into s_wtime_hi (offset 0x274), which
        # dumpe2fs 1.47.0 does not print; check the documented offsets instead.
        late = encode_superblock(sb, {"wtime": 2**33 + 1})
        assert late[0x30:0x34] == (1).to_bytes(4, "little") and late[0x274] == 2
    finally:
        dev.close()
    with image.open("r+b") as f:
        f.seek(1024)
        f.write(raw)
    text = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    assert "Mount count:              7" in text
    assert re.search(r"Last write time:.*2033", text)
    assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0


# ---- bitmaps against a plain model ------------------------------------


def _model_runs(bits: list[int], lo: int, hi: int) -> list[tuple[int, int]]:
    runs = []
    i = lo
    while i < hi:
        if bits[i]:
            i += 1
            continue
        j = i
        while j < hi and not bits[j]:
            j += 1
        runs.append((i, j - i))
        i = j
    return runs


@pytest.mark.parametrize("seed", range(30))
def test_bitmap_search_matches_model(seed: int) -> None:
    rng = random.Random(seed)
    nbits = rng.choice([8, 100, 1024, 8192, 32768])
    density = rng.random()
    bits = [1 if rng.random() < density else 0 for _ in range(nbits)]
    raw = bytearray((nbits + 7) // 8 + rng.randrange(3))
    for i, bit in enumerate(bits):
        if bit:
            B.set_range(raw, i, 1)
    # Padding bits past nbits must never be seen.
    if len(raw) * 8 > nbits:
        B.mark_padding(raw, nbits) if rng.random() < 0.5 else None
    goal = rng.randrange(nbits)
    want = rng.choice([1, 2, 7, 64, 5000])
    zeros = [i for i in range(nbits) if not bits[i]]
    first = next((i for i in zeros if i >= goal), zeros[0] if zeros else None)
    assert B.find_first_zero(raw, nbits, goal) == first
    assert B.count_zeros(raw, nbits) == len(zeros)
    runs = _model_runs(bits, goal, nbits) + _model_runs(bits, 0, goal)
    expected = next(((s, want) for s, n in runs if n >= want), None)
    if expected is None and runs:
        longest = max(n for _, n in runs)
        expected = next((s, n) for s, n in runs if n == longest)
    assert B.find_zero_run(raw, nbits, goal, want) == expected


def test_bitmap_ranges_and_bounds() -> None:
    raw = bytearray(4)
    B.set_range(raw, 3, 17, 30)
    assert B.range_is_set(raw, 3, 17) and B.range_is_clear(raw, 0, 3)
    assert B.range_is_clear(raw, 20, 10)
    B.clear_range(raw, 5, 2, 30)
    assert not B.range_is_set(raw, 3, 17) and B.range_is_clear(raw, 5, 2)
    with pytest.raises(ValueError):
        B.set_range(raw, 25, 6, 30)
    with pytest.raises(ValueError):
        B.clear_range(raw, -1, 2)
    B.mark_padding(raw, 30)
    assert raw[3] & 0xC0 == 0xC0
