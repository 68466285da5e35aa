"""`ext4box service --self-test`: try what the sandbox must forbid, report each.

Stage 1 (whatever confines the process at start: in the appliance the OCI
profile seccomp/ext4box.json, --cap-drop=all, no-new-privileges): mount,
ptrace, sockets of the network families, bpf, keyctl, namespaces, raising a
capability... Each attempt runs in a forked child so one that wrongly
succeeds (unshare, ptrace) cannot change the outcome of the next.

Stage 2 (ext4box.service.lockdown, installed in a forked child as the
service installs it before parsing an image): open/openat/openat2/creat of a
path, socket(AF_UNIX), socketpair, pipe, fork, starting a thread (the native
FUSE loop is one thread), execve of /bin/true (last: if it succeeded the
child would become /bin/true and never report it denied), and — expected to
keep working — reading an fd held from before.

The report is JSON on stdout; the exit status is nonzero when any forbidden
operation succeeded or a held fd stopped working.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import threading
from collections.abc import Callable

from ext4box.service import libseccomp, lockdown

DENIED_ERRNOS = frozenset({errno.EPERM, errno.EACCES, errno.ENOSYS})
NOT_REPORTED = 255  # the attempt's child died without reporting

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(name: str, *args: int | bytes | None) -> int:
    """Raw syscall by name; returns 0/result or -errno (never raises)."""
    number = libseccomp.resolve(name)
    if number < 0:
        return -errno.ENOSYS
    c_args = [ctypes.c_long(a) if isinstance(a, int) else ctypes.c_char_p(a) for a in args]
    rc = _libc.syscall(ctypes.c_long(number), *c_args)
    return -ctypes.get_errno() if rc == -1 else int(rc)


# --- stage 1 attempts: each returns 0 on success or -errno -----------------

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIGCHLD = 17
CAP_SYS_ADMIN = 21
LINUX_CAPABILITY_VERSION_3 = 0x20080522


# Every attempt is harmless if it gets through: it names a path that does not
# exist or invalid arguments, so an unconfined run (as root on a host) fails
# with ENOENT/EINVAL/EFAULT — reported "failed", i.e. not denied — and
# changes nothing. Only a sandbox answers EPERM/EACCES (or ENOSYS).
MISSING = b"/nonexistent-ext4box-selftest"


def _mount() -> int:
    return _syscall("mount", b"none", MISSING, b"tmpfs", 0, None)


def _socket(family: int, kind: int = socket.SOCK_STREAM) -> Callable[[], int]:
    def attempt() -> int:
        rc = _syscall("socket", family, kind, 0)
        return 0 if rc >= 0 else rc

    return attempt


def _clone_newuser() -> int:
    rc = _syscall("clone", CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
    if rc == 0:
        os._exit(0)  # the child of a clone that should not have happened
    if rc > 0:
        os.waitpid(rc, 0)
        return 0
    return rc


def _setns() -> int:
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _syscall("setns", fd, CLONE_NEWNET)
    finally:
        os.close(fd)


def _capset() -> int:
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    data[0] = data[1] = 1 << CAP_SYS_ADMIN  # effective, permitted
    number = libseccomp.resolve("capset")
    rc = _libc.syscall(ctypes.c_long(number), header, data)
    return -ctypes.get_errno() if rc == -1 else 0


def _bpf() -> int:
    attr = ctypes.create_string_buffer(128)  # BPF_MAP_CREATE with a zeroed attr
    number = libseccomp.resolve("bpf")
    rc = _libc.syscall(ctypes.c_long(number), ctypes.c_long(0), attr, ctypes.c_long(128))
    return -ctypes.get_errno() if rc == -1 else 0


def _io_uring() -> int:
    params = ctypes.create_string_buffer(120)
    number = libseccomp.resolve("io_uring_setup")
    rc = _libc.syscall(ctypes.c_long(number), ctypes.c_long(1), params)
    return -ctypes.get_errno() if rc == -1 else 0


STAGE1_ATTEMPTS: dict[str, Callable[[], int]] = {
    "mount": _mount,
    "umount2": lambda: _syscall("umount2", MISSING, 2),
    "ptrace_traceme": lambda: _syscall("ptrace", 0, 0, 0, 0),
    "socket_af_inet": _socket(socket.AF_INET),
    "socket_af_inet6": _socket(socket.AF_INET6),
    "socket_af_netlink": _socket(socket.AF_NETLINK, socket.SOCK_RAW),
    "socket_af_packet": _socket(17, socket.SOCK_RAW),  # AF_PACKET
    "bpf": _bpf,
    "keyctl": lambda: _syscall("keyctl", 0, -3, 0),  # KEYCTL_GET_KEYRING_ID, session
    # Into this (forked child) process's own keyring, which dies with it.
    "add_key": lambda: _syscall("add_key", b"user", b"ext4box", b"x", 1, -2),
    "unshare_user": lambda: _syscall("unshare", CLONE_NEWUSER),
    "unshare_mount": lambda: _syscall("unshare", CLONE_NEWNS),
    "clone_newuser": _clone_newuser,
    "setns": _setns,
    "capset_sys_admin": _capset,
    "setuid_0": lambda: _syscall("setuid", 0),
    "chroot": lambda: _syscall("chroot", MISSING),
    "io_uring_setup": _io_uring,
    "userfaultfd": lambda: _syscall("userfaultfd", 0),
    "perf_event_open": lambda: _syscall("perf_event_open", 0, 0, -1, -1, 0),
    "kexec_load": lambda: _syscall("kexec_load", 0, 0, 0, -1),  # invalid flags
    "init_module": lambda: _syscall("init_module", 0, 0, b""),
    "open_by_handle_at": lambda: _syscall("open_by_handle_at", -100, 0, 0),
}


# --- stage 2 attempts (after lockdown.lock_down) ----------------------------


def _os_call(call: Callable[[], object]) -> int:
    try:
        result = call()
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    if isinstance(result, int) and result >= 0:
        os.close(result)
    return 0


def _open_path(path: str, flags: int) -> Callable[[], int]:
    return lambda: _os_call(lambda: os.open(path, flags | os.O_CLOEXEC))


def _socketpair() -> int:
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    a.close()
    b.close()
    return 0


def _fork() -> int:
    try:
        pid = os.fork()
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return 0


def _pipe() -> int:
    try:
        r, w = os.pipe()
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    os.close(r)
    os.close(w)
    return 0


def _thread_start() -> int:
    """Start a thread: the native FUSE loop is one thread, so stage 2 denies clone.

    Python hides clone's errno behind RuntimeError; under this filter the only
    reason it fails is the filter's EPERM.
    """
    ran = []
    worker = threading.Thread(target=lambda: ran.append(True))
    try:
        worker.start()
        worker.join(10)
    except RuntimeError:
        return -errno.EPERM
    return 0 if ran == [True] else -errno.EIO


STAGE2_ATTEMPTS: dict[str, Callable[[], int]] = {
    "open_etc_hostname": _open_path("/etc/hostname", os.O_RDONLY),
    "open_proc_self_status": _open_path("/proc/self/status", os.O_RDONLY),
    "open_proc_1_root": _open_path("/proc/1/root/etc/passwd", os.O_RDONLY),
    "open_root_dir": _open_path("/", os.O_RDONLY | os.O_DIRECTORY),
    "creat_missing_dir": _open_path(
        MISSING.decode() + "/file", os.O_WRONLY | os.O_CREAT | os.O_EXCL
    ),
    "open_syscall": lambda: _syscall("open", b"/etc/passwd", 0),
    "openat2": lambda: _syscall("openat2", -100, b"/etc/passwd", 0, 0),
    "socket_af_unix": _socket(socket.AF_UNIX),
    "socket_af_inet": _socket(socket.AF_INET),
    "socketpair": _socketpair,
    "pipe": _pipe,
    "memfd_create": lambda: _syscall("memfd_create", b"x", 0),
    "fork": _fork,
    "mkdir": lambda: _syscall("mkdir", MISSING + b"/dir", 0o700),
    "unshare_user": lambda: _syscall("unshare", CLONE_NEWUSER),
    "ptrace_traceme": lambda: _syscall("ptrace", 0, 0, 0, 0),
    "thread_start": _thread_start,
}


def _held_fd_reads(fd: int) -> bool:
    try:
        return len(os.pread(fd, 64, 0)) > 0
    except OSError:
        return False


# --- running and reporting ----------------------------------------------------


def _in_child(attempt: Callable[[], int]) -> int:
    """Run `attempt` in a forked child; its result travels as the exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            rc = attempt()
            os._exit(0 if rc >= 0 else min(-rc, 254))
        except BaseException:
            os._exit(NOT_REPORTED)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return 0 if code == 0 else -code
    return -NOT_REPORTED


def _verdict(rc: int, denied_errnos: frozenset[int] = DENIED_ERRNOS) -> dict[str, object]:
    """ "denied" only for the errnos a sandbox answers with; other errors are
    "failed" (the call got through to the kernel proper) and count as not denied."""
    if rc >= 0:
        return {"result": "allowed"}
    err = -rc
    name = errno.errorcode.get(err, str(err)) if err != NOT_REPORTED else "child died"
    return {"result": "denied" if err in denied_errnos else "failed", "errno": name}


# Stage 2 answers EPERM itself: any other error means the call reached the kernel.
STAGE2_DENIED = frozenset({errno.EPERM})


def _stage2_child(write_fd: int, held_fd: int) -> None:
    """Child: lock down, then report one JSON line per attempt through write_fd."""

    def report(name: str, verdict: dict[str, object]) -> None:
        os.write(write_fd, (json.dumps({name: verdict}) + "\n").encode())

    try:
        lockdown.lock_down(writable=False)
    except libseccomp.SeccompError as exc:
        report("lock_down", {"result": "failed", "error": str(exc)})
        os._exit(1)
    report("lock_down", {"result": "installed"})
    for name, attempt in STAGE2_ATTEMPTS.items():
        report(name, _verdict(attempt(), STAGE2_DENIED))
    report("held_fd_read", {"result": "works" if _held_fd_reads(held_fd) else "broken"})
    # Last: an execve that succeeds replaces this child before it reports.
    rc = _syscall("execve", b"/bin/true", None, None)
    report("execve_bin_true", _verdict(rc, STAGE2_DENIED))
    os._exit(0)


def _stage2() -> dict[str, dict[str, object]]:
    lockdown.prepare()
    held_fd = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _stage2_child(write_fd, held_fd)
        finally:
            os._exit(NOT_REPORTED)
    os.close(write_fd)
    os.close(held_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    results: dict[str, dict[str, object]] = {}
    for line in b"".join(chunks).decode().splitlines():
        results.update(json.loads(line))
    if "execve_bin_true" not in results and "held_fd_read" in results:
        results["execve_bin_true"] = {"result": "allowed", "note": "child became /bin/true"}
    return results


def run() -> tuple[dict[str, object], bool]:
    """Run every attempt; returns (report, every forbidden operation denied)."""
    libseccomp.load_library()
    stage1 = {name: _verdict(_in_child(attempt)) for name, attempt in STAGE1_ATTEMPTS.items()}
    stage2 = _stage2()
    expected_working = ("lock_down", "held_fd_read")
    allowed = [n for n, v in stage1.items() if v["result"] == "allowed"]
    allowed += [
        n for n, v in stage2.items() if n not in expected_working and v["result"] not in ("denied",)
    ]
    broken = [
        n for n in expected_working if stage2.get(n, {}).get("result") not in ("installed", "works")
    ]
    ok = not allowed and not broken
    report: dict[str, object] = {
        "stage1": stage1,
        "stage2": stage2,
        "not_denied": allowed,
        "broken": broken,
        "ok": ok,
    }
    return report, ok
