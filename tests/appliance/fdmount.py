"""What the host helper does, done by hand for the tests: mount(2) a FUSE
filesystem on a /dev/fuse fd, hand both fds to `ext4box service` over a
SEQPACKET socketpair, wait for READY.

EXT4BOX_SERVICE_WRAPPER (e.g. "strace -f -qq -o /tmp/trace") is prepended to
the service's command line: seccomp/measure.sh uses it to record syscalls.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ext4box import handoff_protocol as protocol
from ext4box.handoff_protocol import ImageKind, Mode, MountRequest
from ext4box.helper import handoff
from support.kernel import unmount

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
SERVICE_MODULE = [sys.executable, "-m", "ext4box.service.main"]

_libc = ctypes.CDLL(None, use_errno=True)


def fuse_mount(image: Path, mountpoint: Path, *, readonly: bool = True) -> int:
    """Open /dev/fuse and mount it (read-only by default) on `mountpoint`; returns the fd."""
    fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = f"fd={fuse_fd},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other"
    rc = _libc.mount(
        str(image).encode(),
        str(mountpoint).encode(),
        b"fuse.ext4box",
        (MS_RDONLY if readonly else 0) | MS_NOSUID | MS_NODEV,
        data.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        os.close(fuse_fd)
        raise OSError(err, f"mount(2) of fuse.ext4box on {mountpoint}: {os.strerror(err)}")
    return fuse_fd


def force_unmount(mountpoint: Path) -> None:
    """umount even when the server died (os.path.ismount is False on ENOTCONN)."""
    with contextlib.suppress(RuntimeError):
        unmount(mountpoint)
    subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)


def wrapper() -> list[str]:
    return shlex.split(os.environ.get("EXT4BOX_SERVICE_WRAPPER", ""))


@dataclass
class Served:
    mountpoint: Path
    proc: subprocess.Popen[str]
    sock: socket.socket


def start_service(argv: Sequence[str], *, env: dict[str, str] | None = None):
    """Start `argv` with the server end of a SEQPACKET pair as its fd 3."""
    helper_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = server_end.fileno()
    proc = subprocess.Popen(
        [*wrapper(), *argv],
        pass_fds=(fd, 3),
        preexec_fn=lambda: os.dup2(fd, 3),  # fd 3 in the child, whatever it is here
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    server_end.close()
    return helper_end, proc


def hello(sock: socket.socket, timeout: float) -> None:
    sock.settimeout(timeout)
    protocol.send_packet(sock, protocol.encode_hello())
    packet, _ = protocol.recv_packet(sock)
    if protocol.magic_of(packet) == protocol.MAGIC_ERROR:
        raise protocol.decode_error(packet)
    protocol.decode_hello_reply(packet)


def send_mount(sock: socket.socket, fuse_fd: int, image_fd: int, request: MountRequest) -> None:
    protocol.verify_fuse_fd(fuse_fd)
    protocol.verify_image_fd(image_fd, request)
    protocol.send_packet(sock, protocol.encode_mount(request), (fuse_fd, image_fd))


@contextlib.contextmanager
def served_by_handoff(
    image: Path,
    mountpoint: Path,
    argv: Sequence[str],
    *,
    options: tuple[str, ...] = ("nosuid", "nodev"),
    timeout: float = 60,
    env: dict[str, str] | None = None,
    mode: Mode = Mode.RO,
    server_options: tuple[str, ...] = (),
) -> Iterator[Served]:
    """Start the service, HELLO, mount, MOUNT with the fds, wait for READY;
    at exit umount and reap the service (the body may then look at its exit).

    The mount is made only after HELLO_REPLY, i.e. once the service (and, for
    a container, podman's conmon with its private mount namespace) is up: a
    mount namespace created after the mount would hold a copy of it that the
    host's umount does not reach (our hosts' / is not a shared mount), and
    the server would never see the unmount.
    """
    mountpoint.mkdir(parents=True, exist_ok=True)
    helper_end, proc = start_service(argv, env=env)
    mounted = False
    try:
        hello(helper_end, timeout)
        fuse_fd = fuse_mount(image, mountpoint, readonly=mode is Mode.RO)
        mounted = True
        access = os.O_RDONLY if mode is Mode.RO else os.O_RDWR
        image_fd = os.open(image, access | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            request = MountRequest(mode, ImageKind.REGULAR, os.fstat(image_fd).st_size, options,
                                   server_options=server_options)  # fmt: skip
            send_mount(helper_end, fuse_fd, image_fd, request)
        finally:
            os.close(image_fd)
            os.close(fuse_fd)
        handoff.wait_ready(helper_end, timeout=timeout)
        yield Served(mountpoint, proc, helper_end)
    finally:
        if mounted:
            force_unmount(mountpoint)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        helper_end.close()
