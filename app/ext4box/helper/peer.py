"""Who is on the other end of the broker's socket, and acting as them.

The kernel says who connected (SO_PEERCRED: pid, uid, gid at connect time);
the supplementary groups come from the system's group database for that
uid, never from anything the client sends. To let the kernel decide what the
caller may open, `open_as` forks a child that drops to the caller's
uid/gid/groups, opens there, and passes the fd back over a socketpair: every
permission check on the path (search rights on each directory, the file's
mode and ACLs) is the kernel's own, done as the caller.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ext4box.helper.errors import HelperError
from ext4box.policy import Identity, identity_of_uid

_UCRED = struct.Struct("=iII")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_INT = array.array("i").itemsize
MAX_REPORT_BYTES = 8192  # the child's one-line report
# A path through a FUSE mount whose server never answers would hang the open;
# SIGKILL ends such a wait, so the child is killed after this long.
OPEN_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Caller:
    pid: int
    identity: Identity
    gid: int  # primary gid from SO_PEERCRED

    @property
    def uid(self) -> int:
        return self.identity.uid

    @property
    def is_root(self) -> bool:
        return self.identity.uid == 0

    def describe(self) -> str:
        who = self.identity.user or "?"
        return f"{who} (uid {self.uid}, pid {self.pid})"


def caller_of(sock: socket.socket) -> Caller:
    """The connected peer, from the kernel's credentials."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Caller(pid=pid, identity=identity_of_uid(uid, gid), gid=gid)


# -- acting as the caller -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Opened:
    """An fd a child opened as the caller, and the child's one-line note about it."""

    fd: int
    note: str


def open_as(caller: Caller, opener: Callable[[], tuple[int, str]]) -> Opened:
    """Run `opener` in a child dropped to the caller's ids; return the fd it opened.

    `opener` returns (fd, note) or raises HelperError, whose line is passed
    back and raised here. The child never returns into the broker's code: it
    reports and _exits. The broker must be single-threaded (fork).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, reported through the socket
        ours.close()
        _child(caller, opener, theirs)
    theirs.close()
    with ours:
        try:
            ours.settimeout(OPEN_TIMEOUT)
            message, fds = _receive(ours)
        finally:
            _reap(pid)
    kind, _, text = message.partition(":")
    if kind == "ok" and len(fds) == 1:
        return Opened(fds[0], text)
    for fd in fds:
        os.close(fd)
    if kind == "error":
        raise HelperError(text)
    raise HelperError("could not open the path as the calling user (the opener gave no answer)")


def _child(caller: Caller, opener: Callable[[], tuple[int, str]], sock: socket.socket) -> None:
    status = 0
    try:
        _close_all_but(sock.fileno())  # the broker's fds are not the caller's business
        drop_to(caller)
        fd, note = opener()
        sock.sendmsg([f"ok:{note}".encode("utf-8", "surrogateescape")[:MAX_REPORT_BYTES]],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])  # fmt: skip
    except HelperError as err:
        with contextlib.suppress(OSError):
            sock.send(f"error:{err.line}".encode("utf-8", "surrogateescape")[:MAX_REPORT_BYTES])
    except BaseException:
        status = 1
        with contextlib.suppress(BaseException):
            sock.send(b"error:internal error while opening as the calling user")
    os._exit(status)


def _close_all_but(keep: int) -> None:
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def drop_to(caller: Caller) -> None:
    """Become the caller for good: groups, then gid, then uid (the order matters:
    once the uid is dropped the groups can no longer be changed)."""
    os.setgroups(list(caller.identity.gids))
    os.setresgid(caller.gid, caller.gid, caller.gid)
    os.setresuid(caller.uid, caller.uid, caller.uid)
    if os.getresuid() != (caller.uid,) * 3 or os.getresgid() != (caller.gid,) * 3:
        raise HelperError("could not drop privileges to the calling user")
    if caller.uid != 0 and _can_regain_root():
        raise HelperError("could not drop privileges to the calling user")


def _can_regain_root() -> bool:
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        return False
    return True


def _receive(sock: socket.socket) -> tuple[str, list[int]]:
    room = socket.CMSG_SPACE(4 * _INT)
    try:
        data, ancdata, _, _ = sock.recvmsg(MAX_REPORT_BYTES, room, socket.MSG_CMSG_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.ETIMEDOUT, errno.EAGAIN) or isinstance(err, TimeoutError):
            return "error:opening as the calling user took too long", []
        raise
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % _INT
            fds.extend(array.array("i", payload[:whole]))
    return data.decode("utf-8", "surrogateescape"), fds


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            # It sent its answer and is exiting, or it hangs: either way, end it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            os.waitpid(pid, 0)
