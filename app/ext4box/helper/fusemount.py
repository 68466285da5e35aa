"""Open /dev/fuse and mount it: as root onto a held directory fd (the new
mount API, mount(2) where the kernel lacks it), fusermount3 otherwise.

The helper mounts before the server exists; the kernel queues FUSE_INIT on
the fd and holds every access to the mountpoint until the server, handed the
same fd, answers it. Options are fixed here, never taken from the server:
nosuid,nodev and default_permissions (the kernel checks the image's modes)
always, ro unless rw was granted, noexec and allow_other when the policy's
rule lists them, and the atime flags of the server options it granted.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import os
import shutil
import socket
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ext4box.fuse.atime import AtimeMode, take_atime_options
from ext4box.helper import mountpoint_fd, syscalls
from ext4box.helper.errors import HelperError
from ext4box.log import get_logger

log = get_logger("ext4box.helper")

FUSE_DEVICE = "/dev/fuse"
FSTYPE = "fuse.ext4box"
SUBTYPE = "ext4box"
FUSERMOUNT_TIMEOUT = 30.0

# linux/mount.h
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_STRICTATIME = 1 << 24
UMOUNT_NOFOLLOW = 0x8
MNT_DETACH = 0x2


@dataclass(frozen=True, slots=True)
class MountSpec:
    """What the helper mounts; every field comes from the policy decision."""

    mountpoint: str  # resolved absolute directory (the held fd's path, when given)
    source: str  # shown in /proc/mounts: the image path
    mode: str  # "ro" | "rw"
    noexec: bool
    allow_other: bool
    uid: int  # owner of the mount (user_id=): the invoking user
    gid: int
    # The mountpoint the decision was made on (ext4box.helper.mountpoint_fd.hold);
    # as root the mount is attached to exactly this fd. None: held here.
    dir_fd: int | None = None
    # Access-time flags of the mount, from the server's atime rule (`-o
    # noatime|strictatime|nodiratime`, see with_atime). FUSE inodes ignore
    # them (the server applies the rule); they keep /proc/mounts truthful.
    # fusermount3 is told noatime only.
    noatime: bool = False
    nodiratime: bool = False
    strictatime: bool = False


def with_atime(spec: MountSpec, server_options: Iterable[str]) -> MountSpec:
    """`spec` with the mount flags that say what the atime options among
    `server_options` make the server do (fuse/atime.py's precedence)."""
    atime, _ = take_atime_options(server_options)
    return replace(spec, noatime=atime.mode is AtimeMode.NOATIME,
                   strictatime=atime.mode is AtimeMode.STRICTATIME,
                   nodiratime=atime.nodiratime)  # fmt: skip


@dataclass(slots=True)
class Mounted:
    """A FUSE mount made by the helper: the fd the server must serve, and (new
    mount API only) an fd of the mount itself, to unmount exactly it."""

    fuse_fd: int
    mount_fd: int | None = None

    def release_mount_fd(self) -> None:
        if self.mount_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.mount_fd)
            self.mount_fd = None


def mount(spec: MountSpec) -> int:
    """Mount and return the /dev/fuse fd the server must serve (close-on-exec)."""
    mounted = mount_held(spec)
    mounted.release_mount_fd()
    return mounted.fuse_fd


def mount_held(spec: MountSpec) -> Mounted:
    """Mount: as root on spec.dir_fd (new mount API), otherwise through fusermount3."""
    if os.geteuid() == 0:
        return _mount_as_root(spec)
    return Mounted(mount_with_fusermount(spec))


def unmount_mounted(mounted: Mounted, mountpoint: str) -> None:
    """Undo a mount this process just made: through its own mount fd when there
    is one (never a path someone could have redirected meanwhile)."""
    if mounted.mount_fd is not None:
        try:
            syscalls.umount2(f"/proc/self/fd/{mounted.mount_fd}", MNT_DETACH)
        except OSError as err:
            log.warning("unmount_failed", mountpoint=mountpoint, why=err.strerror)
        mounted.release_mount_fd()
        return
    with contextlib.suppress(HelperError, OSError):
        unmount(mountpoint)


# -- root: the new mount API onto a held fd; mount(2) where the kernel lacks it --


def mount_as_root(spec: MountSpec) -> int:
    mounted = _mount_as_root(spec)
    mounted.release_mount_fd()
    return mounted.fuse_fd


def _mount_as_root(spec: MountSpec) -> Mounted:
    try:
        fuse_fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise HelperError(f"cannot open {FUSE_DEVICE}: {err.strerror}") from None
    held = None
    try:
        dir_fd = spec.dir_fd
        if dir_fd is None:
            held = mountpoint_fd.hold(spec.mountpoint, resolve_links=False)
            dir_fd = held.fd
        try:
            mount_fd = _attach_new_api(spec, fuse_fd, dir_fd)
        except _NoNewMountApi as missing:
            log.warning("mount_api_fallback", mountpoint=spec.mountpoint, why=str(missing),
                        using="mount(2) on /proc/self/fd/N")  # fmt: skip
            _attach_mount2(spec, fuse_fd, dir_fd)
            mount_fd = None
    except OSError as err:
        os.close(fuse_fd)
        raise HelperError(f"cannot mount on {spec.mountpoint}: {err.strerror}") from None
    except BaseException:
        os.close(fuse_fd)
        raise
    finally:
        if held is not None:
            held.close()
    return Mounted(fuse_fd, mount_fd)


class _NoNewMountApi(Exception):
    """fsopen & co. are missing (ENOSYS) or filtered (EPERM from seccomp)."""


def _options(spec: MountSpec, fuse_fd: int) -> list[str]:
    options = [f"fd={fuse_fd}", "rootmode=40000", f"user_id={spec.uid}",
               f"group_id={spec.gid}", "default_permissions"]  # fmt: skip
    if spec.allow_other:
        options.append("allow_other")
    return options


def _attach_new_api(spec: MountSpec, fuse_fd: int, dir_fd: int) -> int:
    """fsopen/fsconfig/fsmount, then move_mount onto dir_fd: no path is resolved."""
    try:
        fs_fd = syscalls.fsopen("fuse")
    except OSError as err:
        if err.errno in (errno.ENOSYS, errno.EPERM):
            raise _NoNewMountApi(err.strerror) from None
        raise
    try:
        try:
            syscalls.fsconfig_string(fs_fd, "source", spec.source)
            syscalls.fsconfig_string(fs_fd, "subtype", SUBTYPE)
            for option in _options(spec, fuse_fd):
                key, sep, value = option.partition("=")
                if sep:
                    syscalls.fsconfig_string(fs_fd, key, value)
                else:
                    syscalls.fsconfig_flag(fs_fd, key)
            if spec.mode == "ro":
                syscalls.fsconfig_flag(fs_fd, "ro")
            syscalls.fsconfig_create(fs_fd)
        except OSError as err:
            said = "; ".join(syscalls.fs_messages(fs_fd))
            raise OSError(err.errno, f"{err.strerror}" + (f" ({said})" if said else "")) from None
        attrs = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
        if spec.mode == "ro":
            attrs |= syscalls.MOUNT_ATTR_RDONLY
        if spec.noexec:
            attrs |= syscalls.MOUNT_ATTR_NOEXEC
        if spec.strictatime:
            attrs |= syscalls.MOUNT_ATTR_STRICTATIME
        elif spec.noatime:
            attrs |= syscalls.MOUNT_ATTR_NOATIME
        if spec.nodiratime:
            attrs |= syscalls.MOUNT_ATTR_NODIRATIME
        mount_fd = syscalls.fsmount(fs_fd, attrs)
    finally:
        os.close(fs_fd)
    try:
        syscalls.move_mount_onto_fd(mount_fd, dir_fd)
    except BaseException:
        os.close(mount_fd)  # never attached: closing it dissolves the mount
        raise
    return mount_fd


def _attach_mount2(spec: MountSpec, fuse_fd: int, dir_fd: int) -> None:
    # /proc/self/fd/N jumps to the held directory itself: still no second
    # resolution of the mountpoint's path.
    flags = MS_NOSUID | MS_NODEV
    if spec.mode == "ro":
        flags |= MS_RDONLY
    if spec.noexec:
        flags |= MS_NOEXEC
    if spec.strictatime:
        flags |= MS_STRICTATIME
    elif spec.noatime:
        flags |= MS_NOATIME
    if spec.nodiratime:
        flags |= MS_NODIRATIME
    syscalls.mount2(spec.source, f"/proc/self/fd/{dir_fd}", FSTYPE, flags,
                    ",".join(_options(spec, fuse_fd)))  # fmt: skip


# -- unprivileged: fusermount3 and _FUSE_COMMFD --------------------------------


def fusermount_path() -> str:
    found = shutil.which("fusermount3") or next(
        (p for p in ("/usr/bin/fusermount3", "/bin/fusermount3") if os.path.exists(p)), None
    )
    if found is None:
        raise HelperError(
            "fusermount3 is not installed (package fuse3); it mounts for non-root users"
        )
    return found


def fusermount_options(spec: MountSpec) -> str:
    options = ["nosuid", "nodev", "default_permissions", spec.mode, f"subtype={SUBTYPE}"]
    if spec.noexec:
        options.append("noexec")
    if spec.noatime:
        options.append("noatime")
    if spec.allow_other:
        options.append("allow_other")
    # fusermount3 splits on commas and treats backslashes specially: name the
    # image only when its path cannot be misread as more options.
    if all(ch.isprintable() and ch not in ",\\ " for ch in spec.source):
        options.append(f"fsname={spec.source}")
    else:
        options.append(f"fsname={SUBTYPE}")
    return ",".join(options)


def mount_with_fusermount(spec: MountSpec) -> int:
    """fusermount3 mounts and sends the /dev/fuse fd back over a socketpair.

    The protocol libfuse uses: the environment variable _FUSE_COMMFD names our
    end of an AF_UNIX stream socketpair; fusermount3 opens /dev/fuse (with the
    caller's permissions), mounts, and sends the fd with SCM_RIGHTS.
    """
    tool = fusermount_path()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            theirs.set_inheritable(True)
            proc = subprocess.run(
                [tool, "-o", fusermount_options(spec), "--", spec.mountpoint],
                env={"_FUSE_COMMFD": str(theirs.fileno()), "PATH": "/usr/bin:/bin"},
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=FUSERMOUNT_TIMEOUT,
                cwd="/",
            )
        except subprocess.TimeoutExpired:
            raise HelperError(
                f"fusermount3 did not finish within {FUSERMOUNT_TIMEOUT:.0f} s"
            ) from None
        finally:
            theirs.close()
        if proc.returncode != 0:
            raise HelperError(f"cannot mount on {spec.mountpoint}: {_last_line(proc.stderr)}")
        ours.settimeout(FUSERMOUNT_TIMEOUT)
        fd = _receive_fd(ours)
    if fd is None:
        # Mounted but no fd came back: undo rather than leave a dead mount.
        with contextlib.suppress(HelperError):
            unmount(spec.mountpoint)
        raise HelperError("fusermount3 mounted but did not pass back the /dev/fuse fd")
    os.set_inheritable(fd, False)
    return fd


def _receive_fd(sock: socket.socket) -> int | None:
    room = socket.CMSG_SPACE(4 * array.array("i").itemsize)
    try:
        _, ancdata, _, _ = sock.recvmsg(1, room, socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return None
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % array.array("i").itemsize
            fds.extend(array.array("i", payload[:whole]))
    for extra in fds[1:]:
        os.close(extra)
    return fds[0] if fds else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


# -- unmount and mount table ----------------------------------------------------


def unmount(mountpoint: str) -> bool:
    """Unmount; False if nothing was mounted there. Works on a dead server's mount."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), ctypes.c_int(UMOUNT_NOFOLLOW)) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        if err == errno.EBUSY:
            raise HelperError(
                f"cannot unmount {mountpoint}: it is busy (files open or a cwd in it)"
            )
        raise HelperError(f"cannot unmount {mountpoint}: {os.strerror(err)}")
    proc = subprocess.run(
        [fusermount_path(), "-u", "--", mountpoint],
        env={"PATH": "/usr/bin:/bin"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=FUSERMOUNT_TIMEOUT,
        cwd="/",
    )
    if proc.returncode == 0:
        return True
    why = _last_line(proc.stderr)
    if "not found in" in why or "not mounted" in why.lower() or "Invalid argument" in why:
        return False
    if "busy" in why:
        raise HelperError(f"cannot unmount {mountpoint}: it is busy (files open or a cwd in it)")
    raise HelperError(f"cannot unmount {mountpoint}: {why}")


@dataclass(frozen=True, slots=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    device: str  # "major:minor"; for FUSE the minor names the connection
    super_options: str = ""  # e.g. "ro,user_id=1000,group_id=1000,default_permissions"

    @property
    def owner_uid(self) -> int | None:
        """The FUSE mount's user_id=: who mounted it (and may unmount it)."""
        for option in self.super_options.split(","):
            key, _, value = option.partition("=")
            if key == "user_id" and value.isdigit():
                return int(value)
        return None


def mount_table() -> list[MountEntry]:
    """/proc/self/mountinfo, unescaped."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            left, sep, right = line.partition(" - ")
            fields = left.split()
            tail = right.split()
            if not sep or len(fields) < 5 or len(tail) < 2:
                continue
            entries.append(MountEntry(_unescape(fields[4]), tail[0], _unescape(tail[1]), fields[2],
                                      tail[2] if len(tail) > 2 else ""))  # fmt: skip
    return entries


def mounted_entry(mountpoint: str) -> MountEntry | None:
    """The topmost mount at `mountpoint`, or None."""
    found = None
    for entry in mount_table():
        if entry.mountpoint == mountpoint:
            found = entry
    return found


def mounted_fstype(mountpoint: str) -> str | None:
    entry = mounted_entry(mountpoint)
    return entry.fstype if entry else None


def abort_connection(device: str) -> bool:
    """Abort a FUSE connection through fusectl (root, when it is mounted).

    Unmounting in our namespace does not end the connection while a copy of
    the mount lives in another mount namespace (every container started
    while it was mounted has one); aborting makes the server see ENODEV and
    exit, and leaves those copies failing with ENOTCONN.
    """
    minor = device.rpartition(":")[2]
    if not minor.isdigit():
        return False
    try:
        with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
            f.write("1")
    except OSError:
        return False
    return True


def _unescape(text: str) -> str:
    # The kernel writes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(text):
        code = text[i + 1 : i + 4]
        if text[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
