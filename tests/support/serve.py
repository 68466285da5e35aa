"""Run a FUSE server (`ext4box serve`, or fuse2fs for comparison) around a test body.

The server runs in the foreground as a child process. We wait until the
mountpoint's st_dev changes (the mount is live), and at exit unmount, wait for
the server and insist that it exits 0 — a server that crashes or hangs on the
way out fails the test that used it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from support.kernel import unmount

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

    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


def _wait_for_mount(served: ServedMount, dev_before: int, argv: Sequence[str]) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while time.monotonic() < deadline:
        if not served.alive():
            raise AssertionError(
                f"{argv[0]} exited with {served.process.returncode} before mounting "
                f"(argv {list(argv)}):\n{served.stderr_text()}"
            )
        try:
            if os.stat(served.mountpoint).st_dev != dev_before:
                return
        except OSError:
            pass  # a half-set-up FUSE mount can answer ENOTCONN for a moment
        time.sleep(_POLL_S)
    raise AssertionError(
        f"{list(argv)} did not mount within {MOUNT_TIMEOUT_S:.0f}s:\n{served.stderr_text()}"
    )


def mount_holders(fuse_dev: int) -> list[str]:
    """Processes whose mount namespace still has the FUSE mount `fuse_dev` (st_dev).

    A FUSE server sees its unmount only when the last copy of the mount is
    gone; a namespace created (unshare, a container) while the mount existed
    holds a copy. Naming the holders turns "did not exit" into a reason.
    """
    wanted = f" {os.major(fuse_dev)}:{os.minor(fuse_dev)} "
    holders = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if wanted in (entry / "mountinfo").read_text():
                comm = (entry / "comm").read_text().strip()
                namespace = os.readlink(entry / "ns" / "mnt")
                holders.append(f"pid {entry.name} ({comm}, {namespace})")
        except OSError:
            continue  # exited meanwhile, or not ours to read
    return holders


def _stop(served: ServedMount) -> None:
    """Unmount and reap the server; never leave a mount or a process behind."""
    fuse_dev = None
    with suppress(OSError):
        fuse_dev = os.stat(served.mountpoint).st_dev
    try:
        if os.path.ismount(served.mountpoint):
            if os.geteuid() == 0:
                unmount(served.mountpoint)
            else:
                subprocess.run(["fusermount3", "-u", str(served.mountpoint)], check=False)
    finally:
        try:
            served.process.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            holders = mount_holders(fuse_dev) if fuse_dev is not None else []
            served.process.kill()
            served.process.wait()
            held = (
                f"; copies of the mount are still held by {', '.join(holders)}"
                if holders
                else "; no process holds a copy of the mount"
            )
            raise AssertionError(
                f"server did not exit within {EXIT_TIMEOUT_S:.0f}s of the unmount{held} "
                f"(killed):\n{served.stderr_text()}"
            ) from None


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
        _wait_for_mount(handle, dev_before, argv)
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
    if os.path.ismount(handle.mountpoint):
        subprocess.run(["umount", "-l", str(handle.mountpoint)], check=False)
    if handle.alive():
        handle.process.kill()
    handle.process.wait()
