"""Serve a FUSE session on descriptors handed over by the host helper.

The helper has opened the image and /dev/fuse and performed the mount; the
entrypoint (ext4box.service.main) received both fds and verified them. Here, on
the native backend (the default):

    confine()                 (stage-2 seccomp: from here no path, no socket)
    parse the image           (first untrusted byte is read here)
    refuse policy features    (on the very superblock the session will serve)
    apply server options      (quota enforcement, the atime rule, writeback_cache:
                               as `serve -o`)
    FUSE_INIT answered        (the fd really carries a mount)
    ready()                   (READY to the helper), serve until the kernel unmounts

The session never mounts or unmounts anything, and at the end the helper's
umount (or a dead server's ENOTCONN) is the host's business. The pyfuse3
backend (backend="pyfuse3") runs the same steps inside a trio loop that is
started before confine() (its wakeup socketpair and epoll fd exist then);
pyfuse3 treats a mountpoint of /dev/fd/N as an already-mounted descriptor
and the session exists (READY) before INIT is answered.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.read.filesystem import Filesystem
from ext4box.fuse.atime import AtimePolicy, take_atime_options
from ext4box.fuse.fs_options import (
    WRITEBACK_NEEDS_NATIVE,
    apply_quota_options,
    take_quota_options,
    take_writeback_option,
)
from ext4box.fuse.operations import Operations
from ext4box.fuse.session import NotMounted, Session
from ext4box.handoff_protocol import Mode, ReceivedMount
from ext4box.iomap.direct_io import DirectIO
from ext4box.iomap.engine import IOMapEngine
from ext4box.log import get_logger
from ext4box.service.refusals import FeatureRefused, refuse_features

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
    backend: str = "native",
) -> int:
    """Serve `received` until the kernel side unmounts; returns the exit code (0).

    `confine` (the service's stage-2 seccomp filter) runs before the image is
    parsed. `ready` runs once the session is up: on the native backend after
    FUSE_INIT has been answered. Raises ServeRefused (both fds closed) when
    the request cannot be served; the caller tells the helper.
    """
    request = received.request
    try:
        unknown = sorted(set(request.options) - KNOWN_OPTIONS)
        if unknown:
            raise ServeRefused(f"unknown mount option(s): {','.join(unknown)}", errno.EINVAL)
        quota_types, atime, writeback_cache = _server_options(request.server_options)
        if writeback_cache and backend == "pyfuse3":
            raise ServeRefused(WRITEBACK_NEEDS_NATIVE, errno.EINVAL)
        if writeback_cache and request.mode is not Mode.RW:
            # As `ext4box serve -o ro,writeback_cache`: nothing to cache, the
            # kernel is not asked (Operations keeps it for writable mounts).
            log.warning("writeback_cache ignored", why="read-only mount")
            writeback_cache = False
    except ServeRefused:
        received.close()
        raise
    if backend == "pyfuse3":
        import trio

        trio.run(_serve_pyfuse3, received, ready, confine, quota_types, atime)
        return 0
    fs, direct = _confine_and_open(received, confine)
    try:
        engine = IOMapEngine(fs, fs.dev)
        engine.direct = direct
        apply_quota_options(fs, quota_types)
        # Session.negotiate asks the kernel for FUSE_WRITEBACK_CACHE from ops.
        ops = Operations(fs, engine, atime, writeback_cache=writeback_cache)
        session = Session(ops, received.fuse_fd, after_init=ready)
        try:
            session.run()
        except NotMounted as exc:
            raise ServeRefused(f"cannot serve /dev/fuse fd {received.fuse_fd}: {exc}",
                               errno.ENOTCONN) from None
        log.info("unmounted")
    finally:
        _close_quietly(received.fuse_fd)
        fs.close()
        fs.dev.close()
        if direct is not None:
            direct.close()
    return 0


def _confine_and_open(received: ReceivedMount, confine: Callable[[], None] | None
                      ) -> tuple[Filesystem, DirectIO | None]:
    """The filesystem, and the image's O_DIRECT twin if one could be opened."""
    direct: DirectIO | None = None
    try:
        # The helper opened the image fd O_RDWR only for a read-write grant.
        dev = BlockDevice(received.image_fd, writable=received.request.mode is Mode.RW)
        # Before the stage-2 filter, which forbids every open (iomap/direct_io.py).
        direct = DirectIO.reopen(dev)
        if confine is not None:
            confine()
    except BaseException:
        if direct is not None:
            direct.close()
        received.close()
        raise
    try:
        fs = _open_filesystem(dev, received.fuse_fd)
    except BaseException:
        dev.close()
        if direct is not None:
            direct.close()
        raise
    try:
        # The helper judged the image before the mount; the bytes may have
        # changed since. Judge the superblock parsed here, which is the one served.
        refuse_features(fs.sb, received.request.refused_features)
    except FeatureRefused as exc:
        _close_quietly(received.fuse_fd)
        fs.close()
        dev.close()
        if direct is not None:
            direct.close()
        raise ServeRefused(exc.reason, exc.errno) from None
    return fs, direct


async def _serve_pyfuse3(
    received: ReceivedMount, ready: Callable[[], None], confine: Callable[[], None] | None,
    quota_types: frozenset[int], atime: AtimePolicy,
) -> None:
    from ext4box.fuse import pyfuse3_backend

    fs, direct = _confine_and_open(received, confine)
    try:
        engine = IOMapEngine(fs, fs.dev)
        engine.direct = direct
        apply_quota_options(fs, quota_types)
        ops = Operations(fs, engine, atime)
        try:
            pyfuse3_backend.start_on_fd(ops, received.fuse_fd)
        except RuntimeError as exc:
            _close_quietly(received.fuse_fd)
            reason = f"cannot start the FUSE session on /dev/fd/{received.fuse_fd}: {exc}"
            raise ServeRefused(reason, errno.EIO) from None
        try:
            log.info("session", backend="pyfuse3", fuse_fd=received.fuse_fd,
                     block_size=fs.block_size)
            ready()
            await pyfuse3_backend.serve_until_unmounted(
                ops.commit_tick if ops.writable else None)
        finally:
            # Never unmount: this process may not (and must not) name a path.
            # fuse_session_destroy closes the fuse fd.
            pyfuse3_backend.close_session()
        log.info("unmounted")
    finally:
        fs.close()
        fs.dev.close()
        if direct is not None:
            direct.close()


def _server_options(options: tuple[str, ...]) -> tuple[frozenset[int], AtimePolicy, bool]:
    """The hand-off's server options read as `ext4box serve -o` reads them
    (quota types, atime rule, writeback_cache); a name this server does not
    know refuses the mount (never ignored: it may be a limit the policy enforces)."""
    quota_types, rest = take_quota_options(options)
    writeback_cache, rest = take_writeback_option(rest)
    atime, unknown = take_atime_options(rest)
    if unknown:
        raise ServeRefused(f"unknown server option(s): {','.join(unknown)}", errno.EINVAL)
    log.info("server options", options=",".join(options), quota_types=sorted(quota_types),
             atime=atime.mode.value, nodiratime=atime.nodiratime,
             writeback_cache=writeback_cache)  # fmt: skip
    return quota_types, atime, writeback_cache


def _open_filesystem(dev: BlockDevice, fuse_fd: int) -> Filesystem:
    try:
        return open_filesystem(dev, readonly=not dev.writable)
    except Ext4Error as exc:
        _close_quietly(fuse_fd)
        raise ServeRefused(f"cannot serve the image: {exc}", exc.errno) from None
    except BaseException:
        _close_quietly(fuse_fd)
        raise


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
