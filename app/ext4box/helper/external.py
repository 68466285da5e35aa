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

Whoever reaches the socket receives /dev/fuse and the image, so the
listening side is guarded: the directory must not be writable by other
users, and with --server-uid the connecting peer's uid (SO_PEERCRED, as seen
from the helper's user namespace) must be the server's.
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
    server_uid: int | None = None  # required peer uid when listening

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
    sock = _accept_one(endpoint, timeout) if endpoint.listen else _connect(endpoint.path, timeout)
    try:
        peer = peer_of(sock)
        if endpoint.server_uid is not None and peer.uid != endpoint.server_uid:
            raise HelperError(
                f"the process that connected to {endpoint.path} runs as uid {peer.uid}, not the"
                f" server's uid {endpoint.server_uid}; refusing to hand it /dev/fuse and the image"
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


def _check_directory(directory: str) -> None:
    try:
        st = os.stat(directory)
    except OSError as err:
        raise HelperError(f"hand-off socket directory {directory}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise HelperError(f"hand-off socket directory {directory} is not a directory")
    # Another user able to create names here could swap our socket for theirs.
    if st.st_mode & 0o022 or st.st_uid not in (0, os.geteuid()):
        raise HelperError(
            f"hand-off socket directory {directory} is writable by other users (mode"
            f" {stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}); use a directory only"
            " root or you can write to"
        )


def _accept_one(endpoint: Endpoint, timeout: float) -> socket.socket:
    path = endpoint.path
    directory = os.path.dirname(path) or "."
    if endpoint.server_uid is None:
        # Without a peer check the directory is the only guard. With one (a
        # pod's emptyDir is world-writable by design), a stranger can at most
        # take the server's place: our fds go only to the uid we named.
        _check_directory(directory)
    _remove_stale(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        try:
            listener.bind(path)
            # The server connects from another uid (a container user): the
            # directory and the peer-uid check guard the socket, not its mode.
            os.chmod(path, 0o666)
            listener.listen(1)
        except OSError as err:
            raise HelperError(f"cannot listen on {path}: {err.strerror}") from None
        listener.settimeout(timeout)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            raise HelperError(
                f"no ext4box server connected to {path} within {timeout:g} s (is the server"
                f" running with --handoff-socket {path}?)"
            ) from None
        conn.settimeout(timeout)
        return conn
    finally:
        listener.close()
        _remove_stale(path)  # one server per mount: nobody else may connect


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HelperError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


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
