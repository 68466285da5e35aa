"""Kernel loop mounts of ext2/3/4 images: the reference every test compares against.

Every mount goes through an explicit loop device so that cleanup can always
detach it, even when the mount itself or the test body fails.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A freshly unmounted filesystem can keep its loop device busy for a moment.
_CLEANUP_ATTEMPTS = 20
_CLEANUP_PAUSE_S = 0.1


def why_no_kernel_mounts() -> str | None:
    """The reason loop mounts cannot be used here, or None if they can."""
    if os.geteuid() != 0:
        return "kernel loop mounts need root"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control: loop devices unavailable"
    for tool in ("losetup", "mount", "umount"):
        if not any(Path(d, tool).exists() for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")):
            return f"{tool} not installed"
    return None


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _attach_loop(image: Path, readonly: bool) -> str:
    argv = ["losetup", "--find", "--show"]
    if readonly:
        argv.append("--read-only")
    # Other processes grab loop devices too: a free one can be taken under us.
    for _ in range(_CLEANUP_ATTEMPTS):
        result = _run([*argv, str(image)])
        if result.returncode == 0:
            return result.stdout.strip()
        time.sleep(_CLEANUP_PAUSE_S)
    raise RuntimeError(f"losetup {image} failed: {result.stderr.strip()}")


def _detach_loop(loop_dev: str) -> None:
    for _ in range(_CLEANUP_ATTEMPTS):
        if _run(["losetup", "-d", loop_dev]).returncode == 0:
            return
        time.sleep(_CLEANUP_PAUSE_S)
    raise RuntimeError(f"could not detach {loop_dev}")


def unmount(mountpoint: Path) -> None:
    """Unmount, retrying while busy; fall back to a lazy unmount as a last resort."""
    last_error = ""
    for _ in range(_CLEANUP_ATTEMPTS):
        if not os.path.ismount(mountpoint):
            return
        result = _run(["umount", str(mountpoint)])
        if result.returncode == 0:
            return
        last_error = result.stderr.strip()
        time.sleep(_CLEANUP_PAUSE_S)
    _run(["umount", "-l", str(mountpoint)])
    raise RuntimeError(f"umount {mountpoint} failed (lazy unmount done): {last_error}")


@contextmanager
def kernel_mount(
    image: Path, mountpoint: Path, *, readonly: bool = True, options: str = ""
) -> Iterator[Path]:
    """Mount `image` with the kernel's ext4 driver (which also serves ext2/ext3).

    Read-only mounts use a read-only loop device too, so neither the journal
    nor atime can change the image under the test.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    loop_dev = _attach_loop(image, readonly)
    try:
        opts = ["ro" if readonly else "rw"]
        if options:
            opts.append(options)
        result = _run(["mount", "-t", "ext4", "-o", ",".join(opts), loop_dev, str(mountpoint)])
        if result.returncode != 0:
            raise RuntimeError(f"mount {image} failed: {result.stderr.strip()}")
        try:
            yield mountpoint
        finally:
            unmount(mountpoint)
    finally:
        _detach_loop(loop_dev)
