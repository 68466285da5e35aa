"""The server's end of the fd hand-off: receive and verify the fds, then READY.

The helper connects, says HELLO, and sends MOUNT with /dev/fuse and the image
(docs/handoff-protocol.md; wire format: ext4box.handoff_protocol). Nothing
received is trusted until verified; on any failure the helper hears why in an
ERROR and every received fd is closed.
"""

from __future__ import annotations

import errno
import socket

from ext4box.handoff_protocol import (
    DEFAULT_TIMEOUT,
    MAGIC,
    MAGIC_ERROR,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    HandoffError,
    PeerRefused,
    ReceivedMount,
    check_socket,
    close_fds,
    decode_error,
    decode_hello,
    decode_mount,
    encode_hello_reply,
    encode_ready,
    magic_of,
    recv_packet,
    reply_error,
    send_packet,
    verify_fuse_fd,
    verify_image_fd,
)


def negotiate_version(low: int, high: int) -> int:
    """The version both sides speak: the highest of the helper's `low`..`high` we know."""
    if high < MIN_PROTOCOL_VERSION or low > PROTOCOL_VERSION:
        raise HandoffError(
            f"helper speaks hand-off protocol versions {low}..{high}, this server speaks"
            f" {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}; upgrade the older side",
            errno.EPROTONOSUPPORT,
        )
    return min(high, PROTOCOL_VERSION)


def receive_handoff(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> ReceivedMount:
    """Run the server side up to (not including) READY.

    Returns the verified descriptors; on any failure the helper is sent an
    ERROR naming the reason, every received fd is closed, and HandoffError is
    raised with the same reason. The caller sends READY (send_ready) once it
    has started serving, or ERROR (reply_error) if that fails.
    """
    check_socket(sock)
    sock.settimeout(timeout)
    try:
        packet, _ = recv_packet(sock, max_fds=0)
        _raise_if_error(packet)
        low, high = decode_hello(packet)
        version = negotiate_version(low, high)
        send_packet(sock, encode_hello_reply(version))
        packet, fds = recv_packet(sock, max_fds=2)
    except HandoffError as exc:
        reply_error(sock, exc.errno, exc.reason)
        raise
    try:
        _raise_if_error(packet)
        request = decode_mount(packet, version)
        if len(fds) != 2:
            raise HandoffError(
                f"MOUNT carries {len(fds)} fds, expected 2 (/dev/fuse and the image)", errno.EBADF
            )
        verify_fuse_fd(fds[0])
        verify_image_fd(fds[1], request)
    except HandoffError as exc:
        close_fds(fds)
        reply_error(sock, exc.errno, exc.reason)
        raise
    return ReceivedMount(version, request, fds[0], fds[1])


def _raise_if_error(packet: bytes) -> None:
    # The helper gave up and said why: report its reason, not a bad magic.
    if len(packet) >= MAGIC.size and magic_of(packet) == MAGIC_ERROR:
        refusal = decode_error(packet)
        raise PeerRefused(f"helper aborted: {refusal.reason}", refusal.errno)


def send_ready(sock: socket.socket) -> None:
    send_packet(sock, encode_ready())
