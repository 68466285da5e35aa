"""`ext4box serve` on the native backend: mount /dev/fuse ourselves, then serve it.

Direct mode has no helper process, so the server mounts: as root with
mount(2) ("fd=N,rootmode=...,user_id=,group_id=" on an O_PATH fd of the
directory), otherwise through fusermount3's _FUSE_COMMFD hand-back — the
helper's own code (helper/fusemount.py), not a copy. A MOUNTPOINT of
/dev/fd/N is an already mounted /dev/fuse descriptor and is served as is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from ext4box.bdi import set_read_ahead
from ext4box.fuse.atime import AtimeMode
from ext4box.fuse.mount import MountConfig, MountSetupError, is_fd_mountpoint
from ext4box.fuse.operations import Operations
from ext4box.fuse.session import NotMounted, Session
from ext4box.fuse.uring_transport import why_unavailable
from ext4box.helper.errors import HelperError
from ext4box.helper.fusemount import MountSpec, mount, unmount
from ext4box.log import get_logger

log = get_logger("ext4box.fuse")


def serve_native(ops: Operations, config: MountConfig, image_path: str, *, trace: bool = False,
                 on_ready: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Mount (unless given an fd), serve until unmounted or signalled.

    `on_ready` runs once the kernel has our INIT reply: the mount is live.
    """
    if config.transport == "uring":
        # Refused before anything is mounted (the INIT check is the last word).
        why = why_unavailable()
        if why is not None:
            raise MountSetupError(f"transport=uring: {why}")
    if is_fd_mountpoint(config.mountpoint):
        fuse_fd = int(config.mountpoint.rpartition("/")[2])
        _serve(ops, fuse_fd, tune=on_ready, trace=trace, transport=config.transport)
        return
    # Resolved now: once mounted, any lookup of the mountpoint from this
    # process waits on our own request loop.
    resolved = os.path.realpath(config.mountpoint)
    spec = MountSpec(
        mountpoint=resolved,
        source=image_path,
        mode="rw" if "rw" in config.fuse_options else "ro",
        noexec="noexec" in config.fuse_options,
        allow_other="allow_other" in config.fuse_options,
        uid=os.getuid(),
        gid=os.getgid(),
        # The server's atime rule, which the mount's flags only display.
        noatime=ops.atime.mode is AtimeMode.NOATIME,
        nodiratime=ops.atime.nodiratime,
        strictatime=ops.atime.mode is AtimeMode.STRICTATIME,
    )
    if spec.nodiratime and not spec.noatime and os.geteuid() != 0:
        # fusermount3 has no nodiratime. The server applies it all the same
        # (fuse/atime.py): only the mount's flag, which changes nothing on
        # FUSE, is missing.
        log.info("mount flag not set", options="nodiratime", backend="native",
                 why="fusermount3 does not know it; the server applies it")  # fmt: skip
    try:
        fuse_fd = mount(spec)
    except HelperError as err:
        raise MountSetupError(str(err)) from None
    log.info("mounted", mountpoint=config.mountpoint, backend="native",
             options=",".join(sorted(config.fuse_options)))

    def tune() -> None:
        # The INIT reply caps the read-ahead, and it has just been processed.
        if os.geteuid() == 0:
            set_read_ahead(resolved)
        if on_ready is not None:
            on_ready()

    # Closing the fd first aborts the connection, so an unmount cannot wait on us.
    try:
        session = _serve(ops, fuse_fd, tune=tune, trace=trace, transport=config.transport)
    except MountSetupError:
        # Refused at INIT: no mount is left behind.
        os.close(fuse_fd)
        with contextlib.suppress(HelperError):
            unmount(resolved)
        raise
    except BaseException:
        os.close(fuse_fd)
        raise
    os.close(fuse_fd)
    if session.stopped_by is not None:
        # Stopped for a signal: the mount is still there (an external umount
        # ends the session with ENODEV instead).
        with contextlib.suppress(HelperError):
            unmount(resolved)
    log.info("unmounted", mountpoint=config.mountpoint)


def _serve(ops: Operations, fuse_fd: int, *, tune: Callable[[], None] | None,
           trace: bool, transport: str) -> Session:  # fmt: skip
    session = Session(ops, fuse_fd, after_init=tune, trace=trace, transport=transport)
    try:
        session.run()
    except NotMounted as err:
        raise MountSetupError(f"cannot serve: {err}") from None
    return session
