"""`ext4box mount/umount/list` for an ordinary user, when a broker is running.

The client sends what the user typed (paths made absolute, the mode) and
nothing else: no policy directory, no environment. The broker's one-line
errors come back as HelperError, printed exactly as the direct mode prints
its own. Which socket: EXT4BOX_BROKER_SOCKET, else /run/ext4box/broker.sock
(choosing another socket gains a user nothing: only root's broker can mount
anything a user could not mount directly).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from ext4box.helper.broker_protocol import (
    ListCall,
    MountCall,
    ProtocolError,
    UmountCall,
    decode_reply,
    encode_call,
    recv_message,
    send_message,
)
from ext4box.helper.errors import HelperError

DEFAULT_SOCKET = "/run/ext4box/broker.sock"
ADVISORY_WARNING = (
    "ext4box: warning: no ext4box broker is running (no {socket}): mounting as yourself;"
    " the policy is advisory for unprivileged callers"
)
CONNECT_TIMEOUT = 5.0
SLACK = 120.0  # container start, podman and the lock queue on top of the server's timeout


def socket_path() -> str:
    return os.environ.get("EXT4BOX_BROKER_SOCKET") or DEFAULT_SOCKET


def broker_available() -> bool:
    """A non-root caller goes through the broker when its socket exists."""
    return os.geteuid() != 0 and os.path.exists(socket_path())


def warn_if_advisory() -> None:
    """Say, in one line, that a non-root caller without a broker is not bound by policy."""
    if os.geteuid() != 0:
        print(ADVISORY_WARNING.format(socket=socket_path()), file=sys.stderr, flush=True)


def mount_for_cli(args: argparse.Namespace) -> str:
    """`ext4box mount` through the broker; returns the line to print."""
    # The broker decides with its own policy and settings: refuse, rather than
    # silently drop, the options that would have chosen them.
    for option, given in (("--policy", args.policy), ("--foreground", args.foreground),
                          ("--handoff-listen", args.handoff_listen),
                          ("--handoff-connect", args.handoff_connect),
                          ("--server-uid", args.server_uid is not None)):  # fmt: skip
        if given:
            raise HelperError(
                f"{option} is not available through the ext4box broker ({socket_path()}):"
                " it decides with its own policy and settings"
            )
    done = mount(args.image, args.mountpoint, args.mode, args.timeout, args.server_options)
    try:
        return (
            f"mounted {done['image']} on {done['mountpoint']} ({done['mode']}, container"
            f" {done['container']}, ready in {float(done['ready_seconds']):.2f} s, via the broker)"
        )
    except (KeyError, TypeError, ValueError):
        raise HelperError("the ext4box broker sent a malformed reply") from None


def mount(image: str, mountpoint: str, mode: str, timeout: float,
          server_options: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    call = MountCall(_absolute(image), _absolute(mountpoint), mode, tuple(server_options))
    return _ask(call, timeout)


def umount(mountpoint: str, timeout: float = 60.0) -> dict[str, Any]:
    # realpath as the records hold it; it tolerates a dead mount (ENOTCONN).
    return _ask(UmountCall(os.path.realpath(_absolute(mountpoint))), timeout)


def list_mounts(timeout: float = 30.0) -> list[dict[str, Any]]:
    rows = _ask(ListCall(), timeout).get("mounts")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise HelperError("the broker sent a malformed list")
    return rows


def _absolute(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _ask(call: MountCall | UmountCall | ListCall, timeout: float) -> dict[str, Any]:
    path = socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as err:
            raise HelperError(
                f"cannot reach the ext4box broker at {path}: {err.strerror or err}"
            ) from None
        sock.settimeout(max(timeout, 0.0) + SLACK)  # the broker's own timeout governs the mount
        try:
            send_message(sock, encode_call(call))
            message = recv_message(sock)
        except (ProtocolError, OSError) as err:
            why = err.line if isinstance(err, ProtocolError) else (err.strerror or str(err))
            raise HelperError(f"the ext4box broker at {path} did not answer: {why}") from None
    try:
        return decode_reply(message)
    except ProtocolError as err:
        raise HelperError(err.line) from None  # the broker's own one-line error
