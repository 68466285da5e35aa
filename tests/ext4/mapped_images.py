"""Images whose files the mapping tests (block maps, extent trees) read back.

Each image is built once per module: by the kernel (a loop mount populated
by the test module's own function) or by `mkfs -d` from a small tree with a
plain and a sparse file. The tests parse the image bytes in memory and
compare against what the kernel or the source tree says each file holds.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers_debugfs import FsInfo, RawInode, fs_info, loop_mount, make_image, raw_inode

from support.fileops import syncfs


@dataclass
class BuiltImage:
    path: Path
    data: bytes
    info: FsInfo
    hashes: dict[str, str]  # file name -> digest of what the file holds
    sizes: dict[str, int]


def write_blocks(path: Path, bs: int, blocks: list[int], *, size: int | None = None) -> None:
    """Write the given logical blocks (each filled with a byte of its number)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for lblk in blocks:
            os.pwrite(fd, bytes([lblk % 251 + 1]) * bs, lblk * bs)
        if size is not None:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def kernel_built(path: Path, size_mb: int, mkfs_args: tuple[str, ...], bs: int,
                 populate: Callable[[Path, int], None], names: tuple[str, ...],
                 digest: Callable[[Path], str]) -> BuiltImage:
    """mkfs, then `populate` the image through a kernel loop mount."""
    make_image(path, size_mb, *mkfs_args)
    with loop_mount(path) as mnt:
        populate(mnt, bs)
        syncfs(mnt)
        hashes = {name: digest(mnt / name) for name in names}
        sizes = {name: (mnt / name).stat().st_size for name in names}
    return BuiltImage(path, path.read_bytes(), fs_info(path), hashes, sizes)


def mkfs_d_built(tmp_path_factory: pytest.TempPathFactory, *, seed: int, plain: int,
                 sparse: tuple[int, int, int, int], mkfs_args: tuple[str, ...],
                 digest: Callable[[Path], str]) -> BuiltImage:
    """`mkfs -d` of a tree holding "plain" (`plain` random bytes) and "sparse"
    (random bytes at sparse[0] for sparse[1] bytes, "tail" at sparse[2], size sparse[3])."""
    root = tmp_path_factory.mktemp("tree")
    rng = random.Random(seed)
    (root / "plain").write_bytes(rng.randbytes(plain))
    data_at, data_len, tail_at, size = sparse
    with (root / "sparse").open("wb") as f:
        f.seek(data_at)
        f.write(rng.randbytes(data_len))
        f.seek(tail_at)
        f.write(b"tail")
        f.truncate(size)
    names = ("plain", "sparse")
    hashes = {name: digest(root / name) for name in names}
    sizes = {name: (root / name).stat().st_size for name in names}
    path = make_image(tmp_path_factory.mktemp("mkfs-d") / "d.img", 8, *mkfs_args, root_dir=root)
    return BuiltImage(path, path.read_bytes(), fs_info(path), hashes, sizes)


# debugfs answers per (image, question): the images never change after their fixture.
DEBUGFS_CACHE: dict[tuple[Path, str], Any] = {}


def cached_inode(image: BuiltImage, name: str) -> RawInode:
    """The raw inode of /name, as debugfs reports it (asked once per image)."""
    key = (image.path, name)
    if key not in DEBUGFS_CACHE:
        DEBUGFS_CACHE[key] = raw_inode(image.path, "/" + name, image.info)
    return DEBUGFS_CACHE[key]
