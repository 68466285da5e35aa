"""Crafted attacks: each a small function that damages one thing in a real image.

Images come from mkfs.ext4 -d; every edit is located with debugfs (`ex`,
`blocks`, `stat`, `imap`) and made either by debugfs itself (inode and
superblock fields: it recomputes their checksums) or as a raw byte write at
the located offset. The images have no metadata_csum, so a raw edit reaches
the parser instead of stopping at the checksum gate (the fuzzer covers the
re-sealed checksum case). Nothing binary is stored in git.

`ATTACKS` maps each attack's name to the function that applies it; the
tests in test_hostile.py serve the damaged images and check what a user sees.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from support import images

BLOCK_SIZE = 1024
GOOD_FILE = "ok/good.txt"
GOOD_CONTENT = b"this file is never damaged\n" * 40
SPARSE_ISLANDS = 10  # one-block islands: more extents than the inode holds -> a leaf block
SYMLINK_HOPS = 10_000
CHAIN_DIR = "chain"

EXTENT_VICTIMS = ("ext-loop", "ext-overlap", "ext-deep", "ext-past-device", "ext-at-superblock",
                  "ext-at-gdt")


def chain_name(hop: int) -> str:
    return f"l{hop:05d}"


def build_main_tree(root: Path) -> None:
    """The tree of the main hostile image: one victim per attack, plus witnesses."""
    def write(rel: str, data: bytes) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)

    write(GOOD_FILE, GOOD_CONTENT)
    for name in EXTENT_VICTIMS:
        path = root / "victims" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for island in range(SPARSE_ISLANDS):
                f.seek(island * 4 * BLOCK_SIZE)
                f.write(bytes([0x41 + island]) * BLOCK_SIZE)
    for name in ("d-reclen-zero", "d-overrun"):
        for i in range(20):
            write(f"victims/{name}/f{i:02d}", b"%d\n" % i)
    for name in ("d-size-beyond-fs", "d-size-holey"):
        write(f"victims/{name}/only-entry", b"the one real entry\n")
    for name in ("htree-cycle", "htree-depth"):
        for i in range(120):
            write(f"victims/{name}/entry-with-a-long-name-{i:03d}", b"%d\n" % i)
    write("loops/a/b/c/file", b"inside the loop\n")
    write("loops/dd/x/y/z/file", b"below a dotdot loop\n")
    for name in ("xa-overlap", "xa-past-block"):
        write(f"victims/{name}", b"xattr victim\n")
        os.setxattr(root / "victims" / name, "user.big", b"V" * 600)
    write("victims/size-max", b"S" * 3000)
    write("victims/size-2p63", b"T" * 3000)
    write("victims/links-zero", b"deleted but still listed\n")
    write("victims/hello.txt", b"hello at the end of the chain\n")
    chain = root / CHAIN_DIR
    chain.mkdir()
    for hop in range(SYMLINK_HOPS):
        target = chain_name(hop + 1) if hop + 1 < SYMLINK_HOPS else "../victims/hello.txt"
        os.symlink(target, chain / chain_name(hop))


def mkfs(image: Path, tree: Path, size: str, *extra: str) -> None:
    images.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-O",
                "^metadata_csum", "-E", "root_owner=0:0", *extra, "-d", str(tree), str(image),
                size])
    # Index the large directories (the htree victims and the symlink chain).
    done = subprocess.run(["e2fsck", "-fyD", str(image)], capture_output=True, check=False)
    assert done.returncode in (0, 1), done.stdout


def debugfs_write(image: Path, *requests: str) -> None:
    script = "\n".join(requests) + "\n"
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=script.encode(),
                   capture_output=True, check=True)


def poke(image: Path, offset: int, data: bytes) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def peek(image: Path, offset: int, length: int) -> bytes:
    with image.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def inode_number(image: Path, path: str) -> int:
    match = re.search(r"Inode: (\d+)", images.debugfs(image, f'stat "/{path}"'))
    assert match, path
    return int(match.group(1))


def inode_offset(image: Path, path: str) -> int:
    output = images.debugfs(image, f'imap "/{path}"')
    match = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", output)
    assert match, output
    return int(match.group(1)) * BLOCK_SIZE + int(match.group(2), 16)


def extent_leaf(image: Path, path: str) -> int:
    """The leaf block of a depth-1 extent tree (the index line's Physical column)."""
    output = images.debugfs(image, f'ex "/{path}"')
    match = re.search(r"^\s*0/\s*1\s+\d+/\s*\d+\s+\d+\s*-\s*\d+\s+(\d+)", output, re.M)
    assert match, output
    return int(match.group(1))


def first_block(image: Path, path: str) -> int:
    """Physical block of logical block 0 (`blocks` would list tree blocks too)."""
    return int(images.debugfs(image, f'bmap "/{path}" 0').split()[-1])


def blocks_count(image: Path) -> int:
    return int(images.dumpe2fs_header(image)["Block count"])


# ---- extent trees ------------------------------------------------------------

_EXTENT = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
_LEAF_ENTRY0 = 12  # after the 12-byte node header


def extent_tree_loop(image: Path) -> None:
    """The leaf claims to be an index node whose only child is itself."""
    leaf = extent_leaf(image, "victims/ext-loop")
    # header: magic, entries=1, max unchanged, depth=1; entry 0: key 0 -> leaf itself.
    poke(image, leaf * BLOCK_SIZE + 2, struct.pack("<H", 1))
    poke(image, leaf * BLOCK_SIZE + 6, struct.pack("<H", 1))
    poke(image, leaf * BLOCK_SIZE + _LEAF_ENTRY0, struct.pack("<IIHH", 0, leaf, 0, 0))


def overlapping_extents(image: Path) -> None:
    """The second extent starts inside the first."""
    leaf = extent_leaf(image, "victims/ext-overlap")
    first = _EXTENT.unpack(peek(image, leaf * BLOCK_SIZE + _LEAF_ENTRY0, 12))
    poke(image, leaf * BLOCK_SIZE + _LEAF_ENTRY0 + 12, struct.pack("<I", first[0]))


def index_depth_beyond_5(image: Path) -> None:
    """The in-inode root says depth 6 (i_block word 1 = eh_max | eh_depth << 16)."""
    debugfs_write(image, 'sif "/victims/ext-deep" block[1] 0x00060004')


def _retarget_first_extent(image: Path, path: str, pblk: int) -> None:
    leaf = extent_leaf(image, path)
    poke(image, leaf * BLOCK_SIZE + _LEAF_ENTRY0 + 6, struct.pack("<HI", pblk >> 32, pblk))


def extent_past_device(image: Path) -> None:
    _retarget_first_extent(image, "victims/ext-past-device", blocks_count(image) + 1000)


def extent_at_superblock(image: Path) -> None:
    _retarget_first_extent(image, "victims/ext-at-superblock", 1)  # 1 KiB blocks: sb is block 1


def extent_at_group_descriptors(image: Path) -> None:
    _retarget_first_extent(image, "victims/ext-at-gdt", 2)  # the GDT follows the superblock


# ---- directories -------------------------------------------------------------

def dirent_rec_len_zero(image: Path) -> None:
    """The first named record (after "." and "..") has rec_len 0: a parser that trusts
    it never advances."""
    block = first_block(image, "victims/d-reclen-zero")
    poke(image, block * BLOCK_SIZE + 24 + 4, struct.pack("<H", 0))


def dirent_overruns_block(image: Path) -> None:
    block = first_block(image, "victims/d-overrun")
    poke(image, block * BLOCK_SIZE + 24 + 4, struct.pack("<H", 2 * BLOCK_SIZE))


def directory_size_beyond_filesystem(image: Path) -> None:
    """i_size of almost 4 GiB: more blocks than the filesystem has. Found by atheris:
    a linear scan used to map those blocks one by one (a hang of minutes)."""
    debugfs_write(image, 'sif "/victims/d-size-beyond-fs" size 0xfffffc00')


HOLEY_DIR_BLOCKS = 20_000


def directory_size_holey(image: Path) -> None:
    """One real block followed by a hole of ~20k blocks: legal for a linear
    directory (the kernel skips holes); scanned one hole at a time, not block by block."""
    debugfs_write(image, f'sif "/victims/d-size-holey" size {HOLEY_DIR_BLOCKS * BLOCK_SIZE}')


_DX_LEVELS = 24 + 6  # dx_root_info.indirect_levels
_DX_ENTRIES = 32  # limit/count, then (hash, block) pairs; entry 0's block at +4


def htree_cycle(image: Path) -> None:
    """A two-level index whose entries all point back at the root block."""
    block = first_block(image, "victims/htree-cycle")
    base = block * BLOCK_SIZE
    count = struct.unpack("<H", peek(image, base + _DX_ENTRIES + 2, 2))[0]
    poke(image, base + _DX_LEVELS, b"\x01")
    for i in range(count):
        poke(image, base + _DX_ENTRIES + 8 * i + 4, struct.pack("<I", 0))


def htree_wrong_depth(image: Path) -> None:
    block = first_block(image, "victims/htree-depth")
    poke(image, block * BLOCK_SIZE + _DX_LEVELS, b"\x07")


def directory_hard_link_to_ancestor(image: Path) -> None:
    """loops/a/b/c/up names loops/a: a directory reachable below itself."""
    debugfs_write(image, 'ln "/loops/a" "/loops/a/b/c/up"')


def dotdot_loop(image: Path) -> None:
    """loops/dd/x/y's ".." names its own child z."""
    z_ino = inode_number(image, "loops/dd/x/y/z")
    block = first_block(image, "loops/dd/x/y")
    poke(image, block * BLOCK_SIZE + 12, struct.pack("<I", z_ino))


# ---- xattrs ------------------------------------------------------------------

_XATTR_ENTRY0 = 32  # after the 32-byte block header


def xattr_value_overlaps_entries(image: Path) -> None:
    block = images.xattr_block_of(image, "victims/xa-overlap")
    poke(image, block * BLOCK_SIZE + _XATTR_ENTRY0 + 2, struct.pack("<H", _XATTR_ENTRY0))


def xattr_value_past_block(image: Path) -> None:
    block = images.xattr_block_of(image, "victims/xa-past-block")
    poke(image, block * BLOCK_SIZE + _XATTR_ENTRY0 + 8, struct.pack("<I", 5 * BLOCK_SIZE))


# ---- inodes ------------------------------------------------------------------

def size_2p63_minus_1(image: Path) -> None:
    debugfs_write(image, 'sif "/victims/size-max" size 0x7fffffffffffffff')


def size_2p63(image: Path) -> None:
    """Bit 31 of i_size_high: 2^63 + the real size, negative as an off_t."""
    offset = inode_offset(image, "victims/size-2p63")
    high = struct.unpack("<I", peek(image, offset + 0x6C, 4))[0]
    poke(image, offset + 0x6C, struct.pack("<I", high | 0x80000000))


def links_count_zero(image: Path) -> None:
    debugfs_write(image, 'sif "/victims/links-zero" links_count 0')


MAIN_ATTACKS: dict[str, Callable[[Path], None]] = {
    "extent_tree_loop": extent_tree_loop,
    "overlapping_extents": overlapping_extents,
    "index_depth_beyond_5": index_depth_beyond_5,
    "extent_past_device": extent_past_device,
    "extent_at_superblock": extent_at_superblock,
    "extent_at_group_descriptors": extent_at_group_descriptors,
    "dirent_rec_len_zero": dirent_rec_len_zero,
    "dirent_overruns_block": dirent_overruns_block,
    "directory_size_beyond_filesystem": directory_size_beyond_filesystem,
    "directory_size_holey": directory_size_holey,
    "htree_cycle": htree_cycle,
    "htree_wrong_depth": htree_wrong_depth,
    "directory_hard_link_to_ancestor": directory_hard_link_to_ancestor,
    "dotdot_loop": dotdot_loop,
    "xattr_value_overlaps_entries": xattr_value_overlaps_entries,
    "xattr_value_past_block": xattr_value_past_block,
    "size_2p63_minus_1": size_2p63_minus_1,
    "size_2p63": size_2p63,
    "links_count_zero": links_count_zero,
}


# ---- the second image: groups and inline data --------------------------------

GROUP_VICTIM_DIR = "spread"
INLINE_VICTIM = "inline/body-in-xattr"
INLINE_CONTENT = b"I" * 100  # 60 bytes in i_block, 40 in the system.data xattr
EA_CYCLE_FILES = {"inline/ea-a": b"a", "inline/ea-b": b"b" * 14}


def build_group_tree(root: Path) -> None:
    (root / "ok").mkdir(parents=True)
    (root / GOOD_FILE).write_bytes(GOOD_CONTENT)
    (root / "inline").mkdir()
    (root / INLINE_VICTIM).write_bytes(INLINE_CONTENT)
    for name, body in EA_CYCLE_FILES.items():
        (root / name).write_bytes(body)
    (root / GROUP_VICTIM_DIR).mkdir()
    for i in range(300):
        (root / GROUP_VICTIM_DIR / f"f{i:03d}").write_bytes(b"file %d\n" % i)


def build_group_image(image: Path, tree: Path) -> None:
    mkfs(image, tree, "8M", "-O", "inline_data", "-g", "1024", "-N", "512")


@dataclass(frozen=True, slots=True)
class GroupVictim:
    group: int
    path: str  # a file whose inode lives in `group`


def group_victim(image: Path) -> GroupVictim:
    """A file of the spread directory in a group that holds no witness inode."""
    ipg = int(images.dumpe2fs_header(image)["Inodes per group"])
    protected = {(inode_number(image, p) - 1) // ipg
                 for p in ("ok", GOOD_FILE, "inline", INLINE_VICTIM, GROUP_VICTIM_DIR)}
    protected.add(0)
    for line in images.debugfs(image, f'ls -l "/{GROUP_VICTIM_DIR}"').splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit() and fields[-1].startswith("f"):
            group = (int(fields[0]) - 1) // ipg
            if group not in protected:
                return GroupVictim(group, f"{GROUP_VICTIM_DIR}/{fields[-1]}")
    raise AssertionError("no file landed in an unprotected group")


def inode_table_outside_device(image: Path, victim: GroupVictim) -> None:
    debugfs_write(image, f"set_bg {victim.group} inode_table {blocks_count(image) + 50}")


def _system_data_entry(image: Path, path: str) -> int:
    """Device offset of the in-inode system.data xattr entry of an inline file."""
    offset = inode_offset(image, path)
    extra_isize = struct.unpack("<H", peek(image, offset + 128, 2))[0]
    entry = offset + 128 + extra_isize + 4  # after the in-inode xattr magic
    for _ in range(16):
        name_len, index = peek(image, entry, 2)
        assert name_len, f"{path}: no system.data entry"
        if (index, peek(image, entry + 16, name_len)) == (7, b"data"):
            return entry
        entry += (16 + name_len + 3) & ~3
    raise AssertionError(f"{path}: no system.data entry")


def inline_data_larger_than_inode(image: Path) -> None:
    """The system.data entry claims a value far larger than the inode's xattr space."""
    poke(image, _system_data_entry(image, INLINE_VICTIM) + 8, struct.pack("<I", 4000))


_FL_EA_INODE = 0x200000


def ea_inode_cycle(image: Path) -> None:
    """Two inline files flagged EA_INODE whose system.data values live in each other.
    Found by reading the facade: reading either recursed until RecursionError."""
    (a, a_body), (b, b_body) = EA_CYCLE_FILES.items()
    for path, other, other_body in ((a, b, b_body), (b, a, a_body)):
        offset = inode_offset(image, path)
        flags = struct.unpack("<I", peek(image, offset + 0x20, 4))[0]
        poke(image, offset + 0x20, struct.pack("<I", flags | _FL_EA_INODE))
        # e_value_inum, e_value_size: the value is the other file's whole body.
        poke(image, _system_data_entry(image, path) + 4,
             struct.pack("<II", inode_number(image, other), len(other_body)))


def huge_inode_count(image: Path) -> None:
    debugfs_write(image, "ssv inodes_count 0xfffffff0")
