"""FUSE over io_uring (transport=uring|auto) on real mounts, against the kernel's switch.

With enable_uring on, a read-write session served over the ring answers a
mixed workload whose result the kernel's ext4 then reads back, e2fsck -fn
clean; every request but FORGET/INTERRUPT travelled through the ring (the
server's --debug trace says which way each came). An aborted connection ends
the server by itself, exit 0. transport=auto takes the ring when it is on;
with enable_uring off, auto serves on /dev/fuse and says why, and
transport=uring refuses before mounting.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from support.kernel import kernel_mount, why_no_kernel_mounts
from support.serve import ext4box_argv, ext4box_executable, fuse_backend, served, why_no_fuse
from support.uring import uring_enabled

# Requests the kernel sends on /dev/fuse even when the ring is in use.
DEVICE_ONLY = {"FORGET", "BATCH_FORGET", "INTERRUPT"}


@pytest.fixture(autouse=True)
def _native_mounts() -> None:
    reason = why_no_fuse() or why_no_kernel_mounts()
    if reason is None and fuse_backend() != "native":
        reason = f"io_uring is a native-backend transport (EXT4BOX_TEST_BACKEND={fuse_backend()})"
    if reason:
        pytest.skip(reason)


def _image(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    for i in range(30):
        (tree / "dir" / f"f{i}").write_bytes(b"%d\n" % i * (i + 1))
    image = tmp_path / "image.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(image), "32M"],
                   check=True, capture_output=True)  # fmt: skip
    return image


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _session(events: list[dict]) -> dict:
    return next(e for e in events if e.get("event") == "session")


def test_uring_session_serves_a_workload_the_kernel_reads_back(tmp_path: Path) -> None:
    image = _image(tmp_path)
    mnt = tmp_path / "mnt"
    big = os.urandom(3 * 1024 * 1024 + 123)
    with uring_enabled(True) as reason:
        if reason:
            pytest.skip(reason)
        argv = [*ext4box_argv(image, mnt, "rw,transport=uring"), "--debug"]
        with served(image, mnt, argv) as handle:
            assert sorted(os.listdir(mnt / "dir")) == sorted(f"f{i}" for i in range(30))
            assert (mnt / "dir" / "f7").read_bytes() == b"7\n" * 8
            (mnt / "new").mkdir()
            for i in range(40):
                (mnt / "new" / f"g{i}").write_text(f"hello {i}\n")
            (mnt / "new" / "big").write_bytes(big)
            os.rename(mnt / "new" / "g1", mnt / "new" / "renamed")
            os.unlink(mnt / "new" / "g2")
            os.symlink("renamed", mnt / "new" / "link")
            os.setxattr(mnt / "new" / "g3", "user.colour", b"blue")
            os.truncate(mnt / "dir" / "f29", 5)
            assert (mnt / "new" / "big").read_bytes() == big
            assert os.getxattr(mnt / "new" / "g3", "user.colour") == b"blue"
            subprocess.run(["sync", "-f", str(mnt)], check=True)
            events = _events(handle.stderr_text())
    session = _session(events)
    assert session["transport"] == "uring", session
    routes = {(e["opcode"], e.get("via")) for e in events if e.get("event") == "request"}
    by_device = {opcode for opcode, via in routes if via != "uring"}
    assert by_device <= DEVICE_ONLY, sorted(routes)
    assert {"LOOKUP", "CREATE", "WRITE", "READ", "RENAME"} <= {op for op, _ in routes}
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    with kernel_mount(image, tmp_path / "kernel") as kernel:
        names = sorted(os.listdir(kernel / "new"))
        assert names == sorted(["big", "link", "renamed", *(f"g{i}" for i in range(40)
                                                            if i not in (1, 2))])  # fmt: skip
        digest = hashlib.sha256((kernel / "new" / "big").read_bytes()).hexdigest()
        assert digest == hashlib.sha256(big).hexdigest()
        assert (kernel / "new" / "renamed").read_text() == "hello 1\n"
        assert os.readlink(kernel / "new" / "link") == "renamed"
        assert os.getxattr(kernel / "new" / "g3", "user.colour") == b"blue"
        assert (kernel / "dir" / "f29").read_bytes() == (b"29\n" * 30)[:5]


def test_aborted_uring_connection_ends_the_server_cleanly(tmp_path: Path) -> None:
    image = _image(tmp_path)
    mnt = tmp_path / "mnt"
    fusectl = tmp_path / "fusectl"
    fusectl.mkdir()
    with uring_enabled(True) as reason:
        if reason:
            pytest.skip(reason)
        argv = ext4box_argv(image, mnt, "ro,transport=uring")
        # The server ends during the body: its exit status is checked here.
        with served(image, mnt, argv, expect_exit_zero=False) as handle:
            assert len(os.listdir(mnt / "dir")) == 30
            minor = os.minor(os.stat(mnt).st_dev)
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(fusectl)], check=True)
            try:
                (fusectl / str(minor) / "abort").write_text("1")
            finally:
                subprocess.run(["umount", str(fusectl)], check=True)
            # The server must end by itself, and cleanly.
            assert handle.process.wait(timeout=30) == 0, handle.stderr_text()
            assert _session(_events(handle.stderr_text()))["transport"] == "uring"


def test_auto_serves_on_dev_fuse_when_enable_uring_is_off(tmp_path: Path) -> None:
    image = _image(tmp_path)
    mnt = tmp_path / "mnt"
    with uring_enabled(False) as reason:
        if reason:
            pytest.skip(reason)
        with served(image, mnt, ext4box_argv(image, mnt, "ro,transport=auto")) as handle:
            assert (mnt / "dir" / "f3").read_bytes() == b"3\n" * 4
            session = _session(_events(handle.stderr_text()))
    assert session["transport"] == "dev"
    assert "does not offer FUSE_OVER_IO_URING" in session["transport_why"]


def test_auto_takes_the_ring_when_enable_uring_is_on(tmp_path: Path) -> None:
    image = _image(tmp_path)
    mnt = tmp_path / "mnt"
    with uring_enabled(True) as reason:
        if reason:
            pytest.skip(reason)
        with served(image, mnt, ext4box_argv(image, mnt, "ro,transport=auto")) as handle:
            assert (mnt / "dir" / "f3").read_bytes() == b"3\n" * 4
            session = _session(_events(handle.stderr_text()))
    assert session["transport"] == "uring"
    assert session["transport_why"].startswith("transport=auto and the kernel offers")


def test_explicit_uring_is_refused_before_mounting_when_off(tmp_path: Path) -> None:
    image = _image(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with uring_enabled(False) as reason:
        if reason:
            pytest.skip(reason)
        result = subprocess.run(
            [*ext4box_executable(), "serve", "-f", str(image), str(mnt), "-o",
             "rw,transport=uring"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("ext4box: error:")]
    assert len(errors) == 1 and "transport=uring" in errors[0] and "enable_uring" in errors[0]
    assert not os.path.ismount(mnt)


def test_callers_waiting_before_the_ring_is_ready_are_answered(tmp_path: Path) -> None:
    """Callers already waiting when the server starts (mount(2) done by someone
    else, the server handed /dev/fd/N) are released the moment the last queue
    has an entry, while the server is still registering: their requests must
    be answered, not taken for refusals."""
    image = _image(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    results: dict[int, bytes] = {}
    readers = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, (mnt / "dir" / f"f{i}").read_bytes()), daemon=True) for i in range(8)]  # fmt: skip
    with uring_enabled(True) as reason:
        if reason:
            pytest.skip(reason)
        # On before mount(2): the kernel builds its INIT offer at mount time.
        fuse_fd = os.open("/dev/fuse", os.O_RDWR)
        data = f"fd={fuse_fd},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other"
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(str(image).encode(), str(mnt).encode(), b"fuse.ext4box", 1 | 2 | 4,
                      data.encode()) != 0:  # fmt: skip
            os.close(fuse_fd)
            pytest.skip(f"mount(2): {os.strerror(ctypes.get_errno())}")
        server = None
        try:
            for reader in readers:
                reader.start()
            server = subprocess.Popen(
                [*ext4box_executable(), "serve", "-f", str(image), f"/dev/fd/{fuse_fd}", "-o",
                 "transport=uring"], pass_fds=(fuse_fd,), stderr=subprocess.PIPE, text=True)
            os.close(fuse_fd)
            deadline = time.monotonic() + 30  # a lost request would hang its reader
            for reader in readers:
                reader.join(timeout=max(0.0, deadline - time.monotonic()))
            assert results == {i: b"%d\n" % i * (i + 1) for i in range(8)}
        finally:
            if server is not None and any(reader.is_alive() for reader in readers):
                server.kill()  # closing /dev/fuse aborts the connection: the readers return
            subprocess.run(["umount", str(mnt)], check=False)
    _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert _session(_events(stderr))["transport"] == "uring"
