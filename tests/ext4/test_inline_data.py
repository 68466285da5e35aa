"""Inline data bodies against files the kernel and mkfs.ext4 -d stored inline."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_debugfs import (
    FsInfo,
    fs_info,
    loop_mount,
    make_image,
    raw_inode,
    xattr_value,
)

from ext4box.ext4.format.errors import Corrupt
from ext4box.ext4.format.inline_data import (
    INLINE_IBLOCK_SIZE,
    inline_bytes,
    inline_capacity,
    split_inline_body,
)

INLINE_DATA_FL = 0x10000000
SIZES = (0, 1, 12, 59, 60, 61, 100, 120, 150)


@dataclass
class BuiltImage:
    path: Path
    info: FsInfo
    bodies: dict[str, bytes]


def _bodies() -> dict[str, bytes]:
    rng = random.Random(3)
    return {f"f{size}": rng.randbytes(size) for size in SIZES}


@pytest.fixture(scope="module", params=["kernel", "mkfs-d"])
def inline_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> BuiltImage:
    tmp = tmp_path_factory.mktemp(f"inline-{request.param}")
    bodies = _bodies()
    args = ("-b", "1024", "-I", "256", "-O", "inline_data")
    if request.param == "mkfs-d":
        root = tmp / "root"
        root.mkdir()
        for name, body in bodies.items():
            (root / name).write_bytes(body)
        path = make_image(tmp / "inline.img", 4, *args, root_dir=root)
        return BuiltImage(path, fs_info(path), bodies)
    path = make_image(tmp / "inline.img", 4, *args)
    with loop_mount(path) as mnt:
        for name, body in bodies.items():
            (mnt / name).write_bytes(body)
        # Shrunk after being written longer: the tail of i_block may keep old bytes.
        (mnt / "shrunk").write_bytes(b"x" * 100)
        # Through a write fd: path truncate(2) of inline files trips a 6.18 ext4 bug.
        with open(mnt / "shrunk", "r+b") as shrunk:
            shrunk.truncate(30)
        bodies["shrunk"] = (mnt / "shrunk").read_bytes()
    return BuiltImage(path, fs_info(path), bodies)


def _inline_inode(image: BuiltImage, name: str):  # -> (RawInode, system.data value)
    inode = raw_inode(image.path, "/" + name, image.info)
    return inode, xattr_value(image.path, "/" + name, "system.data")


@pytest.mark.parametrize("name", [f"f{size}" for size in SIZES])
def test_inline_bodies_match(inline_image: BuiltImage, name: str) -> None:
    inode, system_data = _inline_inode(inline_image, name)
    body = inline_image.bodies[name]
    if not inode.flags & INLINE_DATA_FL:
        # Never written (the kernel sets the flag on first write), or too large for
        # this inode's free xattr space and so stored in blocks instead.
        assert len(body) == 0 or len(body) > 120
        pytest.skip(f"{name} was not stored inline")
    assert inode.size == len(body)
    assert system_data is not None
    assert inline_bytes(inode.i_block, system_data, inode.size, inode.ino) == body
    assert inline_capacity(system_data) >= len(body)
    i_block, value = split_inline_body(body)
    assert i_block[:len(body)] == inode.i_block[:len(body)]
    assert value == system_data[:max(0, len(body) - INLINE_IBLOCK_SIZE)]


def test_large_inline_files_exist(inline_image: BuiltImage) -> None:
    """Guard the fixture: bodies past 60 bytes really use the system.data value."""
    inode, system_data = _inline_inode(inline_image, "f100")
    assert inode.flags & INLINE_DATA_FL
    assert system_data is not None and len(system_data) >= 40


@pytest.mark.kernel
def test_shrunk_file(inline_image: BuiltImage) -> None:
    if "shrunk" not in inline_image.bodies:
        pytest.skip("kernel-written image only")
    inode, system_data = _inline_inode(inline_image, "shrunk")
    assert inode.flags & INLINE_DATA_FL
    assert inline_bytes(inode.i_block, system_data, inode.size, inode.ino) == (
        inline_image.bodies["shrunk"])


def test_size_beyond_stored_reads_only_what_is_stored(inline_image: BuiltImage) -> None:
    # The tail past the stored body is a hole (the kernel reads zeros there):
    # inline_bytes returns the stored part only, never more than the inode holds.
    inode, system_data = _inline_inode(inline_image, "f100")
    capacity = inline_capacity(system_data)
    stored = inline_bytes(inode.i_block, system_data, capacity, inode.ino)
    assert len(stored) == capacity
    assert inline_bytes(inode.i_block, system_data, 1 << 62, inode.ino) == stored
    assert inline_bytes(inode.i_block, None, 61, inode.ino) == inode.i_block
    with pytest.raises(Corrupt) as info:
        inline_bytes(inode.i_block, system_data, -1, inode.ino)
    assert f"inode {inode.ino}" in info.value.where
    assert inline_bytes(inode.i_block, None, 60, inode.ino) == inode.i_block
