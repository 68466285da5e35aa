"""Images for the iomap engine tests, written through the kernel's own ext4.

A kernel mount is the only honest way to get a fragmented extent tree with
punched holes and unwritten (fallocated) extents; debugfs then reports the
extents the engine's mappings must agree with.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ext4box.blockdev import BlockDevice
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.read.filesystem import Filesystem
from ext4box.iomap.engine import IOMapEngine
from support.fileops import truncate_by_fd

BLOCK = 4096
FRAG_BLOCKS = 24
FRAG_SIZE = 50 * BLOCK + 1234  # past the last extent: a hole up to EOF


@dataclass(frozen=True)
class Extent:
    lblk: int
    length: int
    pblk: int
    unwritten: bool


@dataclass
class KernelImage:
    path: Path
    contents: dict[str, bytes]  # as the kernel read them back
    extents: dict[str, list[Extent]]  # as debugfs reports them


def debugfs_extents(image: Path, path: str) -> list[Extent]:
    out = subprocess.run(
        ["debugfs", "-R", f"ex {path}", str(image)], capture_output=True, text=True, check=True
    ).stdout
    leaf = re.compile(
        r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*(Uninit)?"
    )
    extents = []
    for line in out.splitlines():
        match = leaf.match(line)
        if match and match.group(1) == match.group(2):
            start, _, pblk, _, length = (int(match.group(i)) for i in range(3, 8))
            extents.append(Extent(start, length, pblk, match.group(8) is not None))
    return extents


def _fallocate(*args: str) -> None:
    subprocess.run(["fallocate", *args], check=True)


def build_kernel_image(workdir: Path) -> KernelImage:
    image = workdir / "kernel-written.ext4"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), str(image), "32M"],
        check=True,
        capture_output=True,
    )
    mnt = workdir / "rw"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        frag, other = mnt / "frag", mnt / "other"
        fds = [os.open(p, os.O_WRONLY | os.O_CREAT, 0o644) for p in (frag, other)]
        try:
            # Alternate single-block writes with fsync between two files:
            # each block is allocated on its own, so the extents interleave
            # and the tree needs an index level.
            for index in range(FRAG_BLOCKS):
                for fd in fds:
                    os.pwrite(fd, os.urandom(BLOCK), index * BLOCK)
                    os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)
        _fallocate("-p", "-o", str(5 * BLOCK), "-l", str(2 * BLOCK), str(frag))  # hole
        _fallocate("-o", str(30 * BLOCK), "-l", str(8 * BLOCK), str(frag))  # unwritten
        truncate_by_fd(frag, FRAG_SIZE)
        (mnt / "contig").write_bytes(os.urandom(1024 * 1024 + 17))
        (mnt / "tiny").write_bytes(b"0123456789")
        contents = {name: (mnt / name).read_bytes() for name in ("frag", "other", "contig", "tiny")}
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    extents = {name: debugfs_extents(image, "/" + name) for name in contents}
    return KernelImage(image, contents, extents)


@pytest.fixture(scope="session")
def kernel_image(tmp_path_factory: pytest.TempPathFactory) -> KernelImage:
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop mount")
    for tool in ("mkfs.ext4", "debugfs", "fallocate"):
        if shutil.which(tool) is None:
            pytest.skip(f"missing {tool}")
    return build_kernel_image(tmp_path_factory.mktemp("iomap"))


@dataclass
class Opened:
    fs: Filesystem
    engine: IOMapEngine


def open_image(path: Path, **engine_args: int) -> Iterator[Opened]:
    dev = BlockDevice.open(str(path))
    try:
        fs = open_filesystem(dev, readonly=True)
        yield Opened(fs, IOMapEngine(fs, dev, **engine_args))
        fs.close()
    finally:
        dev.close()


@pytest.fixture
def opened(kernel_image: KernelImage) -> Iterator[Opened]:
    yield from open_image(kernel_image.path)
