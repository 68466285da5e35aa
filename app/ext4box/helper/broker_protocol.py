"""What a client and the broker say to each other (docs/broker-protocol.md).

One request and one reply per connection on an AF_UNIX stream socket. Each
message is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON holding one object. Every size is bounded, every key is checked: an
unknown key, a wrong type or a path that is not absolute is an error, so a
client cannot slip a setting (a policy directory, an environment) past a
broker that would otherwise ignore it silently.

    request  {"version": 1, "op": "mount", "image": P, "mountpoint": P, "mode": "ro"
              [, "server_options": ["usrquota", "noatime"]]}
             {"version": 1, "op": "umount", "mountpoint": P}
             {"version": 1, "op": "list"}
    reply    {"version": 1, "ok": true, ...}    {"version": 1, "ok": false, "error": LINE}
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

from ext4box.policy.server_options import ServerOptionError, check_server_options

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # a list reply of ~150 mounts; requests are far smaller
MAX_PATH_BYTES = 4096  # PATH_MAX
_LENGTH = struct.Struct(">I")

OPS = ("mount", "umount", "list")
_KEYS = {
    "mount": {"version", "op", "image", "mountpoint", "mode", "server_options"},
    "umount": {"version", "op", "mountpoint"},
    "list": {"version", "op"},
}


class ProtocolError(Exception):
    """A malformed or unexpected message; `line` is said to the peer as is."""

    def __init__(self, line: str) -> None:
        self.line = " ".join(line.split())
        super().__init__(self.line)


@dataclass(frozen=True, slots=True)
class MountCall:
    image: str
    mountpoint: str
    mode: str  # "ro" | "rw"
    # Asked for, not granted: the broker's policy judges them (policy/server_options.py).
    server_options: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UmountCall:
    mountpoint: str


@dataclass(frozen=True, slots=True)
class ListCall:
    pass


Call = MountCall | UmountCall | ListCall


# -- framing ----------------------------------------------------------------------


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    sock.sendall(_LENGTH.pack(len(body)) + body)


def recv_message(sock: socket.socket) -> dict[str, Any]:
    """One framed JSON object; the socket's timeout bounds each read."""
    header = _recv_exactly(sock, _LENGTH.size, "length")
    (length,) = _LENGTH.unpack(header)
    if not 0 < length <= MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message length {length} is outside 1..{MAX_MESSAGE_BYTES}")
    body = _recv_exactly(sock, length, "message")
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ProtocolError("message is not UTF-8 JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    return message


def _recv_exactly(sock: socket.socket, count: int, what: str) -> bytes:
    chunks, have = [], 0
    while have < count:
        try:
            chunk = sock.recv(min(count - have, 65536))
        except TimeoutError:
            raise ProtocolError(f"timed out waiting for the {what}") from None
        if not chunk:
            raise ProtocolError(f"connection closed in the middle of the {what}")
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks)


# -- requests -----------------------------------------------------------------------


def encode_call(call: Call) -> dict[str, Any]:
    if isinstance(call, MountCall):
        message = {"version": PROTOCOL_VERSION, "op": "mount", "image": call.image,
                   "mountpoint": call.mountpoint, "mode": call.mode}  # fmt: skip
        if call.server_options:  # absent otherwise: an older broker knows no such key
            message["server_options"] = list(call.server_options)
        return message
    if isinstance(call, UmountCall):
        return {"version": PROTOCOL_VERSION, "op": "umount", "mountpoint": call.mountpoint}
    return {"version": PROTOCOL_VERSION, "op": "list"}


def decode_call(message: dict[str, Any]) -> Call:
    """Validate a request completely before anything acts on it."""
    version = message.get("version")
    if not _is_our_version(version):
        raise ProtocolError(
            f"unsupported broker protocol version {_shown(version)}"
            f" (this broker speaks {PROTOCOL_VERSION})"
        )
    op = message.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown operation {_shown(op)} (known: {', '.join(OPS)})")
    extra = sorted(set(message) - _KEYS[op])
    if extra:
        raise ProtocolError(
            f"unknown field(s) {', '.join(_shown(key) for key in extra)} in {op}:"
            " the broker takes no settings from clients"
        )
    if op == "mount":
        mode = message.get("mode")
        if mode not in ("ro", "rw"):
            raise ProtocolError(f'mode must be "ro" or "rw", not {_shown(mode)}')
        return MountCall(_path(message, "image"), _path(message, "mountpoint"), mode,
                         _server_options(message))
    if op == "umount":
        return UmountCall(_path(message, "mountpoint"))
    return ListCall()


def _server_options(message: dict[str, Any]) -> tuple[str, ...]:
    value = message.get("server_options", [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ProtocolError("server_options must be an array of strings")
    try:
        check_server_options(value)
    except ServerOptionError as err:
        raise ProtocolError(str(err)) from None
    return tuple(value)


def _is_our_version(value: object) -> bool:
    # JSON true is Python's True, which == 1: compare types too.
    return type(value) is int and value == PROTOCOL_VERSION


def _path(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string")
    encoded = value.encode("utf-8", "surrogateescape")
    if not value.startswith("/") or "\0" in value or len(encoded) > MAX_PATH_BYTES:
        raise ProtocolError(f"{key} must be an absolute path of at most {MAX_PATH_BYTES} bytes")
    return value


def _shown(value: object) -> str:
    """A client's value, quoted, bounded and free of control characters."""
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- replies -----------------------------------------------------------------------


def ok_reply(**fields: Any) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "ok": True, **fields}


def error_reply(line: str) -> dict[str, Any]:
    return {"version": PROTOCOL_VERSION, "ok": False, "error": " ".join(line.split())}


def decode_reply(message: dict[str, Any]) -> dict[str, Any]:
    """The reply's fields when ok; ProtocolError(the broker's line) when not."""
    if not _is_our_version(message.get("version")):
        raise ProtocolError(
            f"the broker answered with protocol version {_shown(message.get('version'))},"
            f" this client speaks {PROTOCOL_VERSION}"
        )
    if message.get("ok") is True:
        return message
    error = message.get("error")
    if message.get("ok") is False and isinstance(error, str):
        raise ProtocolError(error)
    raise ProtocolError("the broker sent a malformed reply")
