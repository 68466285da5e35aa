"""Oracles for ext4 tests: build images, ask e2fsprogs and the kernel about them.

Everything here shells out to mkfs.ext4, dumpe2fs and debugfs (e2fsprogs 1.47)
or uses a kernel loop mount, so tests compare our parsers with independent
implementations rather than with themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def run(cmd: list[str], **kwargs: object) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def make_image(path: Path, size_mb: int, *mkfs_args: str, root_dir: Path | None = None) -> Path:
    """A fresh image of `size_mb` MiB made by mkfs.ext4 with `mkfs_args` (and -d root_dir)."""
    path.unlink(missing_ok=True)
    with path.open("wb") as image:
        image.truncate(size_mb * 1024 * 1024)
    cmd = ["mkfs.ext4", "-q", "-F", *mkfs_args]
    if root_dir is not None:
        cmd += ["-d", str(root_dir)]
    run([*cmd, str(path)])
    return path


@contextlib.contextmanager
def loop_mount(image: Path, options: str = "") -> Iterator[Path]:
    """Mount `image` with the kernel's ext4 on a private directory; always unmounts.

    `mount -o loop` sets autoclear on the loop device, so unmounting detaches it.
    """
    mountpoint = Path(tempfile.mkdtemp(prefix="ext4box-mnt-"))
    opts = "loop" + ("," + options if options else "")
    run(["mount", "-t", "ext4", "-o", opts, str(image), str(mountpoint)])
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def debugfs(image: Path, request: str) -> str:
    return run(["debugfs", "-R", request, str(image)])


def superblock_fields(image: Path) -> dict[str, str]:
    """`dumpe2fs -h` as a dict of field name -> value text."""
    fields = {}
    for line in run(["dumpe2fs", "-h", str(image)]).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


@dataclass(frozen=True)
class FsInfo:
    block_size: int
    blocks_count: int
    inode_size: int
    features: frozenset[str]
    csum_seed: int  # the filesystem-wide crc32c seed (meaningful with metadata_csum)

    @property
    def metadata_csum(self) -> bool:
        return "metadata_csum" in self.features


def fs_info(image: Path) -> FsInfo:
    from ext4box.ext4.format.checksum import ext4_csum_seed

    fields = superblock_fields(image)
    features = frozenset(fields.get("Filesystem features", "").split())
    if "Checksum seed" in fields:
        seed = int(fields["Checksum seed"], 0)
    else:
        seed = ext4_csum_seed(uuid.UUID(fields["Filesystem UUID"]).bytes)
    return FsInfo(int(fields["Block size"]), int(fields["Block count"]),
                  int(fields.get("Inode size", "128")), features, seed)


@dataclass(frozen=True)
class RawInode:
    ino: int
    raw: bytes

    @property
    def i_block(self) -> bytes:
        return self.raw[40:100]

    @property
    def flags(self) -> int:
        return int.from_bytes(self.raw[32:36], "little")

    @property
    def generation(self) -> int:
        return int.from_bytes(self.raw[100:104], "little")

    @property
    def size(self) -> int:
        return int.from_bytes(self.raw[4:8], "little") | (
            int.from_bytes(self.raw[108:112], "little") << 32)


_IMAP = re.compile(r"Inode (\d+) is part of block group \d+\s+located at block (\d+), "
                   r"offset (0x[0-9a-f]+)")


def raw_inode(image: Path, path: str, info: FsInfo) -> RawInode:
    """The on-disk inode of `path`, located by debugfs `imap` and read from the image."""
    match = _IMAP.search(debugfs(image, f"imap {path}"))
    if match is None:
        raise RuntimeError(f"debugfs imap found no inode for {path}")
    ino, block, offset = int(match[1]), int(match[2]), int(match[3], 16)
    with image.open("rb") as f:
        f.seek(block * info.block_size + offset)
        return RawInode(ino, f.read(info.inode_size))


@dataclass(frozen=True)
class ExtentListing:
    depth: int
    leaves: list[tuple[int, int, int, bool]]  # (lblk, length, pblk, unwritten)
    node_blocks: list[int]  # blocks index entries point to, in listing order


_EX_LEAF = re.compile(r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*-\s*(\d+)"
                      r"\s+(\d+)\s*(Uninit)?\s*$")
_EX_INDEX = re.compile(r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+\d+\s*-\s*\d+\s+(\d+)\s+\d+\s*$")


def extent_listing(image: Path, path: str) -> ExtentListing:
    """debugfs `ex` parsed: leaf extents and the tree blocks below the root."""
    leaves = []
    nodes = []
    depth = 0
    for line in debugfs(image, f"ex {path}").splitlines()[1:]:
        if m := _EX_LEAF.match(line):
            depth = int(m[2])
            lblk, last, pblk, plast, length = (int(m[i]) for i in range(3, 8))
            assert last - lblk + 1 == length == plast - pblk + 1, line
            leaves.append((lblk, length, pblk, m[8] is not None))
        elif m := _EX_INDEX.match(line):
            depth = int(m[2])
            nodes.append(int(m[3]))
        elif line.strip():
            raise AssertionError(f"unparsed debugfs ex line: {line!r}")
    return ExtentListing(depth, leaves, nodes)


@dataclass(frozen=True)
class BlockListing:
    data: list[tuple[int, int, int]]  # (lblk, length, pblk): logically and physically contiguous
    tree_blocks: list[int]  # (IND)/(DIND)/(TIND) blocks in listing order


_STAT_ITEM = re.compile(r"\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?|\((?:IND|DIND|TIND)\):(\d+)")


def block_listing(image: Path, path: str) -> BlockListing:
    """The BLOCKS section of debugfs `stat` parsed (indirect-mapped files)."""
    text = debugfs(image, f"stat {path}")
    _, _, section = text.partition("BLOCKS:\n")
    section = section.split("TOTAL:")[0]
    data = []
    tree = []
    for m in _STAT_ITEM.finditer(section):
        if m[5] is not None:
            tree.append(int(m[5]))
            continue
        first = int(m[1])
        last = int(m[2]) if m[2] else first
        pblk = int(m[3])
        plast = int(m[4]) if m[4] else pblk
        assert last - first == plast - pblk
        data.append((first, last - first + 1, pblk))
    return BlockListing(data, tree)


def xattr_value(image: Path, path: str, name: str) -> bytes | None:
    """One extended attribute value as debugfs `ea_get` returns it; None if absent."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "value"
        result = subprocess.run(["debugfs", "-R", f"ea_get -f {out} {path} {name}", str(image)],
                                capture_output=True, text=True, check=False)
        if not out.exists() or "not found" in result.stderr.lower():
            return None
        return out.read_bytes()


def image_block_reader(image: Path, block_size: int):  # -> Callable[[int], bytes]
    """read_block for an image file (the test's stand-in for the metadata cache)."""
    data = image.read_bytes()
    return memory_block_reader(data, block_size)


def memory_block_reader(data: bytes | bytearray, block_size: int):  # -> Callable[[int], bytes]
    def read_block(block: int) -> bytes:
        start = block * block_size
        if block < 0 or start + block_size > len(data):
            raise AssertionError(f"test read of block {block} outside the image")
        return bytes(data[start:start + block_size])

    return read_block


def bounds_checker(blocks_count: int):  # -> RunChecker
    """check_run for tests: the run must lie inside [1, blocks_count)."""
    from ext4box.ext4.format.errors import Corrupt

    def check_run(pblk: int, length: int) -> None:
        if pblk < 1 or length < 1 or pblk + length > blocks_count:
            raise Corrupt("block run", f"block {pblk}", f"{length} blocks outside the device")

    return check_run


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) through libc."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, 0x02 | 0x01, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class SparseDigest:
    """sha256 over (block number, bytes) of every block that is not all zeros.

    Two files of equal size have equal digests exactly when their contents are
    equal, and the digest can be computed without reading gigabytes of holes.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._zero = bytes(block_size)
        self._hash = hashlib.sha256()

    def add(self, lblk: int, data: bytes) -> None:
        """Feed whole blocks starting at logical block `lblk`, in increasing order."""
        bs = self.block_size
        for offset in range(0, len(data), bs):
            block = data[offset:offset + bs]
            if block != self._zero[:len(block)]:
                self._hash.update((lblk + offset // bs).to_bytes(8, "little"))
                self._hash.update(block)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def sparse_file_digest(path: Path, block_size: int) -> str:
    """SparseDigest of a file read through the kernel, skipping holes with SEEK_DATA."""
    digest = SparseDigest(block_size)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            start -= start % block_size
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for offset in range(start, end, 1 << 20):
                chunk = os.pread(fd, min(1 << 20, end - offset), offset)
                if len(chunk) % block_size:  # the partial last block of the file
                    chunk += bytes(block_size - len(chunk) % block_size)
                digest.add(offset // block_size, chunk)
            pos = end
    finally:
        os.close(fd)
    return digest.hexdigest()
