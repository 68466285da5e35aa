"""iomap/direct_io.py on a real image file: which runs go O_DIRECT, and that the
buffered and O_DIRECT descriptions of the image see each other's bytes.

The data path mixes the two (metadata, the journal and small writes stay
buffered), so what the design leans on is checked here against the kernel:
an O_DIRECT read returns bytes still dirty in the page cache, and a buffered
read after an O_DIRECT write returns the new bytes, not stale cached pages.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from ext4box.blockdev import BlockDevice
from ext4box.iomap.direct_io import ALIGN, MIN_DIRECT_BYTES, DirectIO

KIB = 1024
SIZE = 8 * 1024 * KIB


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "device.img"
    path.write_bytes(os.urandom(SIZE))
    return path


def _reopened(dev: BlockDevice) -> DirectIO:
    direct = DirectIO.reopen(dev)
    if direct is None:
        pytest.skip(f"the filesystem under {os.readlink(f'/proc/self/fd/{dev.fd}')} "
                    "refuses O_DIRECT opens")
    return direct


def test_large_aligned_runs_go_direct_and_the_buffered_side_sees_them(tmp_path: Path) -> None:
    dev = BlockDevice.open(str(_image(tmp_path)), writable=True)
    direct = _reopened(dev)
    try:
        # Warm the buffered side's page cache over the range first.
        before = dev.pread(MIN_DIRECT_BYTES, MIN_DIRECT_BYTES)
        payload = os.urandom(MIN_DIRECT_BYTES)
        # Two pieces, as the engine passes (zeroed head + body): staged together.
        pieces = [memoryview(payload[:ALIGN]), memoryview(payload[ALIGN:])]
        assert direct.write(MIN_DIRECT_BYTES, pieces)
        after = dev.pread(MIN_DIRECT_BYTES, MIN_DIRECT_BYTES)
        assert after == payload != before
    finally:
        direct.close()
        dev.close()


def test_small_or_unaligned_runs_are_left_to_the_buffered_path(tmp_path: Path) -> None:
    image = _image(tmp_path)
    original = image.read_bytes()
    dev = BlockDevice.open(str(image), writable=True)
    direct = _reopened(dev)
    buffer = mmap.mmap(-1, 2 * MIN_DIRECT_BYTES)
    try:
        small = [memoryview(bytes(MIN_DIRECT_BYTES - ALIGN))]
        unaligned = [memoryview(bytes(MIN_DIRECT_BYTES))]
        beyond = [memoryview(bytes(2 * MIN_DIRECT_BYTES))]
        assert not direct.write(0, small)
        assert not direct.write(512, unaligned)
        assert not direct.write(SIZE - MIN_DIRECT_BYTES, beyond)
        assert not direct.read_into(ALIGN + 512, memoryview(buffer)[:MIN_DIRECT_BYTES])
        assert not direct.read_into(0, memoryview(buffer)[: MIN_DIRECT_BYTES - ALIGN])
        assert direct.enabled  # declining is not a refusal
    finally:
        buffer.close()
        direct.close()
        dev.close()
    assert image.read_bytes() == original  # nothing was written


def test_direct_reads_see_bytes_still_dirty_in_the_page_cache(tmp_path: Path) -> None:
    dev = BlockDevice.open(str(_image(tmp_path)), writable=True)
    direct = _reopened(dev)
    buffer = mmap.mmap(-1, MIN_DIRECT_BYTES)
    try:
        payload = os.urandom(MIN_DIRECT_BYTES)
        dev.pwrite(3 * MIN_DIRECT_BYTES, payload)  # buffered, not flushed
        assert direct.read_into(3 * MIN_DIRECT_BYTES, memoryview(buffer))
        assert buffer[:] == payload
    finally:
        buffer.close()
        direct.close()
        dev.close()


def test_a_read_only_device_gets_a_read_only_description(tmp_path: Path) -> None:
    dev = BlockDevice.open(str(_image(tmp_path)), writable=False)
    direct = _reopened(dev)
    try:
        assert not direct.write(0, [memoryview(bytes(MIN_DIRECT_BYTES))])
        with pytest.raises(OSError):
            os.pwrite(direct.fd, bytes(ALIGN), 0)  # EBADF: opened O_RDONLY
    finally:
        direct.close()
        dev.close()


def test_no_description_for_a_device_that_is_not_the_plain_image(tmp_path: Path) -> None:
    """A subclass (the journal's overlay serves replayed blocks) never goes around itself."""

    class Layered(BlockDevice):
        pass

    fd = os.open(_image(tmp_path), os.O_RDONLY)
    try:
        assert DirectIO.reopen(Layered(fd)) is None
    finally:
        os.close(fd)
