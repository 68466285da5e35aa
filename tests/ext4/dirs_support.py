"""Helpers for the directory tests: build images, ask debugfs/dumpe2fs, open a directory.

Everything here reads what e2fsprogs reports about an image, so the tests
compare our parsers against independent tools, never against themselves.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ext4box.ext4.format import checksum
from ext4box.ext4.format.dir_hash import EXT2_FLAGS_UNSIGNED_HASH, hash_seed_words
from ext4box.ext4.read.directory import DirectoryReader
from support.kernel import kernel_mount, why_no_kernel_mounts

EXT4_INDEX_FL = 0x1000
EXT4_INLINE_DATA_FL = 0x10000000
HASH_VERSIONS = {"legacy": 0, "half_md4": 1, "tea": 2}


def need_tools() -> None:
    for tool in ("mkfs.ext4", "debugfs", "dumpe2fs", "tune2fs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def need_kernel() -> None:
    reason = why_no_kernel_mounts()
    if reason is not None:
        pytest.skip(reason)


def run(argv: list[str | bytes | Path]) -> bytes:
    result = subprocess.run(argv, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{argv!r} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout


def debugfs(image: Path, request: str | bytes, *, writable: bool = False) -> bytes:
    argv: list[str | bytes | Path] = ["debugfs"]
    if writable:
        argv.append("-w")
    return run([*argv, "-R", request, image])


def debugfs_script(image: Path, requests: list[bytes], script: Path) -> bytes:
    """Many read-only requests in one debugfs run (much faster than one run each)."""
    script.write_bytes(b"\n".join(requests) + b"\n")
    return run(["debugfs", "-f", script, image])


def mkfs(
    image: Path,
    size_mb: int,
    *,
    block_size: int = 1024,
    features: str = "",
    inodes: int | None = None,
    inode_size: int = 256,
    source: Path | None = None,
) -> Path:
    if image.exists():
        image.unlink()
    argv: list[str | bytes | Path] = ["mkfs.ext4", "-q", "-F", "-b", str(block_size)]
    argv += ["-I", str(inode_size)]
    if features:
        argv += ["-O", features]
    if inodes is not None:
        argv += ["-N", str(inodes)]
    if source is not None:
        argv += ["-d", source]
    run([*argv, image, f"{size_mb}M"])
    return image


@dataclass(frozen=True)
class SuperInfo:
    block_size: int
    inodes_count: int
    features: frozenset[str]
    uuid: bytes
    hash_seed: tuple[int, int, int, int]
    default_hash: int
    unsigned_hash: bool
    checksum_seed: int | None

    @property
    def metadata_csum(self) -> bool:
        return "metadata_csum" in self.features

    @property
    def fs_csum_seed(self) -> int:
        if self.checksum_seed is not None:
            return self.checksum_seed
        return checksum.ext4_csum_seed(self.uuid)


def super_info(image: Path) -> SuperInfo:
    text = run(["dumpe2fs", "-h", image]).decode()
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    flags = fields.get("Filesystem flags", "")
    features = frozenset(fields["Filesystem features"].split())
    seed = fields.get("Checksum seed")
    return SuperInfo(
        block_size=int(fields["Block size"]),
        inodes_count=int(fields["Inode count"]),
        features=features,
        uuid=uuid.UUID(fields["Filesystem UUID"]).bytes,
        hash_seed=hash_seed_words(uuid.UUID(fields["Directory Hash Seed"]).bytes),
        default_hash=HASH_VERSIONS[fields["Default directory hash"]],
        unsigned_hash="unsigned_directory_hash" in flags,
        checksum_seed=int(seed, 16)
        if seed is not None and "metadata_csum_seed" in features
        else None,
    )


@dataclass(frozen=True)
class InodeInfo:
    ino: int
    flags: int
    size: int
    generation: int


def inode_info(image: Path, spec: str) -> InodeInfo:
    """`spec` is a path inside the image or "<ino>"."""
    text = debugfs(image, f"stat {spec}").decode(errors="replace")
    ino = re.search(r"Inode: (\d+)", text)
    flags = re.search(r"Flags: (0x[0-9a-f]+)", text)
    size = re.search(r"Size: (\d+)", text)
    gen = re.search(r"Generation: (\d+)", text)
    assert ino and flags and size and gen, text
    return InodeInfo(int(ino[1]), int(flags[1], 16), int(size[1]), int(gen[1]))


def extent_map(image: Path, ino: int) -> dict[int, int]:
    """logical block -> physical block, from debugfs's extent dump (leaf level only)."""
    text = debugfs(image, f"ex <{ino}>").decode()
    mapping: dict[int, int] = {}
    pattern = re.compile(
        r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*-\s*(\d+)\s+\d+\s*(\S*)"
    )
    for line in text.splitlines():
        m = pattern.match(line)
        if m is None or m[1] != m[2]:
            continue
        if m[7] == "Uninit":
            continue
        first, last, pblk = int(m[3]), int(m[4]), int(m[5])
        for i in range(last - first + 1):
            mapping[first + i] = pblk + i
    return mapping


def parse_hexdump(text: str) -> bytes:
    """debugfs's inode_dump format: octal offsets, 16 bytes a line, '*' for repeats."""
    out = bytearray()
    previous = b""
    repeating = False
    for line in text.splitlines():
        if line.strip() == "*":
            repeating = True
            continue
        m = re.match(r"^([0-7]{4,})  ((?:[0-9a-f]{4} ?){1,8})", line)
        if m is None:
            continue
        offset = int(m[1], 8)
        if repeating:
            while len(out) < offset:
                out += previous
            repeating = False
        chunk = bytes.fromhex(m[2].replace(" ", ""))
        out[offset : offset + len(chunk)] = chunk
        previous = chunk
    return bytes(out)


def inline_body(image: Path, ino: int, tmp: Path) -> bytes:
    i_block = parse_hexdump(debugfs(image, f"inode_dump -b <{ino}>").decode())
    i_block = i_block.ljust(60, b"\0")[:60]
    value_file = tmp / f"system-data-{ino}"
    if value_file.exists():
        value_file.unlink()
    debugfs(image, f"ea_get -f {value_file} <{ino}> system.data")
    value = value_file.read_bytes() if value_file.exists() else b""
    return i_block + value


class ImageBlocks:
    """Reads directory blocks straight from the image file, mapped via debugfs."""

    def __init__(self, image: Path, block_size: int) -> None:
        self.image = image
        self.block_size = block_size

    def read_pblk(self, pblk: int) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(pblk * self.block_size)
            return f.read(self.block_size)


def open_directory(image: Path, spec: str, tmp: Path, **overrides: object) -> DirectoryReader:
    """A DirectoryReader fed only by what dumpe2fs/debugfs say about the image."""
    sb = super_info(image)
    info = inode_info(image, spec)
    csum_seed = None
    if sb.metadata_csum:
        csum_seed = checksum.inode_csum_seed(sb.fs_csum_seed, info.ino, info.generation)
    body = None
    mapping: dict[int, int] = {}
    if info.flags & EXT4_INLINE_DATA_FL:
        body = inline_body(image, info.ino, tmp)
    else:
        mapping = extent_map(image, info.ino)
    blocks = ImageBlocks(image, sb.block_size)

    def read_lblk(lblk: int) -> bytes | None:
        pblk = mapping.get(lblk)
        return None if pblk is None else blocks.read_pblk(pblk)

    kwargs: dict[str, object] = dict(
        ino=info.ino,
        size=info.size,
        block_size=sb.block_size,
        read_lblk=read_lblk,
        indexed=bool(info.flags & EXT4_INDEX_FL),
        has_filetype="filetype" in sb.features,
        csum_seed=csum_seed,
        hash_seed=sb.hash_seed,
        default_hash_version=sb.default_hash,
        unsigned_hash=sb.unsigned_hash,
        max_ino=sb.inodes_count,
        inline_body=body,
        large_dir="large_dir" in sb.features,
    )
    kwargs.update(overrides)
    return DirectoryReader(**kwargs)  # type: ignore[arg-type]


def debugfs_ls(image: Path, spec: str) -> list[tuple[int, bytes]]:
    """(inode, name) of live entries as debugfs `ls -p` lists them, in its order."""
    return [(ino, name) for ino, _, name in debugfs_ls_modes(image, spec)]


def debugfs_ls_modes(image: Path, spec: str) -> list[tuple[int, int, bytes]]:
    """(inode, mode, name) of live entries per `ls -p` (it also prints free records: inode 0)."""
    out = debugfs(image, f"ls -p {spec}")
    entries = []
    for line in out.splitlines():
        if not line.startswith(b"/"):
            continue
        # /ino/mode/uid/gid/name/size/ ; names cannot contain '/'
        parts = line.split(b"/")
        if int(parts[1]) != 0:
            entries.append((int(parts[1]), int(parts[2], 8), parts[5]))
    return entries


def set_unsigned_hash(image: Path) -> None:
    debugfs(image, f"ssv flags {EXT2_FLAGS_UNSIGNED_HASH}", writable=True)


@contextmanager
def mounted(image: Path, mountpoint: Path, *, readonly: bool) -> Iterator[Path]:
    with kernel_mount(image, mountpoint, readonly=readonly) as mnt:
        yield mnt


def populate_kernel(
    image: Path, mountpoint: Path, dirs: dict[str, list[bytes]], *, unlink_every: int = 0
) -> None:
    """Create empty files named `names` in each directory through the kernel's ext4."""
    with mounted(image, mountpoint, readonly=False) as mnt:
        for rel, names in dirs.items():
            d = mnt / rel
            d.mkdir(parents=True, exist_ok=True)
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for name in names:
                    os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
                if unlink_every:
                    for name in names[::unlink_every]:
                        os.unlink(name, dir_fd=dfd)
            finally:
                os.close(dfd)


def kernel_listing(mountpoint: Path, rel: str) -> list[bytes]:
    """Names `ls -f` prints (kernel order, "." and ".." included)."""
    out = run(["ls", "-f", mountpoint / rel])
    return out.split(b"\n")[:-1]


def big_names(count: int, seed: int = 1) -> list[bytes]:
    """Distinct names of varied length (so leaves split at varied points)."""
    import random

    rng = random.Random(seed)
    return [f"entry-{i:05d}-".encode() + b"x" * rng.randint(0, 40) for i in range(count)]


def high_byte_names(count: int) -> list[bytes]:
    """Names whose bytes >= 0x80 make signed and unsigned hashes differ."""
    return [b"\xe9t\xe9-" + f"{i:04d}".encode() + b"-\xfc\xff" for i in range(count)]


_IMAGES: dict[tuple[object, ...], Path] = {}


def kernel_dirs_image(
    base: Path,
    *,
    csum: bool = True,
    big: int = 20000,
    hash_alg: str | None = None,
    unsigned: bool = False,
    extra_features: str = "",
) -> Path:
    """A 1k-block image whose directories were filled by the kernel (cached per session).

    big/: `big` files, every 7th removed again (free records in leaves), a 2-level htree;
    small/: a linear directory with one entry of each file type;
    high/: names with bytes >= 0x80, indexed, to tell signed and unsigned hashes apart.
    """
    key = (csum, big, hash_alg, unsigned, extra_features)
    if key in _IMAGES:
        return _IMAGES[key]
    need_tools()
    need_kernel()
    name = f"dirs-{'csum' if csum else 'nocsum'}-{big}-{hash_alg}-{unsigned}-{len(_IMAGES)}.img"
    features = ("metadata_csum" if csum else "^metadata_csum") + extra_features
    image = mkfs(base / name, 48, features=features, inodes=big + 2048)
    if hash_alg is not None:
        run(["tune2fs", "-E", f"hash_alg={hash_alg}", image])
    if unsigned:
        set_unsigned_hash(image)
    mnt = base / (name + ".mnt")
    populate_kernel(image, mnt, {"big": big_names(big)}, unlink_every=7)
    with mounted(image, mnt, readonly=False) as root:
        small = root / "small"
        small.mkdir()
        (small / "file").write_bytes(b"data")
        (small / "subdir").mkdir()
        os.symlink("file", small / "link")
        os.mkfifo(small / "fifo")
        os.mknod(small / "chr", 0o600 | 0o020000, os.makedev(1, 3))
        os.mknod(small / "blk", 0o600 | 0o060000, os.makedev(7, 0))
        import socket

        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(small / "sock"))
        finally:
            sock.close()
        high = root / "high"
        high.mkdir()
        for n in high_byte_names(300):
            os.close(os.open(os.path.join(os.fsencode(high), n), os.O_CREAT | os.O_WRONLY, 0o644))
    _IMAGES[key] = image
    return image
