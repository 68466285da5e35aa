"""`ext4box broker`: the root service that mounts for ordinary users.

It listens on /run/ext4box/broker.sock (0666: anyone may ask), or on the
socket systemd passes (LISTEN_FDS, compose/systemd/ext4box-broker.socket).
Each connection is one request (broker_protocol.py), served in a forked
worker with a deadline, so a client that stalls, sends garbage or crashes
its worker never stops the broker from serving the next one. A user's
mounts and unmounts are serialised by a lock of their own.

Who asks comes from SO_PEERCRED; what is allowed comes from the broker's
own settings (`BrokerSettings`), fixed at start from its command line and
root's environment, and checked to be root-owned files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ext4box.helper import container, state
from ext4box.helper.broker_mount import BrokerSettings, mount_for
from ext4box.helper.broker_protocol import (
    Call,
    ListCall,
    MountCall,
    ProtocolError,
    decode_call,
    error_reply,
    ok_reply,
    recv_message,
    send_message,
)
from ext4box.helper.broker_unmount import list_for, umount_for
from ext4box.helper.errors import HelperError
from ext4box.helper.peer import Caller, caller_of
from ext4box.log import get_logger
from ext4box.policy import DEFAULT_POLICY_DIR, PolicyLoadError, load_policy

log = get_logger("ext4box.broker")

DEFAULT_SOCKET = "/run/ext4box/broker.sock"
SD_LISTEN_FDS_START = 3
MAX_WORKERS = 16
# One user cannot take every worker (silent connections, slow mounts) from the others.
MAX_WORKERS_PER_USER = 4
REQUEST_TIMEOUT = 5.0  # a client has this long to send its request
REPLY_TIMEOUT = 10.0  # and this long to take the reply


def run(socket_path: str | None, policy_dir: str | None, state_dir: str | None,
        timeout: float, *, foreground: bool) -> int:  # fmt: skip
    """Serve until SIGTERM/SIGINT. Errors before serving are HelperError lines."""
    if os.geteuid() != 0:
        raise HelperError("ext4box broker must run as root: it mounts for other users")
    os.umask(0o022)
    os.chdir("/")
    settings = _settings(policy_dir or DEFAULT_POLICY_DIR, timeout)
    if state_dir:
        check_root_owned(os.path.dirname(os.path.abspath(state_dir)), "state directory")
        state.use_root_state_dir(Path(state_dir))
    state.ensure_state_dir()
    listener, owned_path = _listener(socket_path, foreground=foreground)
    log.info("broker_started", socket=owned_path or "systemd", policy=settings.policy_dir,
             podman=settings.podman.executable, state=str(state.state_dir()))  # fmt: skip
    try:
        _serve_forever(listener, settings)
    finally:
        listener.close()
        if owned_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(owned_path)
    log.info("broker_stopped")
    return 0


# -- settings: the broker's own, root-owned -------------------------------------------


def _settings(policy_dir: str, timeout: float) -> BrokerSettings:
    policy_dir = os.path.abspath(policy_dir)
    check_root_owned(policy_dir, "policy directory")
    try:
        load_policy(policy_dir, check_ownership=True)  # fail now, not at the first request
    except PolicyLoadError as err:
        raise HelperError(f"policy error: {err}") from None
    podman = container.find_podman()
    check_root_owned(podman.executable, "podman")
    if podman.seccomp_profile:
        check_root_owned(podman.seccomp_profile, "seccomp profile")
    conf = podman.env.get("CONTAINERS_CONF")
    if conf:
        check_root_owned(conf, "CONTAINERS_CONF")
    return BrokerSettings(policy_dir=policy_dir, podman=podman, timeout=timeout)


def check_root_owned(path: str, what: str) -> None:
    """`path` and every directory above it must be root's and not writable by
    anyone else (a sticky directory such as /tmp is fine: nobody can rename
    root's entries in it), so no user can change what the broker reads."""
    current = os.path.abspath(path)
    first = True
    while True:
        try:
            st = os.stat(current)  # links are fine if they are root's to change
        except OSError as err:
            raise HelperError(f"{what} {path}: {err.strerror}") from None
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and not first
        if st.st_uid != 0 or (st.st_mode & 0o022 and not sticky_dir):
            raise HelperError(
                f"{what} {path} is not safe for the broker: {current} must be owned by root"
                " and writable by root only"
            )
        if current == "/":
            return
        current, first = os.path.dirname(current), False


# -- the listening socket ---------------------------------------------------------------


def _listener(socket_path: str | None, *, foreground: bool) -> tuple[socket.socket, str | None]:
    """systemd's socket when we were activated; else our own at socket_path."""
    if socket_path is None and _activated():
        sock = socket.socket(fileno=SD_LISTEN_FDS_START)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise HelperError("the socket systemd passed is not an AF_UNIX stream socket")
        sock.set_inheritable(False)
        return sock, None
    if not foreground:
        raise HelperError(
            "ext4box broker runs socket-activated by systemd (ext4box-broker.socket);"
            " use --foreground to run it directly"
        )
    return _bind(socket_path or DEFAULT_SOCKET), socket_path or DEFAULT_SOCKET


def _activated() -> bool:
    try:
        return (
            int(os.environ.get("LISTEN_PID", "")) == os.getpid()
            and int(os.environ.get("LISTEN_FDS", "0")) >= 1
        )
    except ValueError:
        return False


def _bind(path: str) -> socket.socket:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o755)
    check_root_owned(directory, "socket directory")
    if _someone_listens(path):
        raise HelperError(f"a broker already listens on {path}")
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise HelperError(f"{path} exists and is not a socket")
        os.unlink(path)  # a stale socket of a broker that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)  # anyone may ask; the answer depends on who asks
        sock.listen(64)
    except OSError as err:
        sock.close()
        raise HelperError(f"cannot listen on {path}: {err.strerror}") from None
    return sock


def _someone_listens(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


# -- the accept loop ------------------------------------------------------------------


class _Stop(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Worker:
    uid: int  # whom it serves (SO_PEERCRED of the connection)
    deadline: float  # monotonic; killed after it


def _serve_forever(listener: socket.socket, settings: BrokerSettings) -> None:
    workers: dict[int, _Worker] = {}  # pid -> worker
    deadline_seconds = REQUEST_TIMEOUT + 4 * settings.timeout + 120

    def stop(signum: int, _frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            _reap(workers)
            readable, _, _ = select.select([listener], [], [], 1.0)
            if not readable:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                uid = caller_of(conn).uid
                if _busy(workers, uid):
                    _refuse_busy(conn)
                    continue
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the worker; its outcome is its reply
                    _worker(listener, conn, settings)
                workers[pid] = _Worker(uid, time.monotonic() + deadline_seconds)
    except _Stop as why:
        log.info("broker_stopping", reason=str(why), workers=len(workers))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _busy(workers: dict[int, _Worker], uid: int) -> bool:
    if len(workers) >= MAX_WORKERS:
        return True
    mine = sum(1 for worker in workers.values() if worker.uid == uid)
    return uid != 0 and mine >= MAX_WORKERS_PER_USER


def _reap(workers: dict[int, _Worker]) -> None:
    now = time.monotonic()
    for pid, worker in list(workers.items()):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            del workers[pid]
            continue
        if done:
            del workers[pid]
            if status:
                log.warning("broker_worker_failed", pid=pid,
                            exit=os.waitstatus_to_exitcode(status))  # fmt: skip
        elif now > worker.deadline:
            log.warning("broker_worker_overdue", pid=pid, uid=worker.uid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _refuse_busy(conn: socket.socket) -> None:
    conn.settimeout(1.0)
    with contextlib.suppress(OSError, ProtocolError):
        send_message(conn, error_reply("the broker is busy with other requests; try again"))


def _worker(listener: socket.socket, conn: socket.socket, settings: BrokerSettings) -> None:
    status = 0
    try:
        listener.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        serve_connection(conn, settings)
    except BaseException:
        status = 1
        with contextlib.suppress(BaseException):
            log.exception("broker_worker_crashed")
    os._exit(status)


def serve_connection(conn: socket.socket, settings: BrokerSettings) -> None:
    """Read one request, answer it, log what was asked and the outcome."""
    conn.settimeout(REQUEST_TIMEOUT)
    caller = caller_of(conn)
    try:
        call = decode_call(recv_message(conn))
    except ProtocolError as bad:
        log.warning("broker_bad_request", uid=caller.uid, pid=caller.pid, reason=bad.line)
        _answer(conn, error_reply(f"bad request: {bad.line}"))
        return
    try:
        reply = ok_reply(**_handle(caller, call, settings))
        outcome = "ok"
    except HelperError as err:
        reply, outcome = error_reply(err.line), err.line
    except Exception:
        # A bug of ours: the caller still gets one line, the log gets the traceback.
        log.exception("broker_request_failed", uid=caller.uid, op=type(call).__name__)
        reply = error_reply("the broker failed on this request (see its log)")
        outcome = "internal error"
    log.info("broker_request", uid=caller.uid, user=caller.identity.user, pid=caller.pid,
             op=type(call).__name__, outcome=outcome)  # fmt: skip
    _answer(conn, reply)


def _answer(conn: socket.socket, reply: dict[str, object]) -> None:
    conn.settimeout(REPLY_TIMEOUT)
    with contextlib.suppress(OSError, ProtocolError):
        send_message(conn, reply)


def _handle(caller: Caller, call: Call, settings: BrokerSettings) -> dict[str, object]:
    if isinstance(call, ListCall):
        return list_for(caller, settings)
    with _state_lock(caller.uid):
        if isinstance(call, MountCall):
            return mount_for(caller, call.image, call.mountpoint, call.mode, settings,
                             call.server_options)  # fmt: skip
        return umount_for(caller, call.mountpoint, settings)


@contextlib.contextmanager
def _state_lock(uid: int) -> Iterator[None]:
    """One mount or unmount at a time per user, across workers.

    Per user, not global: the broker may block on a user's image (reading its
    superblock, hashing it, fstat: an image on the user's own FUSE mount can
    stall all of these until the worker's deadline), and that must hold up
    no one else. Users never share a mountpoint (it must be their own), so
    their mounts cannot collide."""
    path = state.ensure_state_dir() / f".broker-{uid}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
