"""The fd hand-off over real SEQPACKET socketpairs with real descriptors.

Both sides run for real: the server side (receive_handoff) in a thread, the
helper side either through ext4box.helper.handoff or, to play a broken or
hostile helper, by sending raw datagrams with send_packet.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from appliance.conftest import IMAGE_BYTES, open_fd_count
from ext4box import handoff_protocol as protocol
from ext4box.handoff_protocol import HandoffError, ImageKind, Mode, MountRequest, PeerRefused
from ext4box.helper import handoff
from ext4box.service import receive

REPO = Path(__file__).resolve().parents[2]
EXT4_MAGIC_OFFSET = 1024 + 0x38


class ServerThread:
    """receive_handoff() on the server end, result or error kept for the test."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.result: protocol.ReceivedMount | None = None
        self.error: HandoffError | None = None
        self._thread = threading.Thread(target=self._run, args=(sock, timeout), daemon=True)
        self._thread.start()

    def _run(self, sock: socket.socket, timeout: float) -> None:
        try:
            self.result = receive.receive_handoff(sock, timeout=timeout)
        except HandoffError as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive(), "server side hung"


@pytest.fixture
def server(
    seqpacket_pair: tuple[socket.socket, socket.socket],
) -> Iterator[Callable[[], ServerThread]]:
    started: list[ServerThread] = []

    def start() -> ServerThread:
        thread = ServerThread(seqpacket_pair[1])
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.join()
        if thread.result is not None:
            thread.result.close()


def ro_request(size: int = IMAGE_BYTES, options: tuple[str, ...] = ()) -> MountRequest:
    return MountRequest(Mode.RO, ImageKind.REGULAR, size, options)


def raw_hello(sock: socket.socket, low: int = 1, high: int = protocol.PROTOCOL_VERSION) -> None:
    """Play the helper's opening move by hand and check the reply."""
    protocol.send_packet(sock, protocol.encode_hello(low, high))
    packet, fds = protocol.recv_packet(sock)
    assert fds == []
    assert protocol.decode_hello_reply(packet) == min(high, protocol.PROTOCOL_VERSION)


def expect_refusal(sock: socket.socket, thread: ServerThread, *words: str) -> PeerRefused:
    """Both sides must name the same reason: the helper via ERROR, the server raised."""
    sock.settimeout(5)
    packet, _ = protocol.recv_packet(sock)
    refusal = protocol.decode_error(packet)
    thread.join()
    assert thread.result is None
    assert thread.error is not None
    assert thread.error.reason == refusal.reason
    for word in words:
        assert word in refusal.reason, refusal.reason
    return refusal


# --- the good path -------------------------------------------------------------


def test_handoff_ro_delivers_the_same_files(
    seqpacket_pair, server, fuse_fd, image_ro_fd, image_path
):
    helper_end, _ = seqpacket_pair
    thread = server()
    version = handoff.hand_off(helper_end, fuse_fd, image_ro_fd, ro_request(options=("noexec",)))
    thread.join()
    assert version == protocol.PROTOCOL_VERSION
    assert thread.error is None and thread.result is not None
    got = thread.result
    assert got.request == ro_request(options=("noexec",))
    # New descriptors in this process, for the very same open files.
    assert {got.fuse_fd, got.image_fd}.isdisjoint({fuse_fd, image_ro_fd})
    dev = os.fstat(got.fuse_fd)
    assert (os.major(dev.st_rdev), os.minor(dev.st_rdev)) == (10, 229)
    assert os.path.samestat(os.fstat(got.image_fd), os.stat(image_path))
    # The ext4 superblock magic, read through the received fd.
    assert os.pread(got.image_fd, 2, EXT4_MAGIC_OFFSET) == b"\x53\xef"
    receive.send_ready(seqpacket_pair[1])
    handoff.wait_ready(helper_end, timeout=5)


def test_handoff_rw(seqpacket_pair, server, fuse_fd, image_rw_fd):
    helper_end, _ = seqpacket_pair
    thread = server()
    request = MountRequest(Mode.RW, ImageKind.REGULAR, IMAGE_BYTES, ("allow_other",))
    handoff.hand_off(helper_end, fuse_fd, image_rw_fd, request)
    thread.join()
    assert thread.result is not None and thread.result.request.mode is Mode.RW


def test_block_device_handoff(seqpacket_pair, server, fuse_fd, image_path):
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    if loop.returncode != 0:
        pytest.skip(f"losetup failed: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            thread = server()
            request = MountRequest(Mode.RO, ImageKind.BLOCK, IMAGE_BYTES)
            handoff.hand_off(seqpacket_pair[0], fuse_fd, fd, request)
            thread.join()
            assert thread.result is not None
            assert os.pread(thread.result.image_fd, 2, EXT4_MAGIC_OFFSET) == b"\x53\xef"
        finally:
            os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


def test_server_error_reaches_helper_as_peer_refused(seqpacket_pair, server, fuse_fd, image_ro_fd):
    helper_end, server_end = seqpacket_pair
    thread = server()
    handoff.hand_off(helper_end, fuse_fd, image_ro_fd, ro_request())
    thread.join()
    protocol.reply_error(server_end, errno.EUCLEAN, "corrupt superblock at block 0: bad magic")
    with pytest.raises(PeerRefused) as refused:
        handoff.wait_ready(helper_end, timeout=5)
    assert refused.value.errno == errno.EUCLEAN
    assert refused.value.reason == "corrupt superblock at block 0: bad magic"


# --- versions ------------------------------------------------------------------


@pytest.mark.parametrize(("low", "high"), [(0, 0), (protocol.PROTOCOL_VERSION + 1, 9)])
def test_version_without_overlap_is_refused_on_both_sides(
    seqpacket_pair, server, fuse_fd, image_ro_fd, low, high
):
    helper_end, _ = seqpacket_pair
    thread = server()
    with pytest.raises(PeerRefused) as refused:
        handoff.hand_off(
            helper_end, fuse_fd, image_ro_fd, ro_request(), min_version=low, max_version=high
        )
    thread.join()
    assert refused.value.errno == errno.EPROTONOSUPPORT
    assert f"versions {low}..{high}" in refused.value.reason
    assert thread.error is not None and thread.error.reason == refused.value.reason


def test_newer_helper_gets_our_version(seqpacket_pair, server, fuse_fd, image_ro_fd):
    thread = server()
    version = handoff.hand_off(
        seqpacket_pair[0], fuse_fd, image_ro_fd, ro_request(), min_version=1, max_version=9
    )
    thread.join()
    assert version == protocol.PROTOCOL_VERSION and thread.result is not None


def test_helper_refuses_a_version_it_did_not_offer(seqpacket_pair, fuse_fd, image_ro_fd):
    helper_end, server_end = seqpacket_pair

    def rogue_server() -> None:
        protocol.recv_packet(server_end)
        protocol.send_packet(server_end, protocol.encode_hello_reply(7))

    rogue = threading.Thread(target=rogue_server)
    rogue.start()
    with pytest.raises(HandoffError, match="server chose hand-off protocol version 7"):
        handoff.hand_off(helper_end, fuse_fd, image_ro_fd, ro_request())
    rogue.join()


# --- malformed and truncated messages --------------------------------------------


@pytest.mark.parametrize(
    ("packet", "words"),
    [
        (b"EXH", ("truncated message of 3 bytes",)),
        (b"EXHI\x00\x01\x00", ("HELLO is 7 bytes, expected 12",)),
        (b"EXHI\x00\x01\x00\x01\x00\x00\x00\x00\x00", ("HELLO is 13 bytes",)),
        (struct.pack(">IHHI", protocol.MAGIC_HELLO, 1, 1, 4), ("unknown flags",)),
        (struct.pack(">IHHI", protocol.MAGIC_HELLO, 3, 1, 0), ("range 3..1 is empty",)),
        (b"GET / HTTP/1.0\r\n\r\n", ("expected HELLO, got unknown message",)),
        (protocol.encode_ready(), ("expected HELLO, got READY",)),
        (b"\x00" * (protocol.MAX_PACKET + 1), ("larger than",)),
    ],
)
def test_malformed_hello_is_refused(seqpacket_pair, server, packet, words):
    helper_end, _ = seqpacket_pair
    thread = server()
    helper_end.send(packet)  # raw: send_packet would refuse the oversized one
    expect_refusal(helper_end, thread, *words)


def _mount_packet(mode=1, kind=1, options=b"", size=IMAGE_BYTES, claimed_len=None) -> bytes:
    length = len(options) if claimed_len is None else claimed_len
    return protocol.MOUNT_HEAD.pack(protocol.MAGIC_MOUNT, mode, kind, length, size) + options


@pytest.mark.parametrize(
    ("packet", "words"),
    [
        (_mount_packet()[:10], ("MOUNT is 10 bytes, expected 16",)),
        (_mount_packet(options=b"noexec", claimed_len=9), ("header says 25",)),
        (_mount_packet(options=b"noexec", claimed_len=600), ("options length 600",)),
        (_mount_packet(mode=3), ("unknown mode 3",)),
        (_mount_packet(kind=9), ("unknown image kind 9",)),
        (_mount_packet(size=0), ("image size 0 out of range",)),
        (_mount_packet(options=b"noexec,,ro"), ("malformed mount option ''",)),
        (_mount_packet(options=b"fsname=a b"), ("malformed mount option 'fsname=a b'",)),
        (_mount_packet(options="fsname=\u00e9".encode()), ("not ASCII",)),
        (_mount_packet(options=b",".join([b"noexec"] * 17)), ("17 mount options",)),
    ],
)
def test_malformed_mount_is_refused_and_fds_closed(
    seqpacket_pair, server, fuse_fd, image_ro_fd, packet, words
):
    helper_end, _ = seqpacket_pair
    thread = server()
    raw_hello(helper_end, 1, 1)  # these are version-1 layouts (test_refused_features: 2)
    before = open_fd_count()
    protocol.send_packet(helper_end, packet, (fuse_fd, image_ro_fd))
    expect_refusal(helper_end, thread, *words)
    assert open_fd_count() == before, "received fds leaked"


def test_peer_closing_early_is_refused(seqpacket_pair, server):
    helper_end, _ = seqpacket_pair
    thread = server()
    helper_end.shutdown(socket.SHUT_WR)
    thread.join()
    assert thread.error is not None and "peer closed the connection" in thread.error.reason


def test_silent_helper_times_out(seqpacket_pair):
    _, server_end = seqpacket_pair
    with pytest.raises(HandoffError) as error:
        receive.receive_handoff(server_end, timeout=0.2)
    assert error.value.errno == errno.ETIMEDOUT


def test_stream_socket_is_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, pytest.raises(HandoffError, match="SOCK_SEQPACKET"):
        receive.receive_handoff(b, timeout=1)


def test_fds_on_hello_are_refused_and_closed(seqpacket_pair, server, image_ro_fd):
    helper_end, _ = seqpacket_pair
    thread = server()
    before = open_fd_count()
    protocol.send_packet(helper_end, protocol.encode_hello(), (image_ro_fd,))
    expect_refusal(helper_end, thread, "carries 1 fds, expected at most 0")
    assert open_fd_count() == before


# --- wrong, missing and extra descriptors -------------------------------------------


@pytest.fixture
def odd_fds(tmp_path: Path) -> Iterator[dict[str, int]]:
    """Descriptors of every wrong kind, opened for real."""
    read_end, write_end = os.pipe()
    fds = {
        "pipe": read_end,
        "directory": os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
        "null": os.open("/dev/null", os.O_RDWR),
    }
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fds["socket"] = listener.fileno()
    try:
        yield fds
    finally:
        for name, fd in fds.items():
            if name != "socket":
                os.close(fd)
        os.close(write_end)
        listener.close()


def _send_mount(sock: socket.socket, request: MountRequest, fds: Sequence[int]) -> None:
    raw_hello(sock)
    protocol.send_packet(sock, protocol.encode_mount(request), fds)


@pytest.mark.parametrize(
    ("fuse", "words"),
    [
        ("pipe", ("fuse fd is a pipe, not the /dev/fuse character device",)),
        ("directory", ("fuse fd is a directory",)),
        ("null", ("character device 1:3, not /dev/fuse (10:229)",)),
        ("socket", ("fuse fd is a socket",)),
    ],
)
def test_wrong_fuse_fd_is_refused(seqpacket_pair, server, odd_fds, image_ro_fd, fuse, words):
    helper_end, _ = seqpacket_pair
    thread = server()
    before = open_fd_count()
    _send_mount(helper_end, ro_request(), (odd_fds[fuse], image_ro_fd))
    refusal = expect_refusal(helper_end, thread, *words)
    assert refusal.errno == errno.EBADF
    assert open_fd_count() == before


@pytest.mark.parametrize(
    ("image", "words"),
    [
        ("pipe", ("image fd is a pipe, declared a regular file",)),
        ("directory", ("image fd is a directory, declared a regular file",)),
        ("null", ("image fd is a character device",)),
    ],
)
def test_wrong_image_fd_is_refused(seqpacket_pair, server, odd_fds, fuse_fd, image, words):
    helper_end, _ = seqpacket_pair
    thread = server()
    _send_mount(helper_end, ro_request(), (fuse_fd, odd_fds[image]))
    expect_refusal(helper_end, thread, *words)


def test_swapped_fds_are_refused(seqpacket_pair, server, fuse_fd, image_ro_fd):
    helper_end, _ = seqpacket_pair
    thread = server()
    _send_mount(helper_end, ro_request(), (image_ro_fd, fuse_fd))
    expect_refusal(helper_end, thread, "fuse fd is a regular file")


def test_ro_declared_but_rw_fd_is_refused(seqpacket_pair, server, fuse_fd, image_rw_fd):
    helper_end, _ = seqpacket_pair
    thread = server()
    _send_mount(helper_end, ro_request(), (fuse_fd, image_rw_fd))
    expect_refusal(helper_end, thread, "open read-write, declared mode ro needs read-only")


def test_rw_declared_but_ro_fd_is_refused(seqpacket_pair, server, fuse_fd, image_ro_fd):
    helper_end, _ = seqpacket_pair
    thread = server()
    request = MountRequest(Mode.RW, ImageKind.REGULAR, IMAGE_BYTES)
    _send_mount(helper_end, request, (fuse_fd, image_ro_fd))
    expect_refusal(helper_end, thread, "open read-only, declared mode rw needs read-write")


def test_o_path_image_fd_is_refused(seqpacket_pair, server, fuse_fd, image_path):
    helper_end, _ = seqpacket_pair
    path_fd = os.open(image_path, os.O_PATH | os.O_CLOEXEC)
    try:
        thread = server()
        _send_mount(helper_end, ro_request(), (fuse_fd, path_fd))
        expect_refusal(helper_end, thread, "O_PATH")
    finally:
        os.close(path_fd)


def test_block_declared_but_regular_given_is_refused(seqpacket_pair, server, fuse_fd, image_ro_fd):
    helper_end, _ = seqpacket_pair
    thread = server()
    request = MountRequest(Mode.RO, ImageKind.BLOCK, IMAGE_BYTES)
    _send_mount(helper_end, request, (fuse_fd, image_ro_fd))
    expect_refusal(helper_end, thread, "regular file, declared a block device")


def test_size_mismatch_is_refused(seqpacket_pair, server, fuse_fd, image_ro_fd):
    helper_end, _ = seqpacket_pair
    thread = server()
    _send_mount(helper_end, ro_request(size=IMAGE_BYTES + 4096), (fuse_fd, image_ro_fd))
    expect_refusal(helper_end, thread, f"image is {IMAGE_BYTES} bytes, helper declared")


@pytest.mark.parametrize("count", [0, 1])
def test_missing_fds_are_refused(seqpacket_pair, server, fuse_fd, count):
    helper_end, _ = seqpacket_pair
    thread = server()
    _send_mount(helper_end, ro_request(), (fuse_fd,)[:count])
    expect_refusal(helper_end, thread, f"MOUNT carries {count} fds, expected 2")


def test_extra_fds_are_refused_and_closed(seqpacket_pair, server, fuse_fd, image_ro_fd):
    helper_end, _ = seqpacket_pair
    thread = server()
    before = open_fd_count()
    _send_mount(helper_end, ro_request(), (fuse_fd, image_ro_fd, image_ro_fd))
    expect_refusal(helper_end, thread, "carries 3 fds, expected at most 2")
    assert open_fd_count() == before


def test_flood_of_fds_is_refused_and_closed(seqpacket_pair, server, fuse_fd, image_ro_fd):
    """More fds than the receive buffer has room for: MSG_CTRUNC, nothing leaks."""
    helper_end, _ = seqpacket_pair
    thread = server()
    before = open_fd_count()
    _send_mount(helper_end, ro_request(), [fuse_fd, image_ro_fd] * 8)
    expect_refusal(helper_end, thread, "ancillary data truncated")
    assert open_fd_count() == before


# --- the helper checks its own side first ------------------------------------------


def test_helper_refuses_to_send_mismatched_fds(seqpacket_pair, fuse_fd, image_rw_fd):
    with pytest.raises(HandoffError, match="declared mode ro needs read-only"):
        handoff.hand_off(seqpacket_pair[0], fuse_fd, image_rw_fd, ro_request())


def test_request_validation():
    with pytest.raises(HandoffError, match="malformed mount option"):
        ro_request(options=("allow_other", "../../etc"))
    with pytest.raises(HandoffError, match="out of range"):
        ro_request(size=-1)
    long_text = "x" * 5000
    refusal = protocol.decode_error(protocol.encode_error(errno.EIO, long_text + "\x1b[2J"))
    assert len(refusal.reason) == protocol.MAX_ERROR_TEXT
    assert "\x1b" not in protocol.decode_error(protocol.encode_error(5, "a\x1bb")).reason


# --- through the service entrypoint ---------------------------------------------------


def _run_service(args: list[str], sock: socket.socket) -> subprocess.Popen[str]:
    code = (
        "import sys; from ext4box.service.main import main;"
        f" sys.exit(main({[*args, '--handoff-fd', str(sock.fileno())]!r}))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        pass_fds=(sock.fileno(),),
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def test_service_main_refuses_wrong_fd_with_exit_code(seqpacket_pair, odd_fds, image_ro_fd):
    helper_end, server_end = seqpacket_pair
    proc = _run_service(["--allow-privileged", "--timeout", "10"], server_end)
    raw_hello(helper_end)
    protocol.send_packet(
        helper_end, protocol.encode_mount(ro_request()), (odd_fds["pipe"], image_ro_fd)
    )
    helper_end.settimeout(10)
    refusal = protocol.decode_error(protocol.recv_packet(helper_end)[0])
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 4
    assert "fuse fd is a pipe" in refusal.reason
    assert f"hand-off refused: {refusal.reason}" in err


def test_service_main_refuses_weak_sandbox_before_reading_the_socket(seqpacket_pair):
    if os.getuid() != 0:
        pytest.skip("needs a privileged test process to be refused")
    helper_end, server_end = seqpacket_pair
    proc = _run_service([], server_end)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 3
    assert "refusing to serve" in err and "--allow-privileged" in err
    helper_end.setblocking(False)
    with pytest.raises(BlockingIOError):
        helper_end.recv(64)  # the service said nothing on the socket


def test_helper_abort_is_reported_with_its_reason(seqpacket_pair, server):
    helper_end, _ = seqpacket_pair
    thread = server()
    raw_hello(helper_end)
    protocol.reply_error(helper_end, errno.EPERM, "policy: no rule matches /srv/x.img")
    thread.join()
    assert isinstance(thread.error, PeerRefused)
    assert thread.error.reason == "helper aborted: policy: no rule matches /srv/x.img"
    assert thread.error.errno == errno.EPERM
