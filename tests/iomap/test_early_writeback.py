"""Early writeback of streamed data (iomap/writeback.py).

The hint is pure performance: these tests pin down when it is given (only for
contiguous device ranges of at least one chunk, exactly the bytes written),
that a refusal switches it off without failing a write, and that with the
real sync_file_range the written image is the same as without it.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from ext4box.blockdev import BlockDevice
from ext4box.ext4.opening import open_filesystem
from ext4box.iomap import writeback
from ext4box.iomap.engine import IOMapEngine
from ext4box.iomap.types import IOMapKind
from ext4box.iomap.writeback import EarlyWriteback

MIB = 1024 * 1024


class _Recorder:
    def __init__(self, fail_with: int | None = None) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.fail_with = fail_with

    def __call__(self, fd: int, offset: int, length: int) -> None:
        self.calls.append((fd, offset, length))
        if self.fail_with is not None:
            raise OSError(self.fail_with, os.strerror(self.fail_with))


def test_one_hint_per_contiguous_chunk() -> None:
    recorder = _Recorder()
    wb = EarlyWriteback(7, chunk=MIB, start=recorder)
    for i in range(3):  # three 1 MiB writes, device-adjacent
        wb.wrote(10 * MIB + i * MIB, MIB)
    assert recorder.calls == [(7, 10 * MIB, MIB), (7, 11 * MIB, MIB), (7, 12 * MIB, MIB)]


def test_small_adjacent_writes_are_gathered_into_a_chunk() -> None:
    recorder = _Recorder()
    wb = EarlyWriteback(3, chunk=MIB, start=recorder)
    piece = 128 * 1024
    for i in range(17):
        wb.wrote(5 * MIB + i * piece, piece)
    # 8 pieces make a chunk: two hints, the 17th piece waits for more.
    assert recorder.calls == [(3, 5 * MIB, MIB), (3, 6 * MIB, MIB)]


def test_scattered_writes_get_no_hint() -> None:
    recorder = _Recorder()
    wb = EarlyWriteback(3, chunk=MIB, start=recorder)
    for i in range(1000):  # 4 KiB writes, never adjacent
        wb.wrote(i * 3 * 4096, 4096)
    assert recorder.calls == []


def test_a_gap_starts_a_new_run() -> None:
    recorder = _Recorder()
    wb = EarlyWriteback(3, chunk=MIB, start=recorder)
    wb.wrote(0, MIB // 2)
    wb.wrote(4 * MIB, MIB // 2)  # not adjacent: the first half-chunk is dropped
    wb.wrote(4 * MIB + MIB // 2, MIB // 2)
    assert recorder.calls == [(3, 4 * MIB, MIB)]


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS, errno.EINVAL])
def test_refusal_switches_the_hint_off(err: int) -> None:
    recorder = _Recorder(fail_with=err)
    wb = EarlyWriteback(3, chunk=MIB, start=recorder)
    wb.wrote(0, MIB)
    assert not wb.enabled
    wb.wrote(MIB, MIB)
    assert len(recorder.calls) == 1  # never asked again


def test_real_sync_file_range_is_available_and_accepted(tmp_path: Path) -> None:
    if writeback._SYNC_FILE_RANGE is None:
        pytest.skip("this libc has no sync_file_range")
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        size = writeback.WRITEBACK_CHUNK_BYTES
        os.pwrite(fd, b"x" * size, 0)
        calls: list[tuple[int, int, int]] = []

        def start(fd: int, offset: int, length: int) -> None:
            calls.append((fd, offset, length))
            assert writeback._SYNC_FILE_RANGE is not None
            writeback._SYNC_FILE_RANGE(fd, offset, length)

        wb = EarlyWriteback(fd, start=start)
        wb.wrote(0, size)
        assert calls == [(fd, 0, size)]
        assert wb.enabled  # the kernel took the hint
    finally:
        os.close(fd)


def _image(tmp_path: Path) -> Path:
    image = tmp_path / "wb.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image), "48M"], check=True,
                   capture_output=True)
    return image


def test_engine_hints_exactly_the_data_it_wrote(tmp_path: Path) -> None:
    """Sequential 1 MiB writes of a new file through the engine: every hinted
    byte range is a range of the file's own data blocks, together they cover
    its whole MiBs, and overwriting them gives no hint; the image stays
    e2fsck-clean and reads back what was written."""
    image = _image(tmp_path)
    payload = os.urandom(5 * MIB + 777)
    dev = BlockDevice.open(str(image), writable=True)
    try:
        fs = open_filesystem(dev, readonly=False)
        try:
            engine = IOMapEngine(fs, fs.dev)
            assert engine.writeback is not None
            recorder = _Recorder()
            engine.writeback = EarlyWriteback(dev.fd, chunk=MIB, start=recorder)
            ino = fs.create(2, b"stream", 0o100644, 0, 0).ino  # type: ignore[attr-defined]
            for pos in range(0, len(payload), MIB):
                engine.write(fs.inode(ino), pos, payload[pos : pos + MIB], now_ns=1)
            fs.commit(durable=True)  # type: ignore[attr-defined]
            inode = fs.inode(ino)
            data_ranges = [
                (m.addr, m.addr + m.length)
                for m in engine.begin(inode, 0, inode.size)
                if m.kind is IOMapKind.MAPPED and m.addr is not None
            ]
            hinted = 0
            for fd, offset, length in recorder.calls:
                assert fd == dev.fd
                assert any(lo <= offset and offset + length <= hi for lo, hi in data_ranges), (
                    offset, length, data_ranges)
                hinted += length
            assert hinted >= 5 * MIB
            # Overwriting the same blocks: no hint (left to the commit).
            before = len(recorder.calls)
            payload = os.urandom(4 * MIB) + payload[4 * MIB :]
            for pos in range(0, 4 * MIB, MIB):
                engine.write(fs.inode(ino), pos, payload[pos : pos + MIB], now_ns=2)
            fs.commit(durable=True)  # type: ignore[attr-defined]
            assert len(recorder.calls) == before
            inode = fs.inode(ino)
            assert engine.read(inode, 0, len(payload) + 10) == payload
        finally:
            fs.close()
    finally:
        dev.close()
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    dumped = subprocess.run(["debugfs", "-R", "cat /stream", str(image)], capture_output=True,
                            check=True).stdout
    assert dumped == payload


def test_read_only_engine_has_no_writeback(tmp_path: Path) -> None:
    image = _image(tmp_path)
    dev = BlockDevice.open(str(image))
    try:
        fs = open_filesystem(dev)
        try:
            assert IOMapEngine(fs, fs.dev).writeback is None
        finally:
            fs.close()
    finally:
        dev.close()
