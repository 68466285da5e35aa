"""Do long create/unlink/rename sequences leave directories the kernel's ext4 reads as we do?

The directory writer edits blocks incrementally (spliced bytes, carried-over
name index and room summary, memoized index parses and name hashes). Here a
seeded sequence of creates, unlinks, renames within and between directories
and re-creates into freed slots runs through WritableFilesystem on htree and
linear directories, 1 KiB and 4 KiB blocks; then e2fsck -fn must be clean and
the kernel's listing of every directory (names and inode numbers) must equal
the one we expect and the one our own reader gives.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from dirs_support import mkfs, need_kernel, need_tools

from ext4box.blockdev import BlockDevice
from ext4box.ext4.opening import open_filesystem
from support.kernel import kernel_mount

ROOT = 2


def _replay(image: Path, files: int, seed: int) -> dict[str, dict[bytes, int]]:
    """Run the sequence; returns, per directory, the names and inodes it must hold."""
    rng = random.Random(seed)
    fs = open_filesystem(BlockDevice.open(str(image), writable=True), readonly=False)
    try:
        big = fs.mkdir(ROOT, b"big", 0o40755, 0, 0).ino
        small = fs.mkdir(ROOT, b"small", 0o40755, 0, 0).ino
        expect: dict[str, dict[bytes, int]] = {"big": {}, "small": {}}
        where = {"big": big, "small": small}
        for i in range(files):
            name = f"f{i:05d}-".encode() + b"n" * rng.randint(0, 60)
            expect["big"][name] = fs.create(big, name, 0o100644, 0, 0).ino
        for i in range(files // 8):
            name = f"s{i}-".encode() + b"q" * rng.randint(0, 30)
            expect["small"][name] = fs.create(small, name, 0o100644, 0, 0).ino
        gone: list[tuple[str, bytes]] = []
        for rel in ("big", "small"):
            for name in rng.sample(sorted(expect[rel]), len(expect[rel]) // 2):
                fs.unlink(where[rel], name, still_open=False)
                del expect[rel][name]
                gone.append((rel, name))
        for i, name in enumerate(rng.sample(sorted(expect["big"]), files // 10)):
            to = "small" if i % 2 else "big"
            new_name = name[:8] + b".r%d" % i
            fs.rename(big, name, where[to], new_name)
            expect[to][new_name] = expect["big"].pop(name)
        for i in range(files // 3):
            rel = "big" if i % 4 else "small"
            name = b"again-%d-" % i + b"z" * rng.randint(0, 90)
            expect[rel][name] = fs.create(where[rel], name, 0o100644, 0, 0).ino
        for rel, name in rng.sample(gone, len(gone) // 4):  # names freed above come back
            expect[rel][name] = fs.create(where[rel], name, 0o100644, 0, 0).ino
        fs.commit(durable=True)
    finally:
        fs.close()
    return expect


def _our_listing(image: Path, rel: str) -> dict[bytes, int]:
    fs = open_filesystem(BlockDevice.open(str(image), writable=False))
    try:
        dir_ino = fs.lookup(ROOT, rel.encode())
        return {item.name: item.ino for item in fs.readdir(dir_ino)
                if item.name not in (b".", b"..")}  # fmt: skip
    finally:
        fs.close()


@pytest.mark.parametrize(
    ("block_size", "features", "files"),
    [(4096, "", 3000), (1024, "", 3000), (1024, "^dir_index", 600),
     (4096, "^metadata_csum,^dir_index", 600)],
)  # fmt: skip
def test_edit_sequence_reads_the_same_in_the_kernel(
    tmp_path: Path, block_size: int, features: str, files: int
) -> None:
    need_tools()
    need_kernel()
    image = mkfs(tmp_path / "img", 64, block_size=block_size, features=features, inodes=16384)
    expect = _replay(image, files, seed=block_size + files)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    ours = {rel: _our_listing(image, rel) for rel in expect}
    assert ours == expect
    with kernel_mount(image, tmp_path / "mnt", readonly=True) as mnt:
        for rel, names in expect.items():
            listed = {e.name: e.inode() for e in os.scandir(os.fsencode(mnt / rel))}
            assert listed == names, f"{rel}: {sorted(set(listed) ^ set(names))[:5]}"
