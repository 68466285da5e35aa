"""Streaming writes through a read-write mount, compared with the kernel's ext4.

What the streaming path relies on: libfuse negotiates 1 MiB writes (the
server's INIT reply, read from its --debug log), a write() larger than one
request reaches the server as several requests of at most max_write bytes
that land where they belong, buffered and O_DIRECT alike, O_DIRECT reads
(answered inline) return the same bytes, and the early
writeback hint (iomap/writeback.py) changes nothing in the image: the same
writes made on the kernel's own ext4 give the same file, and both images are
e2fsck-clean.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from support.fileops import syncfs
from support.kernel import kernel_mount, why_no_kernel_mounts
from support.serve import ext4box_argv, fuse_backend, served, why_no_fuse

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

MIB = 1024 * 1024
FUSE_IN_HEADER = 80  # fuse_in_header + fuse_write_in, in each WRITE's insize


def _skip_unless_possible() -> None:
    reason = why_no_kernel_mounts() or why_no_fuse()
    if reason is not None:
        pytest.skip(reason)


def _make_image(path: Path) -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "root_owner=0:0", str(path),
                    "96M"], check=True, capture_output=True)
    return path


def _aligned(data: bytes) -> mmap.mmap:
    """`data` in page-aligned memory, as O_DIRECT needs."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def _write_streams(root: Path, payloads: dict[str, bytes]) -> None:
    """The writes under test, the same on either filesystem."""
    # One write() of 3 MiB + 5 bytes: several requests for the server.
    fd = os.open(root / "one-big-write", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, payloads["one-big-write"]) == len(payloads["one-big-write"])
        os.fsync(fd)
    finally:
        os.close(fd)
    # Sequential 1 MiB writes (the benchmark's pattern) and a short tail.
    data = payloads["sequential"]
    fd = os.open(root / "sequential", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for pos in range(0, len(data), MIB):
            os.write(fd, data[pos : pos + MIB])
        os.fsync(fd)
    finally:
        os.close(fd)
    # O_DIRECT: one aligned 4 MiB write, then 1 MiB ones.
    data = payloads["direct"]
    fd = os.open(root / "direct", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        with _aligned(data[: 4 * MIB]) as buf:
            assert os.write(fd, buf) == 4 * MIB
        for pos in range(4 * MIB, len(data), MIB):
            with _aligned(data[pos : pos + MIB]) as buf:
                assert os.write(fd, buf) == MIB
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_direct(path: Path) -> bytes:
    """The whole file through O_DIRECT reads of 1 MiB (served inline, not threaded)."""
    chunks = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, MIB) as buf:
            pos = 0
            while True:
                got = os.preadv(fd, [buf], pos)
                if got <= 0:
                    break
                chunks.append(buf[:got])
                pos += got
    finally:
        os.close(fd)
    return b"".join(chunks)


def _digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


def _digests(root: Path, names: list[str]) -> dict[str, tuple[int, str]]:
    return {name: _digest((root / name).read_bytes()) for name in names}


def _fsck_clean(image: Path) -> None:
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, f"e2fsck -fn {image}:\n{check.stdout}\n{check.stderr}"


def test_streaming_writes_match_the_kernel(tmp_path: Path) -> None:
    _skip_unless_possible()
    payloads = {
        "one-big-write": os.urandom(3 * MIB + 5),
        "sequential": os.urandom(9 * MIB + 1234),
        "direct": os.urandom(7 * MIB),
    }
    names = sorted(payloads)
    expected = {name: _digest(data) for name, data in payloads.items()}

    reference = _make_image(tmp_path / "kernel.img")
    with kernel_mount(reference, tmp_path / "kmnt", readonly=False) as root:
        _write_streams(root, payloads)
        syncfs(root)
        kernel_digests = _digests(root, names)
    _fsck_clean(reference)

    subject = _make_image(tmp_path / "ext4box.img")
    mnt = tmp_path / "mnt"
    argv = [*ext4box_argv(subject, mnt, "rw"), "--debug"]
    with served(subject, mnt, argv) as handle:
        _write_streams(mnt, payloads)
        served_digests = _digests(mnt, names)
        direct_reads = {name: _digest(_read_direct(mnt / name)) for name in names}
        log = handle.stderr_text()
    _fsck_clean(subject)
    with kernel_mount(subject, tmp_path / "check") as root:
        on_image = _digests(root, names)

    assert kernel_digests == expected
    assert served_digests == expected
    assert on_image == expected
    assert direct_reads == expected

    # INIT was answered with 1 MiB writes, and the server got requests of
    # that size: the 3 MiB write arrived in pieces no larger than max_write.
    max_write, sizes = _negotiated_write_sizes(log)
    assert max_write == MIB
    assert sizes and max(sizes) == MIB
    assert all(0 < size <= max_write for size in sizes)
    total = sum(len(data) for data in payloads.values())
    assert sum(sizes) == total



def _negotiated_write_sizes(log: str) -> tuple[int, list[int]]:
    """(max_write agreed at INIT, data bytes of every WRITE) from a --debug log."""
    if fuse_backend() == "pyfuse3":
        # libfuse's own trace.
        init_reply = re.search(r"INIT: 7\.\d+\n(?:\s+\S+\n)*?\s+max_write=0x([0-9a-f]+)", log)
        assert init_reply is not None, log[:2000]
        sizes = [int(n) - FUSE_IN_HEADER
                 for n in re.findall(r"opcode: WRITE \(16\), nodeid: \d+, insize: (\d+)", log)]
        return int(init_reply.group(1), 16), sizes
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    (session,) = [e for e in events if e.get("event") == "session"]
    sizes = [e["insize"] - FUSE_IN_HEADER for e in events
             if e.get("event") == "request" and e.get("opcode") == "WRITE"]
    return session["max_write"], sizes


def test_random_fill_of_a_sparse_file_through_the_mapping_cache(tmp_path: Path) -> None:
    """Allocating 4 KiB writes at random offsets inside i_size, mixed with overwrites
    and reads of what was written: the mapping cache keeps what lies around each
    allocated range (it forgets only that range), so every read must still see
    the last write, holes must read as zeros, and the kernel must read the image
    back the same, e2fsck-clean."""
    _skip_unless_possible()
    image = _make_image(tmp_path / "fill.img")
    blocks = 6000
    rng = random.Random(11)
    probe_buf = mmap.mmap(-1, 4096)  # page-aligned, for O_DIRECT
    model: dict[int, bytes] = {}
    with served(image, tmp_path / "mnt", ext4box_argv(image, tmp_path / "mnt", "rw")) as h:
        path = h.mountpoint / "sparse"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        # Probes read O_DIRECT: past the kernel's page cache, through the server.
        direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            os.ftruncate(fd, blocks * 4096)
            for step in range(2500):
                lblk = rng.randrange(blocks) if step % 4 else rng.choice(list(model) or [0])
                body = bytes([step % 251 + 1]) * 4096
                os.pwrite(fd, body, lblk * 4096)
                model[lblk] = body
                probe = rng.randrange(blocks)
                assert os.preadv(direct, [probe_buf], probe * 4096) == 4096
                assert probe_buf[:] == model.get(probe, bytes(4096)), step
            os.fsync(fd)
        finally:
            os.close(direct)
            os.close(fd)
        syncfs(h.mountpoint)
    _fsck_clean(image)
    expected = b"".join(model.get(i, bytes(4096)) for i in range(blocks))
    with kernel_mount(image, tmp_path / "check") as root:
        assert (root / "sparse").read_bytes() == expected
