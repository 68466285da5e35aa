"""Driving the read-write facade in-process, as the iomap executor and FUSE layer do.

`Ours` is a path-level driver of a `WritableFilesystem` opened on an image
file; `write_file` does what the iomap executor does for one write(2). Shared
by the facade tests (tests/ext4) and the journal tests (tests/journal).
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.inode import ROOT_INO
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.write.writable import WritableFilesystem
from support.kernel import kernel_mount, why_no_kernel_mounts
from support.walk import Entry, walk


def need_kernel() -> None:
    reason = why_no_kernel_mounts()
    if reason is not None:
        pytest.skip(reason)


def make_image(path: Path, mkfs_args: list[str], size_mb: int = 24) -> Path:
    with path.open("wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", *mkfs_args, str(path)], check=True,
                   capture_output=True)
    return path


def e2fsck(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          check=False)


def assert_clean(image: Path) -> None:
    result = e2fsck(image)
    assert result.returncode == 0, result.stdout + result.stderr


def kernel_walk(image: Path, tmp: Path) -> dict[str, Entry | str]:
    mnt = tmp / f"walk-{image.name}"
    mnt.mkdir(parents=True, exist_ok=True)
    with kernel_mount(image, mnt, readonly=True) as root:
        tree = walk(root)
    tree.pop("lost+found", None)
    return tree


def tree_diff(a: dict[str, Entry | str], b: dict[str, Entry | str], *,
              compared: tuple[str, ...], labels: tuple[str, str] = ("ours", "kernel")
              ) -> list[str]:
    """Per path, the `compared` fields that differ between two kernel_walk trees
    (directory sizes and the root's own child list are layout history; every
    path is compared on its own anyway)."""
    out = []
    first, second = labels
    for path in sorted(a.keys() | b.keys()):
        x, y = a.get(path), b.get(path)
        if not isinstance(x, Entry) or not isinstance(y, Entry):
            if x != y:
                out.append(f"{path}: {first}={x!r:.120} {second}={y!r:.120}")
            continue
        for name in compared:
            if (name == "size" and x.kind == "dir") or (name == "children" and path == "."):
                continue
            if getattr(x, name) != getattr(y, name):
                out.append(f"{path}: {name}: {first}={getattr(x, name)!r:.100} "
                           f"{second}={getattr(y, name)!r:.100}")
    return out


class Ours:
    """Path-level driver of a WritableFilesystem (the image opened read-write)."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.dev = BlockDevice.open(str(image), writable=True)
        fs = open_filesystem(self.dev, readonly=False)
        assert isinstance(fs, WritableFilesystem)
        self.fs = fs
        self.bs = fs.block_size

    def close(self) -> None:
        try:
            self.fs.close()
        finally:
            self.dev.close()

    def resolve(self, path: str) -> int:
        ino = ROOT_INO
        for part in filter(None, path.split("/")):
            ino = self.fs.lookup(ino, part.encode())
        return ino

    def split(self, path: str) -> tuple[int, bytes]:
        parent, _, name = path.rpartition("/")
        return self.resolve(parent), name.encode()

    # ---- the operations a scenario uses -----------------------------------

    def create(self, path: str, mode: int = 0o644, rdev: int = 0) -> None:
        parent, name = self.split(path)
        if not stat.S_IFMT(mode):
            mode |= stat.S_IFREG
        self.fs.create(parent, name, mode, 0, 0, rdev)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent, name = self.split(path)
        self.fs.mkdir(parent, name, mode, 0, 0)

    def symlink(self, path: str, target: bytes) -> None:
        parent, name = self.split(path)
        self.fs.symlink(parent, name, target, 0, 0)

    def link(self, src: str, dst: str) -> None:
        parent, name = self.split(dst)
        self.fs.link(self.resolve(src), parent, name)

    def unlink(self, path: str) -> None:
        parent, name = self.split(path)
        self.fs.unlink(parent, name, still_open=False)

    def rmdir(self, path: str) -> None:
        parent, name = self.split(path)
        self.fs.rmdir(parent, name)

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        old_parent, old_name = self.split(src)
        new_parent, new_name = self.split(dst)
        self.fs.rename(old_parent, old_name, new_parent, new_name, flags)

    def write(self, path: str, offset: int, data: bytes) -> None:
        write_file(self.fs, self.dev, self.resolve(path), offset, data)

    def truncate(self, path: str, size: int) -> None:
        self.fs.setattr(self.resolve(path), size=size)

    def chmod(self, path: str, mode: int) -> None:
        self.fs.setattr(self.resolve(path), mode=mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.fs.setattr(self.resolve(path), uid=uid, gid=gid)

    def setxattr(self, path: str, name: bytes, value: bytes, flags: int = 0) -> None:
        self.fs.setxattr(self.resolve(path), name, value, flags)

    def removexattr(self, path: str, name: bytes) -> None:
        self.fs.removexattr(self.resolve(path), name)

    def read(self, path: str) -> bytes:
        inode = self.fs.inode(self.resolve(path))
        return self.fs.read_bytes(inode, 0, inode.size)


def write_file(fs: WritableFilesystem, dev: BlockDevice, ino: int, offset: int,
               data: bytes) -> None:
    """What the iomap executor does for one write(2)."""
    if not data:
        return
    if fs.write_inline(ino, offset, data):
        return
    bs = fs.block_size
    first, last = offset // bs, (offset + len(data) - 1) // bs
    for run in fs.write_begin(fs.inode(ino), first, last - first + 1):
        start, end = run.lblk * bs, (run.lblk + run.length) * bs
        buf = bytearray(end - start)
        if not run.new:
            buf[:] = dev.pread(run.pblk * bs, end - start)
        lo, hi = max(offset, start), min(offset + len(data), end)
        buf[lo - start:hi - start] = data[lo - offset:hi - offset]
        dev.pwrite(run.pblk * bs, buf)
    fs.write_end(ino, offset + len(data), now_ns=None)


def pattern(seed: int, size: int) -> bytes:
    block = bytes((seed * 31 + i * 7) & 0xFF for i in range(251))
    return (block * (size // len(block) + 1))[:size]
