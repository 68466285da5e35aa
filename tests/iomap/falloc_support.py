"""The kernel's ext4 and ext4box side by side on copies of one image, for fallocate,
SEEK_DATA/SEEK_HOLE and copy_file_range.

`Twins` builds an image with mkfs.ext4 -d, copies it, loop-mounts one copy
read-write with the kernel and opens the other in-process (the facade and the
iomap engine, as the FUSE layer drives them). Each operation runs on both and
returns (kernel outcome, our outcome), an outcome being the result or the errno.
The test then compares what a user sees (sizes, st_blocks, content, the
SEEK_DATA/SEEK_HOLE sequence) and the extent layouts (the kernel's FIEMAP
against debugfs `ex` of our image: logical ranges and written/unwritten,
physical placement aside), unmounts, and runs e2fsck -fn on both images.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.format.inode import ROOT_INO
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.write.writable import WritableFilesystem
from ext4box.iomap.engine import IOMapEngine
from ext4box.iomap.seek import SEEK_DATA, SEEK_HOLE
from support.kernel import kernel_mount

KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
COLLAPSE_RANGE = 0x08
ZERO_RANGE = 0x10
INSERT_RANGE = 0x20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def kernel_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pattern(seed: int, size: int) -> bytes:
    block = bytes((seed * 31 + i * 7 + 1) & 0xFF for i in range(251))
    return (block * (size // len(block) + 1))[:size]


def _errno_of(err: BaseException) -> int:
    if isinstance(err, OSError):
        return err.errno or errno.EIO
    if isinstance(err, Ext4Error):
        return err.errno
    raise err


@dataclass(frozen=True)
class Extent:
    lblk: int
    length: int
    unwritten: bool


def _merge_into(merged: list[Extent], extent: Extent) -> None:
    """Append, merging with the last extent when logically adjacent and of one kind."""
    last = merged[-1] if merged else None
    if last and last.lblk + last.length == extent.lblk and last.unwritten == extent.unwritten:
        merged[-1] = Extent(last.lblk, last.length + extent.length, last.unwritten)
    else:
        merged.append(extent)


def debugfs_layout(image: Path, path: str) -> list[Extent]:
    """A file's mapped blocks as debugfs reads them from the image (leaf extents,
    or the logical ranges of a block map), logically adjacent ones of one kind
    merged: where the two allocators put the blocks is theirs to choose."""
    ex = subprocess.run(["debugfs", "-R", f"ex {path}", str(image)], capture_output=True,
                        text=True, check=True)
    out, ex_err = ex.stdout, ex.stderr
    leaf = re.compile(r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+\d+\s*-\s*\d+"
                      r"\s+(\d+)\s*(Uninit)?")
    merged: list[Extent] = []
    for line in out.splitlines():
        match = leaf.match(line)
        if match and match.group(1) == match.group(2):
            _merge_into(merged, Extent(int(match.group(3)), int(match.group(5)),
                                       match.group(6) is not None))
    if merged or "does not use" not in out + ex_err:
        return merged
    stat = subprocess.run(["debugfs", "-R", f"stat {path}", str(image)], capture_output=True,
                          text=True, check=True).stdout
    blocks = stat.split("BLOCKS:", 1)[1] if "BLOCKS:" in stat else ""
    for first, last in re.findall(r"\((\d+)(?:-(\d+))?\):", blocks):
        end = int(last or first)
        _merge_into(merged, Extent(int(first), end - int(first) + 1, False))
    return merged


def fiemap_layout(path: Path) -> list[Extent]:
    """The same, from the kernel's FIEMAP (filefrag -v) on a mounted file: unlike
    debugfs on the image, right even while another mount namespace still holds
    a copy of the mount (which keeps an unmount from writing the image out)."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True,
                         check=True).stdout
    row = re.compile(r"^\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*\d+\.\.\s*\d+:\s*(\d+):.*?$")
    merged: list[Extent] = []
    for line in out.splitlines():
        match = row.match(line)
        if not match or "inline" in line:  # an inline body is not an extent (debugfs agrees)
            continue
        _merge_into(merged, Extent(int(match.group(1)), int(match.group(3)),
                                   "unwritten" in line))
    return merged


def fiemap_extent_count(path: Path) -> int:
    """How many extents the kernel's FIEMAP reports for a mounted file (unmerged)."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return sum(1 for line in out.splitlines() if re.match(r"^\s*\d+:\s*\d+\.\.", line))


def tree_depth(image: Path, path: str) -> int:
    out = subprocess.run(["debugfs", "-R", f"ex {path}", str(image)], capture_output=True,
                         text=True, check=True).stdout
    levels = [int(m.group(1)) for m in re.finditer(r"^\s*\d+/\s*(\d+)\s", out, re.M)]
    return max(levels, default=0)


def make_image(workdir: Path, files: dict[str, bytes], *, block_size: int = 4096,
               size_mb: int = 32, mkfs_extra: tuple[str, ...] = ()) -> Path:
    src = workdir / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    image = workdir / "base.img"
    with image.open("wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", str(block_size), *mkfs_extra, "-d", str(src),
                    str(image)], check=True, capture_output=True)
    return image


@dataclass
class Twins:
    """One image, two copies: the kernel's mount and ours, driven by the same calls."""

    workdir: Path
    kernel_image: Path
    our_image: Path
    mnt: Path
    dev: BlockDevice
    fs: WritableFilesystem
    engine: IOMapEngine
    _mount: object
    fds: dict[str, int] = field(default_factory=dict)
    tree_block_differences: int = 0  # files whose st_blocks differ (compare_views)

    @classmethod
    def open(cls, workdir: Path, image: Path) -> Twins:
        kernel_image = workdir / "kernel.img"
        our_image = workdir / "ours.img"
        shutil.copyfile(image, kernel_image)
        shutil.copyfile(image, our_image)
        mnt = workdir / "mnt"
        mount = kernel_mount(kernel_image, mnt, readonly=False)
        mount.__enter__()
        dev = BlockDevice.open(str(our_image), writable=True)
        fs = open_filesystem(dev, readonly=False)
        assert isinstance(fs, WritableFilesystem)
        return cls(workdir, kernel_image, our_image, mnt, dev, fs, IOMapEngine(fs, dev), mount)

    # ---- paths and handles --------------------------------------------------

    def fd(self, name: str) -> int:
        if name not in self.fds:
            self.fds[name] = os.open(self.mnt / name, os.O_RDWR | os.O_CREAT, 0o644)
        return self.fds[name]

    def ino(self, name: str) -> int:
        found = self.fs.find(ROOT_INO, name.encode())
        if found is None:
            found = self.fs.create(ROOT_INO, name.encode(), 0o100644, 0, 0).ino
            self.engine.invalidate(found)
        return found

    # ---- operations: (kernel outcome, our outcome) ------------------------------

    def fallocate(self, name: str, mode: int, offset: int, length: int) -> tuple[object, object]:
        fd, ino = self.fd(name), self.ino(name)
        try:
            kernel_fallocate(fd, mode, offset, length)
            theirs: object = "ok"
        except OSError as err:
            theirs = errno.errorcode.get(_errno_of(err))
        try:
            self.engine.fallocate(ino, mode, offset, length, now_ns=time.time_ns())
            ours: object = "ok"
        except Exception as err:
            ours = errno.errorcode.get(_errno_of(err))
        return theirs, ours

    def write(self, name: str, offset: int, data: bytes) -> None:
        os.pwrite(self.fd(name), data, offset)
        ino = self.ino(name)
        self.engine.write(self.fs.inode(ino), offset, data, now_ns=time.time_ns())

    def truncate(self, name: str, size: int) -> None:
        os.ftruncate(self.fd(name), size)
        ino = self.ino(name)
        node = self.fs.inode(ino)
        if size > node.size:
            self.engine.zero_tail(node, size)
        self.fs.setattr(ino, size=size)
        self.engine.invalidate(ino)

    def copy(self, src: str, dst: str, src_pos: int, dst_pos: int,
             length: int) -> tuple[object, object]:
        try:
            theirs: object = os.copy_file_range(self.fd(src), self.fd(dst), length, src_pos,
                                                dst_pos)
        except OSError as err:
            theirs = errno.errorcode.get(_errno_of(err))
        try:
            ours: object = self.engine.copy_file_range(self.ino(src), src_pos, self.ino(dst),
                                                       dst_pos, length, now_ns=time.time_ns())
        except Exception as err:
            ours = errno.errorcode.get(_errno_of(err))
        return theirs, ours

    # ---- what a user sees ---------------------------------------------------------

    def settle_kernel(self) -> None:
        """fsync, then drop the clean pages: the kernel answers SEEK_DATA over
        unwritten extents from its page cache (see iomap/seek.py)."""
        for fd in self.fds.values():
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def kernel_view(self, name: str) -> dict[str, object]:
        fd = self.fd(name)
        st = os.fstat(fd)
        segments = _segments(lambda pos, whence: os.lseek(fd, pos, whence), st.st_size)
        return {"size": st.st_size, "blocks": st.st_blocks, "segments": segments,
                "content": _content(lambda pos, n: os.pread(fd, n, pos), st.st_size, segments)}

    def our_view(self, name: str) -> dict[str, object]:
        node = self.fs.inode(self.ino(name))
        segments = _segments(lambda pos, whence: self.engine.seek(
            self.fs.inode(node.ino), pos, whence), node.size)
        return {"size": node.size, "blocks": node.stat_blocks, "segments": segments,
                "content": _content(lambda pos, n: self.engine.read(node, pos, n), node.size,
                                    segments)}

    def compare_views(self, names: list[str], *, exact_blocks: bool = True) -> list[str]:
        """Differences in what a user sees. Without `exact_blocks`, st_blocks is
        compared as data blocks only (the kernel's FIEMAP against our mapping):
        how many extent-tree blocks a file needs depends on which of its extents
        touch on disk, and the kernel's allocator (preallocation windows,
        allocation at writeback) places blocks its own way."""
        self.settle_kernel()
        problems = []
        keys = ("size", "blocks" if exact_blocks else "data_blocks", "segments", "content")
        for name in names:
            theirs, ours = self.kernel_view(name), self.our_view(name)
            if not exact_blocks:
                theirs["data_blocks"] = sum(e.length for e in fiemap_layout(self.mnt / name))
                node = self.fs.inode(self.ino(name))
                ours["data_blocks"] = (0 if node.has_inline_data else sum(
                    run.length for run in self.fs.mapper_for(node).extents()))
                if theirs["blocks"] != ours["blocks"]:
                    self.tree_block_differences += 1
            for key in keys:
                if theirs[key] != ours[key]:
                    shown = (theirs[key], ours[key]) if key != "content" else (
                        _first_difference(theirs[key], ours[key]),)  # type: ignore[arg-type]
                    problems.append(f"{name}: {key}: kernel/ours {shown!s:.300}")
        return problems

    def remount_kernel(self) -> None:
        """Unmount and mount the kernel's copy again: its view from the image alone."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self._mount.__exit__(None, None, None)  # type: ignore[attr-defined]
        self._mount = kernel_mount(self.kernel_image, self.mnt, readonly=False)
        self._mount.__enter__()  # type: ignore[attr-defined]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        try:
            self._mount.__exit__(None, None, None)  # type: ignore[attr-defined]
        finally:
            try:
                self.fs.close()
            finally:
                self.dev.close()

    def kernel_layouts(self, names: list[str]) -> dict[str, list[Extent]]:
        """Before close: each file's extents as the kernel reports them (FIEMAP)."""
        self.settle_kernel()
        return {name: fiemap_layout(self.mnt / name) for name in names}

    def compare_layouts(self, kernel: dict[str, list[Extent]]) -> list[str]:
        """After close: each file's leaf extents on our image against `kernel`'s
        (logical ranges, unwritten or not)."""
        problems = []
        for name, theirs in kernel.items():
            ours = debugfs_layout(self.our_image, "/" + name)
            if theirs != ours:
                problems.append(f"{name}: layout kernel {theirs!s:.400} ours {ours!s:.400}")
        return problems


@contextmanager
def open_ours(image: Path) -> Iterator[tuple[WritableFilesystem, IOMapEngine]]:
    """The facade and the engine on `image`, closed (committed) afterwards."""
    dev = BlockDevice.open(str(image), writable=True)
    try:
        fs = open_filesystem(dev, readonly=False)
        assert isinstance(fs, WritableFilesystem)
        try:
            yield fs, IOMapEngine(fs, dev)
        finally:
            fs.close()
    finally:
        dev.close()


def _segments(lseek: Callable[[int, int], int], size: int) -> list[tuple[int, int]]:
    """[(data_start, hole_start), ...] found by alternating SEEK_DATA and SEEK_HOLE."""
    out: list[tuple[int, int]] = []
    pos = 0
    for _ in range(100_000):  # a file has fewer data segments than this in any test
        if pos >= size:
            break
        try:
            start = lseek(pos, SEEK_DATA)
        except (OSError, Ext4Error) as err:
            if _errno_of(err) == errno.ENXIO:
                break
            raise
        end = lseek(start, SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


# Files up to this size are read whole; larger (sparse) ones in their data
# segments and their first and last MiB.
_WHOLE_READ = 64 << 20


def _content(pread: Callable[[int, int], bytes], size: int,
             segments: list[tuple[int, int]]) -> bytes:
    if size <= _WHOLE_READ:
        return pread(0, size) if size else b""
    pieces = [(0, 1 << 20), (size - (1 << 20), 1 << 20)]
    pieces += [(start, min(end - start, _WHOLE_READ)) for start, end in segments]
    return b"".join(pread(pos, length) for pos, length in pieces)


def _first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"lengths {len(a)} vs {len(b)}"
    for index in range(0, len(a), 4096):
        if a[index:index + 4096] != b[index:index + 4096]:
            return f"first differing 4 KiB chunk at byte {index}"
    return "equal"


def e2fsck_clean(image: Path) -> str | None:
    result = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                            check=False)
    return None if result.returncode == 0 else result.stdout + result.stderr
