"""Crafted EA-inode attacks: xattr blocks whose entries name huge value inodes.

The image comes from mkfs.ext4 -O ea_inode -d (1 KiB blocks, no
metadata_csum). Its "payload" files are turned into EA inodes by debugfs
(EA_INODE flag, i_size of 16 MiB: a sparse tail), and a victim's xattr block
is rewritten to hold 48 entries naming them. Found by reading the xattr
code: every entry's value was read on its own, so one 1 KiB block naming a
single 16 MiB EA inode 48 times made a listxattr allocate 800 MB.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from hostile.crafted import GOOD_CONTENT, GOOD_FILE, debugfs_write, inode_number, poke
from support import images

BLOCK_SIZE = 1024
EA_VALUE_SIZE = 1 << 24  # the largest value ext4 allows (EXT4_XATTR_SIZE_MAX)
ENTRIES = 48  # as many 3-letter entries as a 1 KiB block holds
PAYLOADS = ("payload/p0", "payload/p1")
SHARED_VICTIM = "victims/ea-one-inode-many-times"  # every entry names p0
DISTINCT_VICTIM = "victims/ea-inodes-past-the-budget"  # entries alternate p0, p1
_FL_EA_INODE = 0x200000
_FL_EXTENTS = 0x80000
_XATTR_HEADER = struct.Struct("<IIIII12x")
_XATTR_ENTRY = struct.Struct("<BBHIII")


def entry_name(i: int) -> str:
    return f"user.b{i:02d}"


def build_ea_tree(root: Path) -> None:
    (root / "ok").mkdir(parents=True)
    (root / GOOD_FILE).write_bytes(GOOD_CONTENT)
    (root / "payload").mkdir()
    for rel in PAYLOADS:
        (root / rel).write_bytes(b"P" * 60_000)
    (root / "victims").mkdir()
    for rel in (SHARED_VICTIM, DISTINCT_VICTIM):
        (root / rel).write_bytes(b"ea victim\n")
        os.setxattr(root / rel, "user.seed", b"s" * 600)  # gives it an xattr block


def build_ea_image(image: Path, tree: Path) -> None:
    images.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-O",
                "ea_inode,^metadata_csum", "-E", "root_owner=0:0", "-d", str(tree), str(image),
                "4M"])


def _xattr_block(value_inums: list[int]) -> bytes:
    block = bytearray(BLOCK_SIZE)
    _XATTR_HEADER.pack_into(block, 0, 0xEA020000, 1, 1, 0, 0)
    pos = _XATTR_HEADER.size
    for i, inum in enumerate(value_inums):
        name = entry_name(i).removeprefix("user.").encode()
        _XATTR_ENTRY.pack_into(block, pos, len(name), 1, 0, inum, EA_VALUE_SIZE, 0)
        block[pos + _XATTR_ENTRY.size:pos + _XATTR_ENTRY.size + len(name)] = name
        pos += (_XATTR_ENTRY.size + len(name) + 3) & ~3
    assert pos + 4 <= BLOCK_SIZE
    return bytes(block)


def ea_inodes_of_16_mib(image: Path) -> None:
    """Both victims' xattr blocks name 16 MiB EA inodes, 48 times each."""
    for rel in PAYLOADS:
        debugfs_write(image, f'sif "/{rel}" flags {_FL_EA_INODE | _FL_EXTENTS:#x}',
                      f'sif "/{rel}" size {EA_VALUE_SIZE}')
    p0, p1 = (inode_number(image, rel) for rel in PAYLOADS)
    for rel, inums in ((SHARED_VICTIM, [p0] * ENTRIES),
                       (DISTINCT_VICTIM, [(p0, p1)[i % 2] for i in range(ENTRIES)])):
        block = images.xattr_block_of(image, rel)
        poke(image, block * BLOCK_SIZE, _xattr_block(inums))
