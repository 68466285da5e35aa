"""Mount options of `ext4box serve`, and its pyfuse3 serving path.

The user's -o options are checked against a short allow-list before any
backend sees them, so a typo is one clear error line rather than a libfuse
usage dump, and nosuid,nodev can never be turned off. `backend=native|pyfuse3`
picks the FUSE transport (native, ours, by default); on the native backend
`transport=auto|uring|dev` picks FUSE over io_uring or the plain /dev/fuse loop.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ext4box.bdi import set_read_ahead
from ext4box.log import get_logger

if TYPE_CHECKING:
    from ext4box.fuse.operations import Operations

log = get_logger("ext4box.fuse")

# Always on: the image's owner decides nothing about setuid files or device
# nodes on this machine; the kernel checks permissions from the inode modes.
# ("ro" is the default; `-o rw` replaces it.)
FORCED_OPTIONS = frozenset({"ro", "nosuid", "nodev", "default_permissions"})
# User options passed through to libfuse as given. (noatime and nodiratime
# arrive here as the mount flags of the server's atime rule: fuse/atime.py.)
PASSTHROUGH_OPTIONS = frozenset({"noexec", "allow_other", "noatime", "nodiratime"})
# Accepted and implied by FORCED_OPTIONS (or simply the default).
IMPLIED_OPTIONS = frozenset({"ro", "nosuid", "nodev", "default_permissions", "exec"})
# Meant for mount(8) and fstab, not for the filesystem: accepted and dropped,
# as mount(8) expects of a helper (mount.fuse3 strips most of them already).
FSTAB_ONLY_OPTIONS = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev",
                                "user", "users", "nouser", "owner", "group"})  # fmt: skip
FSTAB_ONLY_PREFIXES = ("x-", "comment=")
# The FUSE transports: our own on /dev/fuse (session.py), or libfuse via pyfuse3.
BACKENDS = ("native", "pyfuse3")
# The native backend's loops (fuse/uring_transport.py): io_uring or /dev/fuse.
TRANSPORTS = ("auto", "uring", "dev")
DEFAULT_BACKEND = "native"
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
    backend: str = DEFAULT_BACKEND
    # The native backend's loop: auto (io_uring when the kernel offers it),
    # uring (or refuse to mount), dev (the plain /dev/fuse loop).
    transport: str = "auto"


def split_options(values: Iterable[str]) -> list[str]:
    """Flatten repeated `-o a,b -o c` into ['a', 'b', 'c']."""
    return [opt.strip() for value in values for opt in value.split(",") if opt.strip()]


def fuse_options(
    image_path: str, user_options: Iterable[str], *, as_root: bool, debug: bool = False
) -> frozenset[str]:
    """The option set (libfuse names), or MountSetupError naming the bad option."""
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
        elif opt in FSTAB_ONLY_OPTIONS or opt.startswith(FSTAB_ONLY_PREFIXES):
            continue
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


def take_backend(options: Iterable[str]) -> tuple[str, list[str]]:
    """Split `backend=NAME` (the last one wins) from the mount options."""
    backend, rest = DEFAULT_BACKEND, []
    for opt in options:
        if opt.startswith("backend="):
            backend = opt.partition("=")[2]
            if backend not in BACKENDS:
                raise MountSetupError(
                    f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        else:
            rest.append(opt)
    return backend, rest


def take_transport(options: Iterable[str]) -> tuple[str, list[str]]:
    """Split `transport=auto|uring|dev` (the last one wins) from the mount options."""
    transport, rest = "auto", []
    for opt in options:
        if opt.startswith("transport="):
            transport = opt.partition("=")[2]
            if transport not in TRANSPORTS:
                raise MountSetupError(
                    f"unknown transport {transport!r} (choose from {', '.join(TRANSPORTS)})")
        else:
            rest.append(opt)
    return transport, rest


def is_fd_mountpoint(mountpoint: str) -> bool:
    return mountpoint.startswith(_FD_MOUNTPOINT_PREFIX)


def serve_pyfuse3(ops: Operations, config: MountConfig,
                  on_ready: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Mount through libfuse, serve until unmounted or signalled.

    `on_ready` runs once the mount answers (see pyfuse3_backend.serve_mounted).
    """
    from ext4box.fuse.pyfuse3_backend import serve_mounted

    # Resolved now: once mounted, any lookup of the mountpoint from this process
    # waits on our own request loop.
    resolved = os.path.realpath(config.mountpoint)
    tune = None
    if not is_fd_mountpoint(config.mountpoint) and os.geteuid() == 0:
        def tune() -> bool:
            return set_read_ahead(resolved)
    log.info("mounting", mountpoint=config.mountpoint, backend="pyfuse3",
             options=",".join(sorted(config.fuse_options)))
    try:
        # Unmounts if we stop for a signal; a no-op after an external umount.
        serve_mounted(ops, config.mountpoint, _libfuse_options(config.fuse_options),
                      unmount=True, tune=tune,
                      on_ready=on_ready,
                      probe=None if is_fd_mountpoint(config.mountpoint) else resolved)
    except RuntimeError as err:
        # libfuse has already printed its own reason on stderr.
        raise MountSetupError(f"cannot mount on {config.mountpoint}: {err}") from None
    log.info("unmounted", mountpoint=config.mountpoint)


def _libfuse_options(options: frozenset[str]) -> set[str]:
    """libfuse 3 rejects nodiratime as unknown (noatime it passes to the
    kernel). The server applies it all the same (fuse/atime.py): only the
    mount's flag, which changes nothing on FUSE, is missing."""
    if "nodiratime" in options:
        log.info("mount flag not set", options="nodiratime", backend="pyfuse3",
                 why="libfuse does not know it; the server applies it")  # fmt: skip
    return set(options - {"nodiratime"})


def _escape_option_value(value: str) -> str:
    """Make a value safe inside one libfuse -o argument.

    libfuse splits options at commas unless backslash-escaped, and pyfuse3
    encodes options as ASCII.
    """
    text = value.encode("ascii", "replace").decode("ascii")
    return text.replace("\\", "\\\\").replace(",", "\\,")
