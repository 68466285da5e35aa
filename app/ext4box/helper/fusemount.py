"""Open /dev/fuse and mount it: mount(2) as root, fusermount3 otherwise.

The helper mounts before the server exists; the kernel queues FUSE_INIT on
the fd and holds every access to the mountpoint until the server, handed the
same fd, answers it. Options are fixed here, never taken from the server:
nosuid,nodev and default_permissions (the kernel checks the image's modes)
always, ro unless rw was granted, noexec and allow_other when the policy's
rule lists them.
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
from dataclasses import dataclass

from ext4box.helper.errors import HelperError

FUSE_DEVICE = "/dev/fuse"
FSTYPE = "fuse.ext4box"
SUBTYPE = "ext4box"
FUSERMOUNT_TIMEOUT = 30.0

# linux/mount.h
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
UMOUNT_NOFOLLOW = 0x8
MNT_DETACH = 0x2


@dataclass(frozen=True, slots=True)
class MountSpec:
    """What the helper mounts; every field comes from the policy decision."""

    mountpoint: str  # resolved absolute directory
    source: str  # shown in /proc/mounts: the image path
    mode: str  # "ro" | "rw"
    noexec: bool
    allow_other: bool
    uid: int  # owner of the mount (user_id=): the invoking user
    gid: int


def mount(spec: MountSpec) -> int:
    """Mount and return the /dev/fuse fd the server must serve (close-on-exec)."""
    if os.geteuid() == 0:
        return mount_as_root(spec)
    return mount_with_fusermount(spec)


# -- root: mount(2) ------------------------------------------------------------


def mount_as_root(spec: MountSpec) -> int:
    try:
        fuse_fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise HelperError(f"cannot open {FUSE_DEVICE}: {err.strerror}") from None
    try:
        options = [f"fd={fuse_fd}", "rootmode=40000", f"user_id={spec.uid}",
                   f"group_id={spec.gid}", "default_permissions"]  # fmt: skip
        if spec.allow_other:
            options.append("allow_other")
        flags = MS_NOSUID | MS_NODEV
        if spec.mode == "ro":
            flags |= MS_RDONLY
        if spec.noexec:
            flags |= MS_NOEXEC
        # Mount on an O_PATH fd of the directory, through /proc/self/fd: the
        # directory checked is the one mounted on, whatever is renamed meanwhile.
        dir_fd = _open_mountpoint(spec.mountpoint)
        try:
            _syscall_mount(spec.source, f"/proc/self/fd/{dir_fd}", FSTYPE, flags, ",".join(options))
        finally:
            os.close(dir_fd)
    except OSError as err:
        os.close(fuse_fd)
        raise HelperError(f"cannot mount on {spec.mountpoint}: {err.strerror}") from None
    except BaseException:
        os.close(fuse_fd)
        raise
    return fuse_fd


def _open_mountpoint(path: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise HelperError(f"mountpoint {path}: {err.strerror}") from None


def _syscall_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.mount(
        os.fsencode(source), os.fsencode(target), fstype.encode(), ctypes.c_ulong(flags),
        data.encode(),
    )  # fmt: skip
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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
            entries.append(MountEntry(_unescape(fields[4]), tail[0], _unescape(tail[1]), fields[2]))
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
