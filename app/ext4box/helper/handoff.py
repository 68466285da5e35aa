"""The helper side of the fd hand-off (wire format: ext4box.handoff_protocol).

The helper has decided (policy), opened the image and /dev/fuse and mounted;
this module passes the two fds to the server and waits for READY:

    sock = ...  # AF_UNIX SOCK_SEQPACKET, connected to the server
    version = hand_off(sock, fuse_fd, image_fd, request)   # raises on refusal
    wait_ready(sock, timeout=...)                          # raises on ERROR

Before sending, the helper checks its own fds against what it declares, so a
bug here is reported on the host in the helper's words instead of as the
server's refusal.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from ext4box.handoff_protocol import (
    DEFAULT_TIMEOUT,
    MAGIC_ERROR,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    HandoffError,
    ImageKind,
    Mode,
    MountRequest,
    PeerRefused,
    check_socket,
    decode_error,
    decode_hello_reply,
    decode_ready,
    encode_hello,
    encode_mount,
    magic_of,
    recv_packet,
    reply_error,
    send_packet,
    verify_fuse_fd,
    verify_image_fd,
)
from ext4box.helper import container
from ext4box.helper.errors import HelperError
from ext4box.helper.image import OpenedImage
from ext4box.policy import Decision

__all__ = [
    "HandoffError", "PeerRefused", "hand_off", "hand_off_to_container", "mount_request",
    "wait_ready",
]


def hand_off(
    sock: socket.socket,
    fuse_fd: int,
    image_fd: int,
    request: MountRequest,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    min_version: int = MIN_PROTOCOL_VERSION,
    max_version: int = PROTOCOL_VERSION,
) -> int:
    """HELLO, then MOUNT with [fuse_fd, image_fd]; returns the agreed version.

    The fds stay open in the helper (SCM_RIGHTS duplicates them); the caller
    closes its copies when it no longer needs them.
    """
    check_socket(sock)
    sock.settimeout(timeout)
    verify_fuse_fd(fuse_fd)
    verify_image_fd(image_fd, request)
    send_packet(sock, encode_hello(min_version, max_version))
    packet = _reply(sock)
    version = decode_hello_reply(packet)
    if not min_version <= version <= max_version:
        reply_error(sock, errno.EPROTONOSUPPORT, f"server chose version {version}")
        raise HandoffError(
            f"server chose hand-off protocol version {version}, helper offered"
            f" {min_version}..{max_version}",
            errno.EPROTONOSUPPORT,
        )
    try:
        mount = encode_mount(request, version)
    except HandoffError as unsendable:
        reply_error(sock, unsendable.errno, unsendable.reason)
        raise
    send_packet(sock, mount, (fuse_fd, image_fd))
    return version


def wait_ready(sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Wait for READY; the server's ERROR becomes PeerRefused with its reason."""
    sock.settimeout(timeout)
    decode_ready(_reply(sock))


def hand_off_to_container(name: str, log_file: Path, sock: socket.socket, fuse_fd: int,
                          image_fd: int, request: MountRequest, timeout: float) -> None:
    """Hand the fds to the server in container `name` and wait for READY; a refusal
    or a broken hand-off becomes one HelperError line with the end of its log."""
    try:
        hand_off(sock, fuse_fd, image_fd, request, timeout=timeout)
        wait_ready(sock, timeout=timeout)
    except PeerRefused as refused:
        if refused.errno == errno.ENOSYS:
            raise HelperError(
                f"the server in container {name} verified the fds but cannot serve:"
                f" {refused.reason}"
            ) from None
        raise HelperError(f"the server in container {name} refused: {refused.reason}") from None
    except HandoffError as broken:
        tail = container.log_tail_after_exit(log_file)
        if broken.errno == errno.ETIMEDOUT:
            line = f"the server container {name} did not become ready within {timeout:g} s"
        elif broken.errno in (errno.ECONNRESET, errno.EPIPE):
            line = f"the server container {name} exited during the hand-off"
        else:
            line = f"the server container {name} failed to start ({broken.reason})"
        raise HelperError(line + (f"; its log: {tail}" if tail else "")) from None


def _reply(sock: socket.socket) -> bytes:
    packet, _ = recv_packet(sock, max_fds=0)
    if magic_of(packet) == MAGIC_ERROR:
        raise decode_error(packet)
    # Any other unexpected message is named by the caller's decode_*.
    return packet


def mount_request(image: OpenedImage, decision: Decision) -> MountRequest:
    """What MOUNT declares, from the opened image and the policy's decision: the
    server refuses the features the rule refuses, on the bytes it parses."""
    return MountRequest(
        Mode.RO if image.mode == "ro" else Mode.RW,
        ImageKind.BLOCK if image.is_block_device else ImageKind.REGULAR,
        image.size,
        tuple(decision.mount_flags),
        refused_features=tuple(decision.refused_features),
        server_options=tuple(decision.server_options),
    )
