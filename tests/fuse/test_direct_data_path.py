"""The data path of large reads and writes: O_DIRECT to the image, a reused reply buffer.

Runs of >= 128 KiB aligned to 4 KiB reach the image through a second,
O_DIRECT description of it (iomap/direct_io.py), and the native session makes
every READ reply in one reused page-aligned buffer (IOMapEngine.execute_into).
What must hold: every read gives the kernel's bytes on the same image — across
extent boundaries, holes, unwritten extents and a short tail, right after the
buffer held other data; O_DIRECT and buffered writes of every size give the
kernel's file and an e2fsck-clean image; and the streamed data did not pass
through the image's page cache (fincore on the image file), which is what the
change is for.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support.kernel import kernel_mount, why_no_kernel_mounts
from support.serve import ext4box_argv, fuse_backend, served, why_no_fuse

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

KIB = 1024
MIB = 1024 * KIB
FALLOC_FL_KEEP_SIZE = 1


def _skip_unless_possible() -> None:
    reason = why_no_kernel_mounts() or why_no_fuse()
    if reason is not None:
        pytest.skip(reason)


def _make_image(path: Path) -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "root_owner=0:0", str(path),
                    "128M"], check=True, capture_output=True)  # fmt: skip
    return path


def _fsck_clean(image: Path) -> None:
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, f"e2fsck -fn {image}:\n{check.stdout}\n{check.stderr}"


def _block(seed: int, size: int) -> bytes:
    """Deterministic non-zero bytes (a hole or stale zeros would show)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def _build_layout(root: Path) -> None:
    """On the kernel's ext4: files whose extents, holes and unwritten ranges the reads cross.

    `mixed` and `other` are written in alternating 192 KiB pieces, each
    fsynced, so their extents interleave on the device: a 1 MiB read of
    `mixed` crosses several extents. Then a hole, an unwritten (fallocated)
    range with written data inside it, and a tail ending inside a block.
    """
    mixed = os.open(root / "mixed", os.O_WRONLY | os.O_CREAT, 0o644)
    other = os.open(root / "other", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        piece = 192 * KIB
        for index in range(16):  # 3 MiB each
            os.pwrite(mixed, _block(index, piece), index * piece)
            os.fsync(mixed)
            os.pwrite(other, _block(100 + index, piece), index * piece)
            os.fsync(other)
        # 3 MiB .. 4 MiB + 8 KiB: a hole. Then 2 MiB unwritten, 64 KiB written inside.
        unwritten_at = 4 * MIB + 8 * KIB
        os.posix_fallocate(mixed, unwritten_at, 2 * MIB)
        os.pwrite(mixed, _block(200, 64 * KIB), unwritten_at + 512 * KIB)
        # A tail of 1 MiB + 5,000 bytes, ending inside a block.
        tail_at = unwritten_at + 2 * MIB
        os.pwrite(mixed, _block(300, MIB + 5000), tail_at)
        os.fsync(mixed)
        # Beyond i_size, still allocated (KEEP_SIZE): never readable.
        fd_size = os.fstat(mixed).st_size
        _fallocate(mixed, FALLOC_FL_KEEP_SIZE, fd_size, MIB)
    finally:
        os.close(mixed)
        os.close(other)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# (offset, size) of the reads, each O_DIRECT and buffered: whole MiBs crossing
# extents, 128 KiB (the direct threshold) and 4 KiB (stays buffered), ranges
# over the hole and the unwritten extent, and reads that end past EOF.
_PROBES = (
    (0, MIB), (MIB, MIB), (2 * MIB, MIB), (3 * MIB, MIB), (4 * MIB, MIB),
    (3 * MIB - 128 * KIB, 256 * KIB), (4 * MIB, 128 * KIB), (4 * MIB + 512 * KIB, 128 * KIB),
    (4 * MIB + 8 * KIB, 2 * MIB), (5 * MIB, MIB), (6 * MIB, MIB), (7 * MIB, MIB),
    (7 * MIB, 128 * KIB), (12 * KIB, 4 * KIB), (4 * MIB + 520 * KIB, 4 * KIB),
    (0, 8 * MIB),
)  # fmt: skip


def _read_at(fd: int, offset: int, size: int, buf: mmap.mmap) -> bytes:
    view = memoryview(buf)[:size]
    got = os.preadv(fd, [view], offset)
    return bytes(view[:got])


def _probe_reads(root: Path) -> list[tuple[str, int, int, str]]:
    """Every probe, O_DIRECT and buffered, each right after a 1 MiB read of other data."""
    results = []
    buf = mmap.mmap(-1, 8 * MIB)  # page-aligned, as O_DIRECT needs
    direct = os.open(root / "mixed", os.O_RDONLY | os.O_DIRECT)
    buffered = os.open(root / "mixed", os.O_RDONLY)
    filler = os.open(root / "other", os.O_RDONLY | os.O_DIRECT)
    try:
        for kind, fd in (("direct", direct), ("buffered", buffered)):
            for index, (offset, size) in enumerate(_PROBES):
                # The reply buffer now holds non-zero bytes of another file.
                _read_at(filler, (index % 3) * MIB, MIB, buf)
                data = _read_at(fd, offset, size, buf)
                results.append((kind, offset, size, hashlib.sha256(data).hexdigest()))
    finally:
        for fd in (direct, buffered, filler):
            os.close(fd)
        buf.close()
    return results


def _resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return int(out.split()[0])


def _drop_image_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _why_no_residency_check(image: Path) -> str | None:
    if shutil.which("fincore") is None:
        return "fincore (util-linux) is not installed"
    fs_type = subprocess.run(["stat", "-f", "-c", "%T", str(image)], capture_output=True,
                             text=True, check=False).stdout.strip()  # fmt: skip
    if fs_type == "tmpfs":
        return "the image is on tmpfs: its page cache is its storage"
    return None


def test_reads_match_the_kernel_across_extents_holes_and_unwritten(tmp_path: Path) -> None:
    _skip_unless_possible()
    image = _make_image(tmp_path / "read.img")
    with kernel_mount(image, tmp_path / "build", readonly=False) as root:
        _build_layout(root)
    _fsck_clean(image)
    with kernel_mount(image, tmp_path / "kmnt") as root:
        expected = _probe_reads(root)

    _drop_image_cache(image)
    mnt = tmp_path / "mnt"
    with served(image, mnt, ext4box_argv(image, mnt, "ro")):
        got = _probe_reads(mnt)
        resident = _resident_bytes(image)

    mismatched = [(e[:3], g[3] == e[3]) for e, g in zip(expected, got, strict=True) if e != g]
    assert not mismatched, f"reads differing from the kernel's: {mismatched}"
    why_not = _why_no_residency_check(image)
    if why_not is not None:
        print(f"image page cache not checked: {why_not}")
    elif fuse_backend() == "native":
        # ~16 MiB of file data was read through the server; only metadata (and
        # the 4 KiB probes, which stay buffered) may have gone through the
        # image's page cache. Buffered reads of the image left all of it there.
        assert resident < 4 * MIB, f"{resident} bytes of the image in the page cache"
    else:
        print("image page cache not checked: pyfuse3 answers reads with buffered preads")


def _write_steps(root: Path) -> None:
    """O_DIRECT writes of 1 MiB, 4 MiB, 128 KiB and 4 KiB (new blocks, overwrites,
    into an unwritten range) and a buffered tail ending inside a block, fsynced."""
    buf = mmap.mmap(-1, 4 * MIB)
    fd = os.open(root / "streamed", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        for index in range(12):  # 12 x 1 MiB, new blocks
            buf[:MIB] = _block(index, MIB)
            assert os.pwritev(fd, [memoryview(buf)[:MIB]], index * MIB) == MIB
        buf[: 4 * MIB] = _block(50, 4 * MIB)  # one 4 MiB write: several requests
        assert os.pwritev(fd, [buf], 12 * MIB) == 4 * MIB
        buf[: 128 * KIB] = _block(51, 128 * KIB)  # overwrite straddling an old request
        assert os.pwritev(fd, [memoryview(buf)[: 128 * KIB]], MIB - 64 * KIB) == 128 * KIB
        buf[: 4 * KIB] = _block(52, 4 * KIB)  # small: stays buffered
        assert os.pwritev(fd, [memoryview(buf)[: 4 * KIB]], 3 * MIB + 8 * KIB) == 4 * KIB
        # Into an unwritten extent: 256 KiB in the middle of 2 MiB fallocated.
        os.posix_fallocate(fd, 16 * MIB, 2 * MIB)
        buf[: 256 * KIB] = _block(53, 256 * KIB)
        assert os.pwritev(fd, [memoryview(buf)[: 256 * KIB]], 16 * MIB + 512 * KIB) == 256 * KIB
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(root / "streamed", "r+b") as tail:  # buffered, unaligned end
        tail.seek(18 * MIB)
        tail.write(_block(54, 3 * MIB + 777))
        tail.flush()
        os.fsync(tail.fileno())


def _digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def test_writes_match_the_kernel_and_bypass_the_image_cache(tmp_path: Path) -> None:
    _skip_unless_possible()
    reference = _make_image(tmp_path / "kernel.img")
    with kernel_mount(reference, tmp_path / "kmnt", readonly=False) as root:
        _write_steps(root)
        expected = _digest(root / "streamed")
    _fsck_clean(reference)

    subject = _make_image(tmp_path / "ext4box.img")
    _drop_image_cache(subject)
    mnt = tmp_path / "mnt"
    with served(subject, mnt, ext4box_argv(subject, mnt, "rw")):
        _write_steps(mnt)
        resident = _resident_bytes(subject)
        served_digest = _digest(mnt / "streamed")
    _fsck_clean(subject)
    with kernel_mount(subject, tmp_path / "check") as root:
        on_image = _digest(root / "streamed")

    assert served_digest == expected
    assert on_image == expected
    why_not = _why_no_residency_check(subject)
    if why_not is not None:
        print(f"image page cache not checked: {why_not}")
    else:
        # 16.4 MiB went O_DIRECT and ~3 MiB buffered (the tail's requests are
        # as large, but its last one is not 4 KiB-aligned and stays buffered,
        # as do the 4 KiB write, metadata and the journal).
        assert resident < 12 * MIB, f"{resident} bytes of the image in the page cache"
