"""Images whose journal needs recovery, and the references to check a replay against.

Kernel crash snapshots: the kernel writes through a loop mount with a long
commit interval, each step is committed by fsync(2) of the mount's root (one
jbd2 commit), and the image file is copied while still mounted: the copy is
what a crash at that moment leaves (needs_recovery set, transactions in the
journal, stale metadata in place). Not syncfs(2): after committing it also
writes the block device's dirty metadata in place, and the journal would then
only repeat what the image already holds. The reference replay is e2fsck's (`-E journal_only`),
whose recovery code is the kernel's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ext4box.blockdev import BlockDevice
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.read.filesystem import Filesystem
from support.images import dumpe2fs_header
from support.kernel import kernel_mount
from support.walk import Entry, walk

Step = Callable[[Path], None]
_LOGDUMP_LINE = re.compile(r"Found expected sequence (\d+), type (\d+) \(.*\) at block (\d+)")


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, errors="replace", check=False)


def crash_snapshot(image: Path, snapshot: Path, workdir: Path, steps: list[Step],
                   options: str = "") -> Path:
    """Run `steps` on a kernel rw mount of `image` (one syncfs after each), copy the
    image to `snapshot` while mounted, then unmount."""
    opts = "commit=600" + (f",{options}" if options else "")
    with kernel_mount(image, workdir / "crash-mnt", readonly=False, options=opts) as mnt:
        for step in steps:
            step(mnt)
            fsync_path(mnt)
        shutil.copyfile(image, snapshot)
    return snapshot


def logdump(image: Path) -> list[tuple[int, int, int]]:
    """(sequence, block type, journal block) of every block debugfs's logdump finds."""
    out = run(["debugfs", "-c", "-n", "-R", "logdump", str(image)]).stdout
    return [(int(s), int(t), int(b)) for s, t, b in _LOGDUMP_LINE.findall(out)]


def journal_device_block(image: Path, journal_block: int) -> int:
    out = run(["debugfs", "-c", "-n", "-R", f"bmap <8> {journal_block}", str(image)]).stdout
    return int(out.strip().splitlines()[-1])


def needs_recovery(image: Path) -> bool:
    return "needs_recovery" in dumpe2fs_header(image)["Filesystem features"]


def e2fsck_replayed(image: Path, out: Path) -> Path:
    """A copy of `image` with its journal replayed by e2fsck (and nothing else)."""
    shutil.copyfile(image, out)
    result = run(["e2fsck", "-E", "journal_only", "-y", str(out)])
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return out


def e2fsck_clean(image: Path) -> None:
    result = run(["e2fsck", "-fn", str(image)])
    assert result.returncode == 0, result.stdout + result.stderr


def block_size(image: Path) -> int:
    return int(dumpe2fs_header(image)["Block size"])


def differing_blocks(a: bytes, b: bytes, bs: int) -> list[int]:
    assert len(a) == len(b)
    return [i for i in range(len(a) // bs) if a[i * bs : (i + 1) * bs] != b[i * bs : (i + 1) * bs]]


def superblock_block(bs: int) -> int:
    return 1024 // bs


@contextmanager
def opened(image: Path, *, readonly: bool) -> Iterator[Filesystem]:
    dev = BlockDevice.open(str(image), writable=not readonly)
    try:
        fs = open_filesystem(dev, readonly=readonly)
        try:
            yield fs
        finally:
            fs.close()
    finally:
        dev.close()


def read_all_blocks(fs: Filesystem) -> bytes:
    """The whole device as the opened filesystem sees it (the overlay for a read-only open)."""
    return fs.dev.pread(0, fs.dev.size)


def kernel_walk(image: Path, workdir: Path) -> dict[str, Entry | str]:
    """The kernel's view of `image`: a copy is recovered by a kernel rw mount first."""
    workdir.mkdir(parents=True, exist_ok=True)
    copy = workdir / (image.name + ".kernel")
    shutil.copyfile(image, copy)
    if needs_recovery(copy):
        with kernel_mount(copy, workdir / "recover-mnt", readonly=False):
            pass
    with kernel_mount(copy, workdir / "walk-mnt", readonly=True) as mnt:
        return walk(mnt)


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync (ordered mode: the data is on the device before the commit)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Commit the running transaction (fsync of anything on the filesystem does)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
