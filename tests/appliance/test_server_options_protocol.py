"""Server options on the wires: the hand-off's MOUNT (version 3) and the broker's
mount request. Old peers are never handed what they cannot apply."""

from __future__ import annotations

import errno
import os
import socket
import threading

import pytest

from ext4box import handoff_protocol as protocol
from ext4box.handoff_protocol import ImageKind, Mode, MountRequest
from ext4box.helper import handoff
from ext4box.helper.broker_protocol import MountCall, ProtocolError, decode_call, encode_call


def _request(size: int = 4 << 20, **kw) -> MountRequest:
    return MountRequest(Mode.RW, ImageKind.REGULAR, size, ("nosuid", "nodev"), **kw)


def test_mount_carries_server_options_from_version_3() -> None:
    request = _request(refused_features=("casefold",), server_options=("usrquota", "noatime"))
    assert protocol.decode_mount(protocol.encode_mount(request, 3), 3) == request
    # Without options, versions 1 and 2 are laid out as before.
    plain = _request(refused_features=("casefold",))
    assert protocol.decode_mount(protocol.encode_mount(plain, 2), 2) == plain
    for old in (1, 2):
        with pytest.raises(protocol.HandoffError, match="cannot carry the server options"):
            protocol.encode_mount(_request(server_options=("usrquota",)), old)


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        (b"", "too short for its server options section"),
        (b"\x00\x08\x00\x01usrquota", "nonzero padding"),
        (b"\x02\x01\x00\x00", "server options length 513 over 512"),
        (b"\x00\x08\x00\x00usrquot", "header says"),
        (b"\x00\x08\x00\x00Usrquota", "malformed mount option 'Usrquota'"),
    ],
)
def test_malformed_server_options_are_refused(tail: bytes, why: str) -> None:
    head = protocol.encode_mount(_request(), 2)  # version 3 = version 2 + the section
    with pytest.raises(protocol.HandoffError, match=why):
        protocol.decode_mount(head + tail, 3)


def test_a_version_2_server_is_not_handed_options_it_cannot_apply(fuse_fd, image_rw_fd):
    helper_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    told: list[protocol.PeerRefused] = []

    def old_server() -> None:
        protocol.recv_packet(server_end)
        protocol.send_packet(server_end, protocol.encode_hello_reply(2))
        packet, fds = protocol.recv_packet(server_end, max_fds=2)
        told.append(protocol.decode_error(packet))
        assert fds == []

    thread = threading.Thread(target=old_server)
    thread.start()
    with helper_end, server_end:
        request = _request(os.fstat(image_rw_fd).st_size, server_options=("usrquota",))
        with pytest.raises(protocol.HandoffError) as failed:
            handoff.hand_off(helper_end, fuse_fd, image_rw_fd, request, timeout=10)
        thread.join(10)
    assert failed.value.errno == errno.EPROTONOSUPPORT
    assert told and "cannot carry the server options (usrquota)" in told[0].reason


def test_broker_mount_request_carries_server_options() -> None:
    call = MountCall("/srv/a.img", "/home/a/mnt", "rw", ("grpquota", "noatime"))
    assert decode_call(encode_call(call)) == call
    # Without options the request is what an older broker accepts.
    assert "server_options" not in encode_call(MountCall("/a", "/m", "ro"))


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["noatime", "suid"], "unknown server option 'suid' (known: "),
        ("noatime", "server_options must be an array of strings"),
        ([["noatime"]], "server_options must be an array of strings"),
        (["noatime"] * 17, "17 server options, at most 16"),
    ],
)
def test_broker_refuses_malformed_server_options(options: object, error: str) -> None:
    message = {"version": 1, "op": "mount", "image": "/a", "mountpoint": "/m", "mode": "ro",
               "server_options": options}  # fmt: skip
    with pytest.raises(ProtocolError) as caught:
        decode_call(message)
    assert caught.value.line.startswith(error)
