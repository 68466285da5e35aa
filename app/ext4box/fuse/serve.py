"""Serve a FUSE session on descriptors handed over by the host helper.

The helper has opened the image and /dev/fuse and performed the mount; the
service (ext4box.service.main) received both fds and verified them. Here:

    trio loop starts          (its wakeup socketpair and epoll fd exist now)
    confine()                 (stage-2 seccomp: from here no path, no socket)
    parse the image           (first untrusted byte is read here)
    pyfuse3 session on /dev/fd/N, ready(), serve until the kernel unmounts

The session never mounts or unmounts anything: pyfuse3 treats a mountpoint
of /dev/fd/N as an already-mounted /dev/fuse descriptor, and at the end the
helper's umount (or a dead server's ENOTCONN) is the host's business.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable

import pyfuse3
import trio

from ext4box.blockdev import BlockDevice
from ext4box.ext4.errors import Ext4Error
from ext4box.ext4.filesystem import Filesystem
from ext4box.fuse.mount import serve_until_unmounted
from ext4box.fuse.ops import Ext4Operations
from ext4box.iomap.engine import IOMapEngine
from ext4box.log import get_logger
from ext4box.service.protocol import Mode, ReceivedMount

log = get_logger("ext4box.fuse")

# Mount options the helper may report in MOUNT. It applied them at mount(2)
# time; the server only checks that it knows them (an unknown one means the
# helper expects something this server does not do).
KNOWN_OPTIONS = frozenset(
    {"ro", "rw", "nosuid", "nodev", "noexec", "allow_other", "default_permissions",
     "noatime", "nodiratime"}
)  # fmt: skip


class ServeRefused(Exception):
    """The session cannot start; `errno` travels to the helper in ERROR."""

    def __init__(self, reason: str, err: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = err


def serve_fds(
    received: ReceivedMount,
    ready: Callable[[], None],
    *,
    confine: Callable[[], None] | None = None,
) -> int:
    """Serve `received` until the kernel side unmounts; returns the exit code (0).

    `confine` (the service's stage-2 seccomp filter) runs inside the trio
    loop before the image is parsed. `ready` runs once the pyfuse3 session
    exists on the fuse fd. Raises ServeRefused (both fds closed) when the
    request cannot be served; the caller tells the helper.
    """
    request = received.request
    try:
        unknown = sorted(set(request.options) - KNOWN_OPTIONS)
        if unknown:
            raise ServeRefused(f"unknown mount option(s): {','.join(unknown)}", errno.EINVAL)
    except ServeRefused:
        received.close()
        raise
    trio.run(_serve, received, ready, confine)
    return 0


async def _serve(
    received: ReceivedMount, ready: Callable[[], None], confine: Callable[[], None] | None
) -> None:
    try:
        if confine is not None:
            confine()
        # The helper opened the image fd O_RDWR only for a read-write grant.
        dev = BlockDevice(received.image_fd, writable=received.request.mode is Mode.RW)
    except BaseException:
        received.close()
        raise
    try:
        fs = _open_filesystem(dev, received.fuse_fd)
        try:
            await _run_session(fs, IOMapEngine(fs, fs.dev), received.fuse_fd, ready)
        finally:
            fs.close()
    finally:
        dev.close()


def _open_filesystem(dev: BlockDevice, fuse_fd: int) -> Filesystem:
    try:
        return Filesystem.open(dev, readonly=not dev.writable)
    except Ext4Error as exc:
        _close_quietly(fuse_fd)
        raise ServeRefused(f"cannot serve the image: {exc}", exc.errno) from None
    except BaseException:
        _close_quietly(fuse_fd)
        raise


async def _run_session(
    fs: Filesystem, engine: IOMapEngine, fuse_fd: int, ready: Callable[[], None]
) -> None:
    mountpoint = f"/dev/fd/{fuse_fd}"
    try:
        # Options are the helper's, applied at mount(2); none is needed here.
        ops = Ext4Operations(fs, engine)
        pyfuse3.init(ops, mountpoint, set())
    except RuntimeError as exc:
        _close_quietly(fuse_fd)
        reason = f"cannot start the FUSE session on {mountpoint}: {exc}"
        raise ServeRefused(reason, errno.EIO) from None
    try:
        log.info("session", fuse_fd=fuse_fd, block_size=fs.block_size)
        ready()
        # Read-write: commit every few seconds; fs.close() (the caller's) marks
        # the image clean after the kernel unmounts or a signal stops us.
        await serve_until_unmounted(ops.commit_tick if ops.writable else None)
    finally:
        # Never unmount: this process may not (and must not) name a path.
        # fuse_session_destroy closes the fuse fd.
        pyfuse3.close(unmount=False)
    log.info("unmounted")


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
