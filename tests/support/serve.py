"""Run a FUSE server (`ext4box serve`, or fuse2fs for comparison) around a test body.

The server runs in the foreground as a child process. We wait until the
mountpoint's st_dev changes (the mount is live), and at exit unmount, wait for
the server and insist that it exits 0 — a server that crashes or hangs on the
way out fails the test that used it. Copies of the mount in other people's
namespaces do not hang the teardown: support.fuse_teardown aborts the
connection then, and the server must still exit 0 (ENODEV ends its session
exactly as an unmount does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from support import fuse_teardown as teardown
from support.fuse_teardown import FuseConnection

MOUNT_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0
_POLL_S = 0.05


def ext4box_executable() -> list[str]:
    """The ext4box command of this checkout's virtualenv, else `python -m ext4box`."""
    script = Path(sys.executable).with_name("ext4box")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "ext4box"]


def fuse_backend() -> str:
    """The FUSE transport `ext4box serve` runs in tests: EXT4BOX_TEST_BACKEND, else native.

    `make test` runs the FUSE-level suite and the kernel-vs-ext4box
    differential a second time with EXT4BOX_TEST_BACKEND=pyfuse3.
    """
    backend = os.environ.get("EXT4BOX_TEST_BACKEND", "native")
    if backend not in ("native", "pyfuse3"):
        raise ValueError(f"EXT4BOX_TEST_BACKEND must be native or pyfuse3, not {backend!r}")
    return backend


def fuse_transport() -> str | None:
    """The native backend's loop in tests: EXT4BOX_TEST_TRANSPORT (auto, uring, dev), else
    the server's default. `make test` runs the FUSE-level suite once more with uring
    (tests/conftest.py turns the kernel's enable_uring on for that run)."""
    transport = os.environ.get("EXT4BOX_TEST_TRANSPORT")
    if transport not in (None, "auto", "uring", "dev"):
        raise ValueError(f"EXT4BOX_TEST_TRANSPORT must be auto, uring or dev, not {transport!r}")
    return transport


def ext4box_argv(image: Path, mountpoint: Path, options: str = "ro", *,
                 backend: str | None = None) -> list[str]:
    """`ext4box serve -f`: in the foreground, so that its exit status is ours to check.

    `backend`: the FUSE transport (default: `fuse_backend()`); on the native
    backend EXT4BOX_TEST_TRANSPORT adds transport= unless `options` has one.
    Read-write mounts also get EXT4BOX_TEST_RW_OPTIONS (comma-separated), so
    the whole suite can run with e.g. writeback_cache.
    """
    if options.split(",")[0] == "rw":
        extra = [o for o in os.environ.get("EXT4BOX_TEST_RW_OPTIONS", "").split(",") if o]
        options = ",".join(dict.fromkeys([*options.split(","), *extra]))
    backend = backend or fuse_backend()
    options = f"{options},backend={backend}"
    if fuse_transport() is not None and backend == "native" and "transport=" not in options:
        options += f",transport={fuse_transport()}"
    return [*ext4box_executable(), "serve", "-f", str(image), str(mountpoint), "-o", options]


def fuse2fs_argv(image: Path, mountpoint: Path) -> list[str]:
    # -f keeps fuse2fs in the foreground so we can wait for its exit code;
    # fakeroot lets the walk read every file whatever its mode.
    return ["fuse2fs", "-f", str(image), str(mountpoint), "-o", "ro,fakeroot"]


def why_no_fuse() -> str | None:
    """The reason FUSE mounts cannot be used here, or None if they can."""
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc.strerror}"
    os.close(fd)
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return "not root and no fusermount3"
    return None


def server_kind() -> str:
    """Which server the FUSE-side fixtures run: ext4box, or fuse2fs to check the machinery."""
    kind = os.environ.get("EXT4BOX_TEST_SERVER", "ext4box")
    if kind not in ("ext4box", "fuse2fs"):
        raise ValueError(f"EXT4BOX_TEST_SERVER must be ext4box or fuse2fs, not {kind!r}")
    return kind


def server_argv(image: Path, mountpoint: Path) -> list[str]:
    if server_kind() == "fuse2fs":
        return fuse2fs_argv(image, mountpoint)
    return ext4box_argv(image, mountpoint)


@dataclass(frozen=True, slots=True)
class ServedMount:
    mountpoint: Path
    process: subprocess.Popen[bytes]
    stderr_path: Path
    # The FUSE connection, recorded as soon as the mount is live: after the
    # unmount (or once the server is dead) the mountpoint no longer names it.
    connection: FuseConnection | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


def _wait_for_mount(served: ServedMount, dev_before: int, argv: Sequence[str]) -> FuseConnection:
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while time.monotonic() < deadline:
        if not served.alive():
            raise AssertionError(
                f"{argv[0]} exited with {served.process.returncode} before mounting "
                f"(argv {list(argv)}):\n{served.stderr_text()}"
            )
        try:
            dev = os.stat(served.mountpoint).st_dev
            if dev != dev_before:
                return FuseConnection(dev)
        except OSError:
            pass  # a half-set-up FUSE mount can answer ENOTCONN for a moment
        time.sleep(_POLL_S)
    raise AssertionError(
        f"{list(argv)} did not mount within {MOUNT_TIMEOUT_S:.0f}s:\n{served.stderr_text()}"
    )


def _stop(served: ServedMount) -> None:
    """Unmount (a dead mount too) and reap the server; never leave a mount or a process behind.

    A server kept waiting only by other people's copies of the mount has its
    connection aborted (support.fuse_teardown); one kept by a copy of ours
    fails the test.
    """
    try:
        if served.connection is not None:
            teardown.unmount(served.mountpoint, served.connection)
    finally:
        try:
            teardown.wait_for_server_exit(served.process, served.connection, served.mountpoint,
                                          EXIT_TIMEOUT_S)
        except AssertionError as err:
            served.process.kill()
            served.process.wait()
            raise AssertionError(f"{err} (killed):\n{served.stderr_text()}") from None


@contextmanager
def served(
    image: Path,
    mountpoint: Path,
    argv: Sequence[str] | None = None,
    *,
    expect_exit_zero: bool = True,
) -> Iterator[ServedMount]:
    """Serve `image` at `mountpoint` for the duration of the block.

    At exit the server must have stayed up (unless the body killed it) and must
    exit 0 after the unmount; otherwise AssertionError with its stderr.
    """
    if argv is None:
        argv = server_argv(image, mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    dev_before = os.stat(mountpoint).st_dev
    stderr_path = mountpoint.with_name(mountpoint.name + ".stderr")
    with stderr_path.open("wb") as stderr_file:
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=stderr_file, stderr=stderr_file
        )
    handle = ServedMount(mountpoint, process, stderr_path)
    try:
        handle = replace(handle, connection=_wait_for_mount(handle, dev_before, argv))
    except BaseException:
        _kill_quietly(handle)
        raise
    body_failed = False
    try:
        yield handle
    except BaseException:
        body_failed = True
        raise
    finally:
        was_alive = handle.alive()
        try:
            _stop(handle)
        except AssertionError:
            if not body_failed:
                raise
        if not body_failed and expect_exit_zero:
            if not was_alive:
                raise AssertionError(
                    f"server died during the test with exit code {process.returncode}:\n"
                    f"{handle.stderr_text()}"
                )
            if process.returncode != 0:
                raise AssertionError(
                    f"server exited {process.returncode} after unmount "
                    f"(expected 0):\n{handle.stderr_text()}"
                )


def _kill_quietly(handle: ServedMount) -> None:
    # Only when mounting failed: a connection, if any, was never recorded.
    if os.path.ismount(handle.mountpoint):
        subprocess.run(["umount", "-l", str(handle.mountpoint)], check=False)
    if handle.alive():
        handle.process.kill()
    handle.process.wait()
