"""Shared fixtures for the appliance tests: real sockets, real fds."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

IMAGE_BYTES = 4 * 1024 * 1024


@pytest.fixture
def seqpacket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    helper_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with helper_end, server_end:
        yield helper_end, server_end


@pytest.fixture
def fuse_fd() -> Iterator[int]:
    """A real /dev/fuse fd, opened read-write as root (the device is 0600)."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        pytest.skip(f"cannot open /dev/fuse: {exc.strerror}")
    yield fd
    os.close(fd)


@pytest.fixture(scope="session")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real ext4 image made by mkfs.ext4."""
    path = tmp_path_factory.mktemp("appliance") / "small.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    return path


@pytest.fixture
def image_ro_fd(image_path: Path) -> Iterator[int]:
    fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    yield fd
    os.close(fd)


@pytest.fixture
def image_rw_fd(image_path: Path) -> Iterator[int]:
    fd = os.open(image_path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    yield fd
    os.close(fd)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))
