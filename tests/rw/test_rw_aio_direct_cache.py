"""Buffered reads around AIO O_DIRECT writes (fstests generic/451), against the kernel's ext4.

generic/451 runs buffered readers in a loop while a writer submits O_DIRECT
writes with io_submit and, after each completion, checks that a buffered
read sees the new bytes. Through FUSE on 6.18 the check fails now and then,
whatever the server: with FUSE_ASYNC_DIO the kernel queues the WRITE and
io_submit returns; the page cache was invalidated before the write was sent
(generic_file_direct_write), but the completion (fs/fuse's fuse_aio_complete)
invalidates nothing, so a page a reader brought in while the WRITE was
queued keeps the old bytes. The sync path (and ext4's iomap completion)
invalidate after the write. Upstream's fix is a kernel patch ("fuse:
invalidate the page cache after direct write", January 2026, not in 6.18).
Measured here over 120 s with 6 readers of a 640 KiB file: ext4box 10 stale
reads in 21,916 writes; ext4box with ASYNC_DIO declined 0 in 18,947 (but
O_DIRECT throughput fell 15-50%, so ASYNC_DIO stays); the kernel's ext4 0.

What is checked:
- without concurrent readers the page cache is coherent on both mounts: a
  cached old page is gone after an AIO O_DIRECT write completes (the pre-write
  invalidation, and AUTO_INVAL_DATA on the changed mtime);
- the 451 loop for a few seconds: the kernel's ext4 never reads stale bytes,
  and ext4box's count is printed (it is the kernel's race, rare: not asserted);
- the mechanism the documentation names: on ext4box an AIO O_DIRECT write is
  still in flight when io_submit returns (FUSE_ASYNC_DIO). If that stops
  being true (ASYNC_DIO declined, or a transport that completes inline), the
  race is gone and docs/status.md must say so.
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from rw_support import assert_fsck_clean, make_image, rw_mount, skip_unless_possible

from support.kernel import kernel_mount

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

FILE_BYTES = 655360  # generic/451's size
RACE_SECONDS = 4.0
READERS = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_IO_SETUP, _SYS_IO_DESTROY, _SYS_IO_GETEVENTS, _SYS_IO_SUBMIT = 206, 207, 208, 209
_IOCB_CMD_PWRITE = 1
# struct iocb: data, key, rw_flags, opcode, reqprio, fd, buf, nbytes, offset,
# reserved2, flags, resfd (64 bytes); struct io_event: data, obj, res, res2.
_IOCB = struct.Struct("<QIIHhIQQqQII")
_IO_EVENT_RES = 16


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class AioContext:
    """io_setup/io_submit/io_getevents by system call (Python has no libaio binding)."""

    def __init__(self) -> None:
        self.ctx = ctypes.c_ulong(0)
        if _libc.syscall(_SYS_IO_SETUP, 1, ctypes.byref(self.ctx)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "io_setup")

    def close(self) -> None:
        _libc.syscall(_SYS_IO_DESTROY, self.ctx)

    def submit_pwrite(self, fd: int, buffer: mmap.mmap, offset: int) -> None:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        iocb = ctypes.create_string_buffer(
            _IOCB.pack(0, 0, 0, _IOCB_CMD_PWRITE, 0, fd, address, len(buffer), offset, 0, 0, 0)
        )
        self._iocb = iocb  # the kernel reads it until completion
        pointers = (ctypes.c_void_p * 1)(ctypes.addressof(iocb))
        if _libc.syscall(_SYS_IO_SUBMIT, self.ctx, 1, pointers) != 1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "io_submit")

    def reap(self, *, wait: bool) -> int | None:
        """The result of the completed write, or None if it is still in flight (wait=False)."""
        event = ctypes.create_string_buffer(32)
        zero = _Timespec(0, 0)
        got = _libc.syscall(_SYS_IO_GETEVENTS, self.ctx, 0 if not wait else 1, 1, event,
                            None if wait else ctypes.byref(zero))  # fmt: skip
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), "io_getevents")
        if got == 0:
            return None
        return struct.unpack_from("<q", event.raw, _IO_EVENT_RES)[0]


def _patterns() -> list[mmap.mmap]:
    buffers = []
    for byte in (0x55, 0xAA):
        buffer = mmap.mmap(-1, FILE_BYTES)  # page-aligned, as O_DIRECT wants
        buffer.write(bytes([byte]) * FILE_BYTES)
        buffers.append(buffer)
    return buffers


def _aio_direct_write(aio: AioContext, path: Path, buffer: mmap.mmap) -> bool:
    """One O_DIRECT write of `buffer` at 0 by io_submit; True if it was still in
    flight when io_submit returned."""
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        aio.submit_pwrite(fd, buffer, 0)
        result = aio.reap(wait=False)
        in_flight = result is None
        if in_flight:
            result = aio.reap(wait=True)
        assert result == FILE_BYTES, f"AIO O_DIRECT write gave {result}"
        return in_flight
    finally:
        os.close(fd)


def _buffered_read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, FILE_BYTES, 0)
    finally:
        os.close(fd)


def _reader(path: str, stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        with suppress(OSError):  # the writer may be between open and write
            _buffered_read(Path(path))


@contextmanager
def _both(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A kernel rw mount and an ext4box rw mount of copies of one fresh image."""
    skip_unless_possible()
    image = make_image(tmp_path / "base.img", 32, "-b", "4096")
    kernel_image, ours_image = tmp_path / "kernel.img", tmp_path / "ext4box.img"
    kernel_image.write_bytes(image.read_bytes())
    ours_image.write_bytes(image.read_bytes())
    with (
        kernel_mount(kernel_image, tmp_path / "kmnt", readonly=False) as kernel_root,
        rw_mount(ours_image, tmp_path / "omnt") as handle,
    ):
        yield kernel_root, handle.mountpoint
    assert_fsck_clean(kernel_image)
    assert_fsck_clean(ours_image)


def _seed(path: Path, buffer: mmap.mmap) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        os.pwritev(fd, [buffer], 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_cached_pages_dropped_by_an_aio_direct_write(tmp_path: Path) -> None:
    buffers = _patterns()
    with _both(tmp_path) as roots:
        for root in roots:
            path = root / "f"
            _seed(path, buffers[0])
            aio = AioContext()
            try:
                for turn in range(6):
                    new = buffers[(turn + 1) % 2]
                    assert _buffered_read(path) == bytes(buffers[turn % 2])  # cached now
                    _aio_direct_write(aio, path, new)
                    assert _buffered_read(path) == bytes(new), f"stale page on {root}"
            finally:
                aio.close()


def test_generic_451_race(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    buffers = _patterns()
    counts: dict[str, tuple[int, int, int]] = {}
    with _both(tmp_path) as (kernel_root, ours_root):
        for name, root in (("kernel", kernel_root), ("ext4box", ours_root)):
            path = root / "t"
            _seed(path, buffers[0])
            stop = multiprocessing.Event()
            readers = [multiprocessing.Process(target=_reader, args=(str(path), stop))
                       for _ in range(READERS)]  # fmt: skip
            for reader in readers:
                reader.start()
            aio = AioContext()
            writes = stale = in_flight = 0
            try:
                deadline = time.monotonic() + RACE_SECONDS
                while time.monotonic() < deadline:
                    buffer = buffers[(writes + 1) % 2]
                    writes += 1
                    in_flight += _aio_direct_write(aio, path, buffer)
                    stale += _buffered_read(path) != bytes(buffer)
            finally:
                stop.set()
                for reader in readers:
                    reader.join()
                aio.close()
            counts[name] = (writes, stale, in_flight)
    with capsys.disabled():
        print(f"\ngeneric/451 loop ({RACE_SECONDS:.0f} s, {READERS} readers): "
              + ", ".join(f"{name} {w} writes, {s} stale, {f} in flight after io_submit"
                          for name, (w, s, f) in counts.items()))  # fmt: skip
    kernel_writes, kernel_stale, _ = counts["kernel"]
    ours_writes, _, ours_in_flight = counts["ext4box"]
    assert kernel_writes > 0 and ours_writes > 0
    assert kernel_stale == 0
    # The window docs/status.md describes: FUSE_ASYNC_DIO completes after io_submit.
    assert ours_in_flight > 0, (
        "no AIO O_DIRECT write was in flight after io_submit: the kernel no longer "
        "completes them through fuse_aio_complete; update docs/status.md (issue 18 item 9)"
    )
