"""The inline-data writer against the kernel: same writes, same bytes, same storage.

Two copies of an image made by mkfs.ext4 -d with inline_data: the kernel
writes and truncates files on one (loop mount); our planner does the same
calls on the other, writing i_block, the in-inode area and i_size back into the
raw inode, and carrying out conversions to extents as the facade will (one
data block, an extent in the fresh root, flags switched). Then: e2fsck -fn is
clean, the kernel reads the same contents from both, and every file is stored
the same way (inline or not, and the same system.data length).
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_debugfs import make_image
from test_xattr_writer import OfflineImage, assert_fsck_clean

from ext4box.ext4.format.inline_data import INLINE_IBLOCK_SIZE
from ext4box.ext4.format.inode import FL_EXTENTS, FL_INLINE_DATA, Inode
from ext4box.ext4.format.xattr import parse_ibody_xattrs
from ext4box.ext4.write.inline_writer import (
    FAST_SYMLINK_MAX,
    InlineLayout,
    InlineState,
    NeedsConversion,
    conversion,
    empty_extent_root,
    fast_symlink_i_block,
    max_inline_size,
    truncate_inline,
    write_inline,
)
from support.kernel import kernel_mount, why_no_kernel_mounts

pytestmark = pytest.mark.skipif(why_no_kernel_mounts() is not None,
                                reason=str(why_no_kernel_mounts()))

_SIZE_LO, _FLAGS, _BLOCKS_LO, _I_BLOCK, _SIZE_HI = 4, 32, 28, 40, 108
_EXTENT = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
_XATTR_COST = 40  # user.x with a 20-byte value: 20 bytes of entry + 20 of value


@dataclass(frozen=True)
class Write:
    offset: int
    data: bytes


@dataclass(frozen=True)
class Truncate:
    size: int


def scenarios(max_inline: int) -> dict[str, tuple[int, list[Write | Truncate]]]:
    """file name -> (initial size, operations), sized from the inode's inline limit."""
    m = max_inline
    return {
        "grow": (5, [Write(5, b"g" * 50), Write(55, b"h" * 30), Write(m - 8, b"i" * 8),
                     Write(m, b"j")]),
        "shrink": (100, [Truncate(70), Truncate(30), Truncate(50), Truncate(61)]),
        "xattr": (5, [Write(5, b"k" * (m - _XATTR_COST - 5)),
                      Write(m - _XATTR_COST, b"l")]),
        "hole": (10, [Write(100, b"abc"), Truncate(90), Write(95, b"z")]),
        "big": (60, [Write(0, b"m" * (m + 72))]),
        "truncbig": (10, [Truncate(10000)]),
        "empty": (0, [Write(0, b"abc"), Truncate(0), Write(61, b"q")]),
        "same": (40, [Truncate(40), Truncate(60), Write(59, b"r")]),
    }


def inline_state(inode: Inode) -> InlineState:
    area = inode.ibody_xattr_area
    return InlineState(ino=inode.ino, i_block=inode.i_block, size=inode.size,
                       ibody_entries=tuple(parse_ibody_xattrs(area, ino=inode.ino)),
                       ibody_size=len(area))


def storage(offline: OfflineImage, name: str) -> tuple[bool, int | None]:
    """(inline?, system.data length) of a file."""
    inode = offline.inode("/" + name)
    if not inode.has_inline_data:
        assert inode.uses_extents
        return False, None
    data = inline_state(inode).system_data
    return True, None if data is None else len(data)


def write_layout(offline: OfflineImage, path: str, layout: InlineLayout) -> None:
    inode = offline.inode(path)
    raw = bytearray(inode.raw)
    raw[_I_BLOCK : _I_BLOCK + INLINE_IBLOCK_SIZE] = layout.i_block
    raw[128 + inode.extra_isize :] = layout.ibody
    struct.pack_into("<I", raw, _SIZE_LO, layout.size & 0xFFFFFFFF)
    struct.pack_into("<I", raw, _SIZE_HI, layout.size >> 32)
    offline.write_inode(path, raw)


def convert_and_apply(offline: OfflineImage, path: str, op: Write | Truncate) -> None:
    """The facade's conversion steps, then the operation through the (one-block) extent map."""
    inode = offline.inode(path)
    plan = conversion(inline_state(inode), extents=True)
    block_size = offline.info.block_size
    content = bytearray(plan.body)
    size = inode.size
    if isinstance(op, Write):
        end = op.offset + len(op.data)
        assert end <= block_size, "the test keeps converted files within one block"
        content[len(content) : op.offset] = bytes(max(op.offset - len(content), 0))
        content[op.offset : end] = op.data
        size = max(size, end)
    else:
        size = op.size
    i_block = bytearray(plan.i_block)
    blocks = inode.blocks_512
    if content:
        block = offline.alloc_block(offline.goal(inode.ino))
        offline.write_block(block, bytes(content) + bytes(block_size - len(content)))
        struct.pack_into("<H", i_block, 2, 1)  # eh_entries: the extent tree writer's job
        _EXTENT.pack_into(i_block, 12, 0, 1, block >> 32, block & 0xFFFFFFFF)
        blocks += block_size // 512
    raw = bytearray(offline.inode(path).raw)
    raw[_I_BLOCK : _I_BLOCK + INLINE_IBLOCK_SIZE] = i_block
    raw[128 + inode.extra_isize :] = plan.ibody
    flags = (inode.flags & ~FL_INLINE_DATA) | FL_EXTENTS
    struct.pack_into("<I", raw, _FLAGS, flags)
    struct.pack_into("<I", raw, _BLOCKS_LO, blocks)
    struct.pack_into("<I", raw, _SIZE_LO, size & 0xFFFFFFFF)
    struct.pack_into("<I", raw, _SIZE_HI, size >> 32)
    offline.write_inode(path, raw)


def kernel_apply(path: Path, op: Write | Truncate) -> None:
    """Through an fd open for writing, never truncate(path): Linux 6.18 dereferences a
    NULL jbd2 inode when truncate(2) grows an inline file that no open-for-write fd
    has touched in this mount, and the handle it leaks wedges the journal (every
    later sync(2) on the machine hangs). The images also have no journal, so no
    such bug can take a journal down with it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        if isinstance(op, Truncate):
            os.ftruncate(fd, op.size)
        else:
            os.pwrite(fd, op.data, op.offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("inode_size,csum", [(256, True), (512, False)])
def test_same_writes_same_storage_as_kernel(tmp_path: Path, inode_size: int, csum: bool) -> None:
    ibody = inode_size - 128 - 32
    max_inline = INLINE_IBLOCK_SIZE + ibody - 8 - 20  # magic, end marker, system.data entry
    plan = scenarios(max_inline)
    src = tmp_path / "src"
    src.mkdir()
    for name, (size, _ops) in plan.items():
        (src / name).write_bytes(bytes((i % 90) + 33 for i in range(size)))
    os.setxattr(src / "xattr", "user.x", b"x" * 20)
    features = "inline_data,^has_journal" + ("" if csum else ",^metadata_csum")
    theirs = make_image(tmp_path / "kernel.img", 16, "-b", "4096", "-I", str(inode_size),
                        "-O", features, root_dir=src)
    ours = tmp_path / "ours.img"
    shutil.copyfile(theirs, ours)
    offline = OfflineImage.open(ours)
    assert max_inline_size(inline_state(offline.inode("/grow"))) == max_inline

    with kernel_mount(theirs, tmp_path / "mnt", readonly=False) as mnt:
        for name, (_size, ops) in plan.items():
            for op in ops:
                kernel_apply(mnt / name, op)
    # Read back from a fresh mount: right after truncate(2) converts an inline file,
    # Linux 6.18's page cache shows zeros where the block on disk has the data.
    with kernel_mount(theirs, tmp_path / "mnt") as mnt:
        expected = {name: (mnt / name).read_bytes() for name in plan}

    converted = []
    for name, (_size, ops) in plan.items():
        path = "/" + name
        for op in ops:
            state = inline_state(offline.inode(path))
            if isinstance(op, Write):
                result = write_inline(state, op.offset, op.data)
            else:
                result = truncate_inline(state, op.size)
            if isinstance(result, NeedsConversion):
                convert_and_apply(offline, path, op)
                converted.append(name)
                break  # the rest is the extent writers' business
            write_layout(offline, path, result)
    assert sorted(converted) == ["big", "grow", "shrink", "truncbig", "xattr"]

    assert_fsck_clean(ours)
    kernel_side = OfflineImage.open(theirs)
    for name in plan:
        assert storage(offline, name) == storage(kernel_side, name), name
    with kernel_mount(ours, tmp_path / "mnt2") as mnt:
        for name in plan:
            assert (mnt / name).read_bytes() == expected[name], name


def test_kernel_symlinks_are_never_inline(tmp_path: Path) -> None:
    """With inline_data on, the kernel makes fast symlinks (< 60 bytes) and block symlinks."""
    image = make_image(tmp_path / "links.img", 16, "-b", "4096", "-O", "inline_data,^has_journal")
    short, long_ = b"t" * FAST_SYMLINK_MAX, b"u" * (FAST_SYMLINK_MAX + 1)
    with kernel_mount(image, tmp_path / "mnt", readonly=False) as mnt:
        os.symlink(short, mnt / "short")
        os.symlink(long_, mnt / "long")
    offline = OfflineImage.open(image)
    fast = offline.inode("/short")
    assert fast.flags & (FL_INLINE_DATA | FL_EXTENTS) == 0
    assert fast.i_block == fast_symlink_i_block(short)
    slow = offline.inode("/long")
    assert slow.flags & FL_EXTENTS and not slow.flags & FL_INLINE_DATA


def test_empty_extent_root_matches_kernel(tmp_path: Path) -> None:
    """An empty regular file the kernel created (never written) has exactly this root."""
    image = make_image(tmp_path / "root.img", 16, "-b", "4096", "-O", "inline_data,^has_journal")
    with kernel_mount(image, tmp_path / "mnt", readonly=False) as mnt:
        (mnt / "empty").write_bytes(b"")
    inode = OfflineImage.open(image).inode("/empty")
    assert inode.flags & FL_EXTENTS
    assert inode.i_block == empty_extent_root()
