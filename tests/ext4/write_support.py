"""Helpers for write-core tests: open the write stack on an image, build files by hand."""

from __future__ import annotations

import dataclasses
import re
import stat
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ext4box.blockdev import BlockDevice, MetadataCache
from ext4box.ext4.format.group_desc import GroupTable
from ext4box.ext4.format.inode import FL_EXTENTS, Inode
from ext4box.ext4.format.superblock import Superblock
from ext4box.ext4.write.alloc import BlockAllocator
from ext4box.ext4.write.inode_alloc import InodeAllocator
from ext4box.ext4.write.inode_table import InodeTable
from ext4box.ext4.write.metawriter import MetadataWriter

EXTENT_MAGIC = 0xF30A


@dataclass
class WriteStack:
    dev: BlockDevice
    sb: Superblock
    writer: MetadataWriter
    table: InodeTable
    blocks: BlockAllocator
    inodes: InodeAllocator

    def close(self) -> None:
        self.dev.close()


def open_stack(image: Path, dev: BlockDevice | None = None) -> WriteStack:
    dev = dev or BlockDevice.open(str(image), writable=True)
    sb = Superblock.parse(dev.pread(1024, 1024))
    cache = MetadataCache(dev, sb.block_size, 256)
    groups = GroupTable(sb, cache.read)
    writer = MetadataWriter(dev, cache, sb, groups)
    table = InodeTable(writer)
    blocks = BlockAllocator(writer)
    inodes = InodeAllocator(writer, blocks, table)
    return WriteStack(dev, sb, writer, table, blocks, inodes)


def extent_root(runs: list[tuple[int, int, int]]) -> bytes:
    """A depth-0 extent tree root in i_block for (lblk, length, pblk) runs (at most 4)."""
    assert len(runs) <= 4
    out = struct.pack("<HHHHI", EXTENT_MAGIC, len(runs), 4, 0, 0)
    for lblk, length, pblk in runs:
        out += struct.pack("<IHHI", lblk, length, pblk >> 32, pblk & 0xFFFFFFFF)
    return out.ljust(60, b"\0")


def direct_block_map(blocks: list[int]) -> bytes:
    assert len(blocks) <= 12
    return struct.pack(f"<{len(blocks)}I", *blocks).ljust(60, b"\0")


def regular_file(
    stack: WriteStack,
    ino: int,
    size: int,
    runs: list[tuple[int, int, int]],
    *,
    extents: bool = True,
) -> Inode:
    """Fill a blank inode as a regular file owning `runs` and write it."""
    now = time.time_ns()
    nblocks = sum(length for _, length, _ in runs)
    if extents:
        i_block, flags = extent_root(runs), FL_EXTENTS
    else:
        flat = [pblk + i for _, length, pblk in runs for i in range(length)]
        i_block, flags = direct_block_map(flat), 0
    inode = dataclasses.replace(
        stack.table.blank(ino),
        mode=stat.S_IFREG | 0o644,
        uid=1000,
        gid=1000,
        size=size,
        links_count=1,
        atime_ns=now,
        mtime_ns=now,
        ctime_ns=now,
        crtime_ns=now,
        blocks_512=nblocks * stack.sb.block_size // 512,
        flags=flags,
        i_block=i_block,
    )
    return stack.table.write(inode)


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def e2fsck_clean(image: Path) -> None:
    result = run(["e2fsck", "-fn", str(image)])
    assert result.returncode == 0, result.stdout + result.stderr


def debugfs_write(image: Path, request: str) -> None:
    result = run(["debugfs", "-w", "-R", request, str(image)])
    assert result.returncode == 0 and "rror" not in result.stderr, result.stderr


def group_flags(image: Path) -> dict[int, set[str]]:
    """dumpe2fs's [FLAGS] per group."""
    text = run(["dumpe2fs", str(image)]).stdout
    flags = {}
    for match in re.finditer(
        r"^Group (\d+): \(Blocks [^)]*\)(?: csum 0x[0-9a-f]+)?(?: \[([^]]*)\])?", text, re.M
    ):
        flags[int(match[1])] = set(filter(None, (match[2] or "").split(", ")))
    return flags


def dumpe2fs_counts(image: Path) -> tuple[int, int]:
    """(free blocks, free inodes) from the superblock as dumpe2fs reports them."""
    text = run(["dumpe2fs", "-h", str(image)]).stdout
    blocks = int(re.search(r"^Free blocks:\s+(\d+)", text, re.M)[1])  # type: ignore[index]
    inodes = int(re.search(r"^Free inodes:\s+(\d+)", text, re.M)[1])  # type: ignore[index]
    return blocks, inodes
