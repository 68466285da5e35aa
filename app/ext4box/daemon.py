"""How does `ext4box serve` return only once its mount is live, and then keep serving?

The command forks early, before the image is opened: the child (in a new
session) opens, mounts and serves; the parent waits on a pipe. The child
writes one byte to the pipe once the kernel has our INIT reply (the mount
answers requests from then on), then detaches from the caller's stdio and cwd
so that neither a shell's command substitution nor an unmount of the caller's
directory waits on it. If the child exits before that byte, it has printed its
own one-line error on the stderr it shares with the parent, and the parent
exits with the child's status. Forking before anything is opened keeps the
child free of threads and half-made state; forking after INIT would copy a
running session.

Under systemd (NOTIFY_SOCKET in the environment) the ready moment also sends
READY=1 (the sd_notify datagram protocol, written here: one AF_UNIX datagram,
a leading "@" naming the abstract namespace).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass

from ext4box.log import get_logger

log = get_logger("ext4box.fuse")

READY_BYTE = b"R"
NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def under_systemd_notify() -> bool:
    """systemd waits for READY=1 from the process it started (Type=notify)."""
    return bool(os.environ.get(NOTIFY_SOCKET_ENV))


@dataclass(slots=True)
class Readiness:
    """Says "the mount is live" once: to the waiting parent, and to systemd."""

    pipe_fd: int | None = None  # the parent waits on it (background mode only)
    announced: bool = False

    def ready(self) -> None:
        if self.announced:
            return
        self.announced = True
        notify_systemd("READY=1")
        if self.pipe_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.pipe_fd, READY_BYTE)
        os.close(self.pipe_fd)
        self.pipe_fd = None
        _detach_stdio()


def background() -> Readiness:
    """Fork. In the parent, wait for the child's readiness and exit with the
    verdict (never returns); in the child, return the Readiness to fire."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()  # no terminal: the caller's ^C or hangup is not ours
        return Readiness(pipe_fd=write_fd)
    os.close(write_fd)
    try:
        verdict = _wait_for_child(read_fd, pid)
    except KeyboardInterrupt:
        # ^C while mounting: the child, in its own session, did not get it.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        os._exit(130)
    os._exit(verdict)


def _wait_for_child(read_fd: int, pid: int) -> int:
    """0 once the child said ready; otherwise the child's own exit status."""
    with os.fdopen(read_fd, "rb") as pipe:
        while True:
            try:
                said = pipe.read(1)
                break
            except InterruptedError:
                continue
    if said == READY_BYTE:
        return 0
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        print(f"ext4box: error: the server was killed by {name} before the mount was live",
              file=sys.stderr, flush=True)  # fmt: skip
        return 1
    code = os.waitstatus_to_exitcode(status)
    return code if code != 0 else 1  # exited "cleanly" without a mount: still a failure


def _detach_stdio() -> None:
    """Point stdin/out/err at /dev/null and leave the caller's directory.

    Our logs go nowhere from here on, as with other daemonised FUSE servers;
    `-f` keeps them.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    os.chdir("/")


def notify_systemd(message: str) -> bool:
    """Send one sd_notify datagram if NOTIFY_SOCKET is set; False if not sent."""
    address = os.environ.get(NOTIFY_SOCKET_ENV, "")
    if not address or not (address.startswith("/") or address.startswith("@")):
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as err:
        log.warning("sd_notify failed", socket=address, why=err.strerror)
        return False
    return True
