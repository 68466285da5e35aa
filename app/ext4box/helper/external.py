"""Hand-off to a server that someone else started: compose, Kubernetes, systemd.

`ext4box mount` normally starts its own server container and passes it one
end of a socketpair. In the deployment shapes the server is started by the
orchestrator instead, and the two meet at a socket path in a shared
directory (a compose volume, a pod's emptyDir, a systemd socket unit):

  --handoff-listen PATH   the helper binds and listens; the server connects
                          (`ext4box service --handoff-socket PATH --connect-wait S`).
                          Used by compose and Kubernetes, where the server's
                          seccomp profile allows connect(2) but not bind/listen.
  --handoff-connect PATH  the helper connects to a socket someone else listens
                          on: a systemd socket unit with Accept=yes, which
                          starts one server per connection with it as fd 3.

Whoever reaches the socket receives /dev/fuse and the image, so both ends
are pinned to a uid: a listening socket is created mode 0600 and handed to
the server's uid (`--server-uid`, required), in a directory of root or ours
that nobody else can write or list (0700, or 0711 so the server's uid can
traverse it); the accepted peer's uid (SO_PEERCRED, as seen from the
helper's user namespace) must be the server's. A socket we connect to must
be listened on by root (the systemd socket unit) or by --server-uid.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass

from ext4box.helper.errors import HelperError
from ext4box.log import get_logger

log = get_logger("ext4box.helper")

# struct ucred {pid_t pid; uid_t uid; gid_t gid;}
UCRED = struct.Struct("=iII")
SOCKET_PREFIX = "socket:"  # MountRecord.container_id of a mount served this way


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the helper meets a server it did not start."""

    path: str
    listen: bool  # True: bind+listen and accept one server; False: connect
    # The uid the server runs as. Required when listening; when connecting,
    # None means the listener must be root (systemd's socket unit).
    server_uid: int | None = None

    def describe(self) -> str:
        return f"{SOCKET_PREFIX}{self.path}"


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int  # 0 when the server is in another pid namespace
    uid: int
    gid: int


def is_external(container_id: str) -> bool:
    return container_id.startswith(SOCKET_PREFIX)


def open_channel(endpoint: Endpoint, timeout: float) -> tuple[socket.socket, Peer]:
    """A connected SOCK_SEQPACKET socket to the server, and who the server is."""
    if endpoint.listen:
        if endpoint.server_uid is None:
            raise HelperError(
                f"--handoff-listen {endpoint.path} needs --server-uid: the hand-off gives"
                " /dev/fuse and the image to whoever connects, so only that uid may"
            )
        sock = _accept_one(endpoint.path, endpoint.server_uid, timeout)
        expected = endpoint.server_uid
    else:
        sock = _connect(endpoint.path, timeout)
        expected = 0 if endpoint.server_uid is None else endpoint.server_uid
    try:
        peer = peer_of(sock)
        if peer.uid != expected:
            who = "connected to" if endpoint.listen else "listens on"
            raise HelperError(
                f"the process that {who} {endpoint.path} runs as uid {peer.uid}, not the"
                f" server's uid {expected}; refusing to hand it /dev/fuse and the image"
            )
    except BaseException:
        sock.close()
        raise
    log.info("server_connected", socket=endpoint.path, peer_pid=peer.pid, peer_uid=peer.uid,
             peer_gid=peer.gid)  # fmt: skip
    return sock, peer


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    pid, uid, gid = UCRED.unpack(raw)
    return Peer(pid, uid, gid)


def _open_directory(directory: str) -> int:
    """An fd of the socket's directory, checked private: every later step uses it."""
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise HelperError(f"hand-off socket directory {directory}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        # Only root or we may own it; nobody else may create, remove or list
        # names in it. 0711 lets the server's uid reach the 0600 socket.
        if st.st_uid not in (0, os.geteuid()) or mode & 0o077 not in (0, 0o011):
            raise HelperError(
                f"hand-off socket directory {directory} has mode {mode:04o} and owner uid"
                f" {st.st_uid}; use a directory of root's (or yours) with mode 0700, or 0711"
                " so the server's uid can reach its socket"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _accept_one(path: str, server_uid: int, timeout: float) -> socket.socket:
    directory, name = os.path.split(os.path.normpath(os.path.abspath(path)))
    dir_fd = _open_directory(directory)
    try:
        _remove_stale(name, dir_fd, path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            _bind_private(listener, dir_fd, name, path, server_uid)
            listener.settimeout(timeout)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                raise HelperError(
                    f"no ext4box server connected to {path} within {timeout:g} s (is the server"
                    f" running as uid {server_uid} with --handoff-socket {path}?)"
                ) from None
            conn.settimeout(timeout)
            return conn
        finally:
            listener.close()
            _remove_stale(name, dir_fd, path)  # one server per mount: nobody else may connect
    finally:
        os.close(dir_fd)


def _bind_private(
    listener: socket.socket, dir_fd: int, name: str, path: str, server_uid: int
) -> None:
    """Bind as 0600 (umask, so there is no moment with a wider mode), give the
    socket to the server's uid, then listen: until then nobody can connect."""
    where = f"/proc/self/fd/{dir_fd}/{name}"  # the checked directory, not its name again
    old_umask = os.umask(0o177)
    try:
        listener.bind(where if len(where) < 108 else path)
    except OSError as err:
        raise HelperError(f"cannot listen on {path}: {err.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        os.chown(name, server_uid, -1, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as err:
        raise HelperError(
            f"cannot give the hand-off socket {path} to uid {server_uid}: {err.strerror}"
            " (listening for another uid needs root)"
        ) from None
    try:
        listener.listen(1)
    except OSError as err:
        raise HelperError(f"cannot listen on {path}: {err.strerror}") from None


def _remove_stale(name: str, dir_fd: int, path: str) -> None:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HelperError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(name, dir_fd=dir_fd)


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as err:
        sock.close()
        if err.errno in (errno.ENOENT, errno.ECONNREFUSED):
            raise HelperError(
                f"no ext4box server is listening on {path} (start its socket unit:"
                " systemctl start ext4box-server.socket)"
            ) from None
        if err.errno == errno.EPROTOTYPE:
            raise HelperError(
                f"{path} is not a SOCK_SEQPACKET socket (ListenSequentialPacket= in the"
                " socket unit)"
            ) from None
        raise HelperError(f"cannot connect to {path}: {err.strerror}") from None
    return sock
