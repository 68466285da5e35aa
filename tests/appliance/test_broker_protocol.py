"""The broker's wire format on real socketpairs: framing bounds, strict requests,
replies. (The broker process itself meets hostile bytes in test_broker_requests.py.)"""

from __future__ import annotations

import socket
import struct

import pytest

from ext4box.helper.broker_protocol import (
    MAX_MESSAGE_BYTES,
    ListCall,
    MountCall,
    ProtocolError,
    UmountCall,
    decode_call,
    decode_reply,
    encode_call,
    error_reply,
    ok_reply,
    recv_message,
    send_message,
)


@pytest.fixture
def pair():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left.settimeout(5)
    right.settimeout(5)
    with left, right:
        yield left, right


@pytest.mark.parametrize(
    "call",
    [MountCall("/srv/a.img", "/home/a/mnt", "ro"), MountCall("/d/x", "/m", "rw"),
     UmountCall("/home/a/mnt"), ListCall()],
)  # fmt: skip
def test_every_call_survives_the_wire(pair, call) -> None:
    left, right = pair
    send_message(left, encode_call(call))
    assert decode_call(recv_message(right)) == call


def test_a_message_split_into_bytes_is_reassembled(pair) -> None:
    left, right = pair
    body = b'{"version":1,"op":"list"}'
    for byte in struct.pack(">I", len(body)) + body:
        left.send(bytes([byte]))
    assert decode_call(recv_message(right)) == ListCall()


def test_the_largest_message_passes_and_one_more_byte_does_not(pair) -> None:
    left, right = pair
    padding = "x" * (MAX_MESSAGE_BYTES - len('{"pad":""}'))
    send_message(left, {"pad": padding})
    assert recv_message(right) == {"pad": padding}
    with pytest.raises(ProtocolError, match=f"exceeds {MAX_MESSAGE_BYTES}"):
        send_message(left, {"pad": padding + "x"})


def test_a_silent_peer_times_out(pair) -> None:
    _, right = pair
    right.settimeout(0.2)
    with pytest.raises(ProtocolError, match="timed out waiting for the length"):
        recv_message(right)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"version": 1, "op": "mount", "image": "/a", "mountpoint": "/m"},
         "mode must be \"ro\" or \"rw\", not null"),
        ({"version": 1, "op": "list", "policy": "/home/bob/pol"},
         "unknown field(s) 'policy' in list: the broker takes no settings from clients"),
        ({"version": 1, "op": "umount", "mountpoint": "/m", "uid": 0, "env": {}},
         "unknown field(s) 'env', 'uid' in umount: the broker takes no settings from clients"),
        ({"version": True, "op": "list"},
         "unsupported broker protocol version true (this broker speaks 1)"),
        ({"version": 1, "op": "x" * 500},
         "unknown operation '" + "x" * 56 + "... (known: mount, umount, list)"),
        ({"version": 1, "op": "mount", "image": ["/a"], "mountpoint": "/m", "mode": "ro"},
         "image must be a string"),
    ],
)  # fmt: skip
def test_requests_are_checked_completely(message, error) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_call(message)
    assert caught.value.line == error


def test_replies() -> None:
    assert decode_reply(ok_reply(mounts=[])) == {"version": 1, "ok": True, "mounts": []}
    with pytest.raises(ProtocolError) as caught:
        decode_reply(error_reply("denied:\n two\tlines"))
    assert caught.value.line == "denied: two lines"
    for bad in ({"version": 1}, {"version": 1, "ok": False}, {"version": 1, "ok": "yes"}):
        with pytest.raises(ProtocolError, match="malformed reply"):
            decode_reply(bad)
    with pytest.raises(ProtocolError, match="protocol version 2, this client speaks 1"):
        decode_reply({"version": 2, "ok": True})
