"""Superblock, group descriptors and inodes against dumpe2fs and the kernel's stat."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Corrupt, NotExt4, Unsupported
from ext4box.ext4.format.group_desc import GroupTable
from ext4box.ext4.format.inode import Inode
from ext4box.ext4.format.superblock import Superblock
from ext4box.ext4.opening import open_filesystem
from support.kernel import kernel_mount, why_no_kernel_mounts

VARIANTS = {
    "ext4-4k": ["-t", "ext4", "-b", "4096"],
    "ext4-1k": ["-t", "ext4", "-b", "1024"],
    "ext4-nocsum-32bit": ["-t", "ext4", "-O", "^metadata_csum,^64bit"],
    "ext4-meta_bg": ["-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"],
    "ext4-sparse_super2": ["-t", "ext4", "-O", "sparse_super2"],
    "ext4-noflex": ["-t", "ext4", "-O", "^flex_bg"],
    "ext3": ["-t", "ext3"],
    "ext2-128": ["-t", "ext2", "-I", "128"],
}


def _mkfs(tmp: Path, name: str, args: list[str], tree: Path | None = None, mb: int = 48) -> Path:
    image = tmp / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(mb << 20)
    cmd = ["mkfs.ext4", "-q", "-F", *args]
    if tree is not None:
        cmd += ["-d", str(tree)]
    subprocess.run([*cmd, str(image)], check=True, capture_output=True)
    return image


def _dumpe2fs(image: Path) -> str:
    return subprocess.run(
        ["dumpe2fs", str(image)], check=True, capture_output=True, text=True
    ).stdout


def _header_value(text: str, key: str) -> str:
    match = re.search(rf"^{re.escape(key)}:\s*(.*)$", text, re.M)
    assert match, f"{key} not in dumpe2fs output"
    return match.group(1).strip()


def _open(image: Path) -> tuple[BlockDevice, Superblock]:
    dev = BlockDevice.open(str(image))
    return dev, Superblock.parse(dev.pread(1024, 1024))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_superblock_and_groups_match_dumpe2fs(tmp_path: Path, variant: str) -> None:
    image = _mkfs(tmp_path, variant, VARIANTS[variant])
    text = _dumpe2fs(image)
    dev, sb = _open(image)
    try:
        assert sb.inodes_count == int(_header_value(text, "Inode count"))
        assert sb.blocks_count == int(_header_value(text, "Block count"))
        assert sb.free_blocks_count == int(_header_value(text, "Free blocks"))
        assert sb.free_inodes_count == int(_header_value(text, "Free inodes"))
        assert sb.block_size == int(_header_value(text, "Block size"))
        assert sb.inodes_per_group == int(_header_value(text, "Inodes per group"))
        assert sb.inode_size == int(_header_value(text, "Inode size"))
        assert sb.first_data_block == int(_header_value(text, "First block"))
        uuid = _header_value(text, "Filesystem UUID").replace("-", "")
        assert sb.uuid.hex() == uuid
        features = set(_header_value(text, "Filesystem features").split())
        assert set(sb.feature_names()) == features

        groups = GroupTable(sb, lambda b: dev.pread(b * sb.block_size, sb.block_size))
        reported = re.findall(
            r"^Group (\d+):.*?\n.*?Block bitmap at (\d+).*?Inode bitmap at (\d+)"
            r".*?Inode table at (\d+)-\d+.*?\n\s+(\d+) free (?:blocks|clusters), (\d+) free inodes,"
            r" (\d+) directories",
            text,
            re.M | re.S,
        )
        assert len(reported) == sb.group_count == len(groups)
        for group, bb, ib, it, fb, fi, dirs in reported:
            desc = groups[int(group)]
            assert (desc.block_bitmap, desc.inode_bitmap, desc.inode_table) == (
                int(bb),
                int(ib),
                int(it),
            )
            assert (desc.free_blocks_count, desc.free_inodes_count, desc.used_dirs_count) == (
                int(fb),
                int(fi),
                int(dirs),
            )
        for group in range(sb.group_count):
            has_backup = re.search(
                rf"^Group {group}:.*?\n\s+(Primary|Backup) superblock", text, re.M
            )
            assert sb.group_has_super(group) == bool(has_backup), group
    finally:
        dev.close()


def _make_tree(root: Path) -> None:
    (root / "dir").mkdir()
    (root / "dir" / "file").write_bytes(b"x" * 5000)
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("dir/file")
    os.mkfifo(root / "fifo")
    os.mknod(root / "chr", stat.S_IFCHR | 0o640, os.makedev(4, 65))
    os.mknod(root / "blk", stat.S_IFBLK | 0o600, os.makedev(259, 70000))
    odd = root / "odd"
    odd.write_bytes(b"y")
    os.chmod(odd, 0o4755)
    os.chown(odd, 4_000_000_000, 65534)
    os.utime(odd, ns=(-1_000_000_000 * 86400 * 365 + 123, 4_102_444_800_000_000_789))


@pytest.mark.skipif(why_no_kernel_mounts() is not None, reason=str(why_no_kernel_mounts()))
@pytest.mark.parametrize("variant", ["ext4-4k", "ext4-1k", "ext3", "ext2-128"])
def test_inodes_match_kernel_stat(tmp_path: Path, variant: str) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    _make_tree(tree)
    image = _mkfs(tmp_path, variant, VARIANTS[variant], tree)
    dev, sb = _open(image)
    groups = GroupTable(sb, lambda b: dev.pread(b * sb.block_size, sb.block_size))
    csum_seed = sb.csum_seed
    checked = 0
    try:
        with kernel_mount(image, tmp_path / "mnt") as mnt:
            for dirpath, dirnames, filenames in os.walk(mnt):
                for name in [*dirnames, *filenames, "."]:
                    st = os.lstat(os.path.join(dirpath, name))
                    ino = st.st_ino
                    group, index = divmod(ino - 1, sb.inodes_per_group)
                    offset = groups[group].inode_table * sb.block_size + index * sb.inode_size
                    inode = Inode.parse(
                        dev.pread(offset, sb.inode_size),
                        ino,
                        fs_csum_seed=csum_seed,
                        huge_file=sb.has_ro_compat(0x8),
                        block_size=sb.block_size,
                    )
                    assert (inode.mode, inode.uid, inode.gid) == (st.st_mode, st.st_uid, st.st_gid)
                    assert (inode.size, inode.links_count) == (st.st_size, st.st_nlink)
                    assert inode.blocks_512 == st.st_blocks
                    assert inode.rdev == st.st_rdev
                    if sb.inode_size > 128:
                        # 128-byte inodes keep only whole seconds, the kernel too.
                        assert (inode.mtime_ns, inode.ctime_ns, inode.atime_ns) == (
                            st.st_mtime_ns,
                            st.st_ctime_ns,
                            st.st_atime_ns,
                        )
                    else:
                        assert inode.mtime_ns == st.st_mtime_ns
                    checked += 1
    finally:
        dev.close()
    assert checked >= 9


def test_inode_checksum_detects_flipped_byte(tmp_path: Path) -> None:
    image = _mkfs(tmp_path, "csum", VARIANTS["ext4-4k"])
    dev, sb = _open(image)
    try:
        groups = GroupTable(sb, lambda b: dev.pread(b * sb.block_size, sb.block_size))
        offset = groups[0].inode_table * sb.block_size + 1 * sb.inode_size  # inode 2, root
        raw = bytearray(dev.pread(offset, sb.inode_size))
        Inode.parse(bytes(raw), 2, fs_csum_seed=sb.csum_seed, huge_file=True, block_size=4096)
        raw[0x20] ^= 0x01  # i_flags
        with pytest.raises(Corrupt, match=r"inode 2.*checksum"):
            Inode.parse(bytes(raw), 2, fs_csum_seed=sb.csum_seed, huge_file=True, block_size=4096)
    finally:
        dev.close()


def test_superblock_rejections(tmp_path: Path) -> None:
    image = _mkfs(tmp_path, "sb", VARIANTS["ext4-4k"])
    raw = image.read_bytes()[1024:2048]
    Superblock.parse(raw)

    flipped = bytearray(raw)
    flipped[0x18] ^= 0x10  # log_block_size, also breaks the checksum
    with pytest.raises(Corrupt, match=r"superblock.*checksum"):
        Superblock.parse(bytes(flipped))

    with pytest.raises(NotExt4):
        Superblock.parse(bytes(1024))

    journal_dev = bytearray(raw)
    journal_dev[0x60] |= 0x08
    nocsum = bytearray(journal_dev)
    nocsum[0x64] &= ~0x04  # clear metadata_csum (ro_compat bit 0x400 is in byte 0x65)
    nocsum[0x65] &= ~0x04
    with pytest.raises(Unsupported, match="journal_dev"):
        Superblock.parse(bytes(nocsum))


def test_unknown_incompat_feature_is_named(tmp_path: Path) -> None:

    image = _mkfs(tmp_path, "inc", ["-t", "ext4", "-O", "^metadata_csum"])
    with open(image, "r+b") as f:
        f.seek(1024 + 0x60)
        incompat = int.from_bytes(f.read(4), "little") | 0x1000 | 0x80000000
        f.seek(1024 + 0x60)
        f.write(incompat.to_bytes(4, "little"))
    dev = BlockDevice.open(str(image))
    try:
        with pytest.raises(Unsupported, match="dirdata, unknown_0x80000000"):
            open_filesystem(dev)
    finally:
        dev.close()
