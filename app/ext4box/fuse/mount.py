"""Mount options and the serving loop of `ext4box serve`.

The user's -o options are checked against a short allow-list before libfuse
sees them, so a typo is one clear error line rather than a libfuse usage dump,
and nosuid,nodev can never be turned off.
"""

from __future__ import annotations

import gc
import os
import signal
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyfuse3
import trio

from ext4box.bdi import set_read_ahead
from ext4box.fuse.ops import Ext4Operations
from ext4box.log import get_logger

log = get_logger("ext4box.fuse")

# Always on: the image's owner decides nothing about setuid files or device
# nodes on this machine; the kernel checks permissions from the inode modes.
# ("ro" is the default; `-o rw` replaces it.)
FORCED_OPTIONS = frozenset({"ro", "nosuid", "nodev", "default_permissions"})
# User options passed through to libfuse as given.
PASSTHROUGH_OPTIONS = frozenset({"noexec", "allow_other", "noatime", "nodiratime"})
# Accepted and implied by FORCED_OPTIONS (or simply the default).
IMPLIED_OPTIONS = frozenset({"ro", "nosuid", "nodev", "default_permissions", "exec"})
# ext4's default commit interval: changes are made durable at least this often.
COMMIT_INTERVAL_S = 5.0
REFUSED_OPTIONS = {
    "suid": "option 'suid' is not allowed: mounts are always nosuid",
    "dev": "option 'dev' is not allowed: mounts are always nodev",
}

_FD_MOUNTPOINT_PREFIX = "/dev/fd/"


class MountSetupError(Exception):
    """A problem with the options or the mountpoint, reported as one line."""


@dataclass(frozen=True, slots=True)
class MountConfig:
    mountpoint: str
    fuse_options: frozenset[str]


def split_options(values: Iterable[str]) -> list[str]:
    """Flatten repeated `-o a,b -o c` into ['a', 'b', 'c']."""
    return [opt.strip() for value in values for opt in value.split(",") if opt.strip()]


def fuse_options(
    image_path: str, user_options: Iterable[str], *, as_root: bool, debug: bool = False
) -> frozenset[str]:
    """The option set for pyfuse3.init, or MountSetupError naming the bad option."""
    options = set(FORCED_OPTIONS)
    options.add("fsname=" + _escape_option_value(image_path))
    options.add("subtype=ext4box")
    if as_root:
        # Other users may read, subject to the inode permissions
        # (default_permissions makes the kernel enforce them).
        options.add("allow_other")
    exec_requested = False
    for opt in user_options:
        if opt in REFUSED_OPTIONS:
            raise MountSetupError(REFUSED_OPTIONS[opt])
        if opt in ("ro", "rw"):
            # The last of ro/rw wins, as with mount(8).
            options.discard("ro" if opt == "rw" else "rw")
            options.add(opt)
        elif opt in PASSTHROUGH_OPTIONS:
            options.add(opt)
        elif opt in IMPLIED_OPTIONS:
            exec_requested |= opt == "exec"
        else:
            raise MountSetupError(f"unknown mount option {opt!r}")
    if exec_requested:
        options.discard("noexec")
    if debug:
        options.add("debug")  # libfuse prints every request
    return frozenset(options)


def check_mountpoint(mountpoint: str) -> None:
    """A directory to mount on, or /dev/fd/N: an already-open /dev/fuse descriptor."""
    if mountpoint.startswith(_FD_MOUNTPOINT_PREFIX):
        number = mountpoint[len(_FD_MOUNTPOINT_PREFIX) :]
        if not number.isdigit():
            raise MountSetupError(f"bad file descriptor mountpoint {mountpoint!r}")
        try:
            os.fstat(int(number))
        except OSError as err:
            raise MountSetupError(f"mountpoint {mountpoint}: {err.strerror}") from None
        return
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountSetupError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as err:
        raise MountSetupError(f"mountpoint {mountpoint}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountSetupError(f"mountpoint {mountpoint} is not a directory")


def serve(ops: Ext4Operations, config: MountConfig) -> None:
    """Mount, serve in the foreground until unmounted or signalled, unmount."""
    # Resolved now: once mounted, any lookup of the mountpoint from this process
    # waits on our own request loop.
    resolved = os.path.realpath(config.mountpoint)
    try:
        pyfuse3.init(ops, config.mountpoint, set(config.fuse_options))
    except RuntimeError as err:
        # libfuse has already printed its own reason on stderr.
        raise MountSetupError(f"cannot mount on {config.mountpoint}: {err}") from None
    log.info("mounted", mountpoint=config.mountpoint, options=",".join(sorted(config.fuse_options)))
    tune = None
    if not config.mountpoint.startswith(_FD_MOUNTPOINT_PREFIX) and os.geteuid() == 0:
        def tune() -> bool:
            return set_read_ahead(resolved)
    try:
        trio.run(serve_until_unmounted, ops.commit_tick if ops.writable else None, tune)
    finally:
        # Unmounts if we stop for a signal; a no-op after an external umount.
        pyfuse3.close(unmount=True)
    log.info("unmounted", mountpoint=config.mountpoint)


async def serve_until_unmounted(commit: Callable[[], None] | None = None,
                                 tune: Callable[[], bool] | None = None) -> None:
    """Run pyfuse3's loop until the kernel unmounts or SIGINT/SIGTERM/SIGHUP arrives.

    `commit` (read-write mounts) runs every COMMIT_INTERVAL_S in the loop,
    between requests. `tune` adjusts the mount once the kernel has processed
    our FUSE_INIT reply (which would undo it). Shared with ext4box.fuse.serve
    (the appliance's fd hand-off path).
    """
    # Everything alive now (modules, the opened filesystem) lives as long as
    # the session: out of the collector's sight, a full collection walks only
    # what requests create (cheaper per request: a cold readdirplus entry
    # spent ~2.5 µs of 14 in the collector).
    gc.freeze()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        if commit is not None:
            nursery.start_soon(_commit_periodically, commit)
        if tune is not None:
            nursery.start_soon(_tune_after_init, tune)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _tune_after_init(tune: Callable[[], bool]) -> None:
    # FUSE_INIT is the kernel's first request and is answered as soon as the loop
    # runs; its reply caps the read-ahead, so set it after that, and once more
    # later in case the reply was slow.
    for delay in (0.2, 1.0):
        await trio.sleep(delay)
        try:
            if not tune():
                return
        except Exception as err:  # tuning must never stop the server
            log.warning("tuning failed", exc_info=err)
            return


async def _commit_periodically(commit: Callable[[], None]) -> None:
    while True:
        await trio.sleep(COMMIT_INTERVAL_S)
        try:
            commit()
        except Exception as err:  # a failed commit must not stop the server
            log.error("commit failed", exc_info=err)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("terminating", signal=signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def _escape_option_value(value: str) -> str:
    """Make a value safe inside one libfuse -o argument.

    libfuse splits options at commas unless backslash-escaped, and pyfuse3
    encodes options as ASCII.
    """
    text = value.encode("ascii", "replace").decode("ascii")
    return text.replace("\\", "\\\\").replace(",", "\\,")
