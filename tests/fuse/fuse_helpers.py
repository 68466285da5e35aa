"""Helpers for the FUSE server tests: build images, run and mount `ext4box serve`."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from support import fuse_teardown
from support.fuse_teardown import FuseConnection
from support.serve import fuse_backend

EXT4BOX = [sys.executable, "-m", "ext4box"]
MOUNT_TIMEOUT = 20.0


def run_ext4box(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXT4BOX, *args], capture_output=True, text=True, timeout=timeout, env=env()
    )


def env() -> dict[str, str]:
    env = dict(os.environ)
    app = str(Path(__file__).resolve().parents[2] / "app")
    env["PYTHONPATH"] = app + os.pathsep + env.get("PYTHONPATH", "")
    env["EXT4BOX_LOG_FORMAT"] = "json"
    return env


def mkfs(tree: Path, image: Path, size: str = "32M", *extra: str) -> Path:
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "root_owner=0:0",
            *extra,
            "-d",
            str(tree),
            str(image),
            size,
        ],
        check=True,
        capture_output=True,
    )
    return image


def is_mountpoint(path: Path) -> bool:
    return os.stat(path).st_dev != os.stat(path.parent).st_dev


@dataclass
class Server:
    proc: subprocess.Popen[str]
    mountpoint: Path
    stderr_path: Path
    # Recorded once mounted: after the unmount the mountpoint no longer names it.
    connection: FuseConnection | None = None

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        """Unmount as a user would and return the server's exit status.

        Copies of the mount held only by other people's namespaces get the
        connection aborted (support.fuse_teardown); a copy of ours fails.
        """
        if self.connection is not None:
            fuse_teardown.unmount(self.mountpoint, self.connection)
        fuse_teardown.wait_for_server_exit(self.proc, self.connection, self.mountpoint, 30)
        return self.proc.wait()


def start_server(image: Path, mountpoint: Path, *options: str) -> Server:
    mountpoint.mkdir(exist_ok=True)
    stderr_path = mountpoint.parent / f"{mountpoint.name}.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [*EXT4BOX, "serve", "-f", str(image), str(mountpoint), *options,
             "-o", f"backend={fuse_backend()}"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            env=env(),
        )
    server = Server(proc, mountpoint, stderr_path)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mountpoint(mountpoint):
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {server.stderr()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"not mounted after {MOUNT_TIMEOUT}s: {server.stderr()}")
        time.sleep(0.05)
    server.connection = FuseConnection.of(mountpoint)
    return server


@contextlib.contextmanager
def served(image: Path, mountpoint: Path, *options: str) -> Iterator[Server]:
    server = start_server(image, mountpoint, *options)
    try:
        yield server
    except BaseException:
        _force_down(server)
        raise
    try:
        status = server.stop()
    except BaseException:
        _force_down(server)  # never leave the server running
        raise
    assert status == 0, server.stderr()


def _force_down(server: Server) -> None:
    with contextlib.suppress(Exception):
        if is_mountpoint(server.mountpoint):
            subprocess.run(["umount", "-l", str(server.mountpoint)], check=False)
    with contextlib.suppress(Exception):
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=10)
    if server.proc.poll() is None:
        server.proc.kill()


@contextlib.contextmanager
def kernel_mount(image: Path, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "ext4", "-o", "ro,loop,noload", str(image), str(mountpoint)],
        check=True,
        capture_output=True,
    )
    try:
        yield mountpoint
    finally:
        # umount of a loop mount set up with -o loop also detaches the loop device.
        subprocess.run(["umount", str(mountpoint)], check=False)


# -- the shared source tree ----------------------------------------------------


def build_tree(root: Path) -> None:
    """A small tree with every kind of inode the server must present."""
    rng = random.Random(1234)
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello, ext4box\n")
    (root / "medium.bin").write_bytes(rng.randbytes(200_000))
    (root / "large.bin").write_bytes(rng.randbytes(3 * 1024 * 1024 + 123))
    sub = root / "dir" / "nested"
    sub.mkdir(parents=True)
    (sub / "deep.txt").write_bytes(b"deep\n" * 1000)
    for name, holes in {
        "sparse_start": [(0, 0)],
        "sparse_middle": [(0, 5000), (300_000, 4096)],
        "sparse_end": [(0, 8192)],
    }.items():
        path = root / name
        with open(path, "wb") as f:
            for offset, length in holes:
                f.seek(offset)
                f.write(rng.randbytes(length))
            f.truncate(1_000_000)
    with open(root / "sparse_start", "r+b") as f:
        f.seek(900_000)
        f.write(b"tail data")
    (root / "link_short").symlink_to("small.txt")
    (root / "link_long").symlink_to("x" * 200 + "/" + "y" * 100)
    (root / "link_dir").symlink_to("dir/nested")
    os.link(root / "small.txt", root / "dir" / "hardlink.txt")
    os.mkfifo(root / "fifo")
    os.mknod(root / "chardev", 0o620 | 0o020000, os.makedev(4, 64))
    os.mknod(root / "blockdev", 0o660 | 0o060000, os.makedev(8, 3))
    odd = root / "odd_owner"
    odd.write_bytes(b"owned by someone else\n")
    os.chown(odd, 12345, 54321)
    os.chmod(odd, 0o4751)
    os.utime(odd, ns=(-1_000_000_123, 4_102_444_800_987_654_321))  # pre-1970, after 2038
    os.setxattr(root / "small.txt", "user.greeting", b"hi")
    os.setxattr(root / "small.txt", "user.empty", b"")
    os.setxattr(root / "medium.bin", "user.big", b"v" * 1500)  # too big for the inode body
    os.setxattr(root / "dir", "trusted.note", b"root only")
    subprocess.run(["setfacl", "-m", "u:1000:rwx,g:100:r-x", str(root / "dir")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1000:r--", str(root / "dir")], check=True)
