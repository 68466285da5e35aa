"""The helper → server hand-off protocol: wire format, and the fd checks both ends make.

The host helper has already decided, opened and mounted; it passes the server
two file descriptors (/dev/fuse and the image) over an AF_UNIX SOCK_SEQPACKET
socket with SCM_RIGHTS. Conversation (docs/handoff-protocol.md):

    helper                              server
    HELLO(min, max)               ->
                                  <-    HELLO_REPLY(version)  | ERROR
    MOUNT(mode, kind, size, opts[, refused features from version 2]
          [, server options from version 3])
      + fds [fuse, image]         ->
                                  <-    READY                 | ERROR

Framing follows libfuse's mount-service protocol (fuservicemount3): one
SEQPACKET datagram per message, a 4-byte ASCII magic first, big-endian
fields, zero padding checked, positive errno in errors. Every message has an
exact or bounded size, every byte is validated, and any received descriptor
is closed on every failure path, so a confused or hostile peer gets a clean
refusal and never leaks an fd into this process.

Both ends import this module: the helper's end is ext4box.helper.handoff,
the server's ext4box.service.receive. It sits below both, so neither of them
imports the other.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import re
import socket
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

# 2: MOUNT carries the ext4 features the policy refuses (REFUSED section);
# 3: and the server options the policy granted (SERVER_OPTIONS section).
# An older peer is still served as before, as long as MOUNT needs no newer section.
PROTOCOL_VERSION = 3
MIN_PROTOCOL_VERSION = 1
REFUSED_FEATURES_VERSION = 2
SERVER_OPTIONS_VERSION = 3

MAX_PACKET = 2048  # every message fits; larger datagrams are refused
MAX_FDS_PER_PACKET = 2
MAX_OPTIONS_BYTES = 512
MAX_OPTIONS = 16
MAX_ERROR_TEXT = 1024
MAX_REFUSED_FEATURES = 32
MAX_REFUSED_BYTES = 512
DEFAULT_TIMEOUT = 30.0

FUSE_DEV_MAJOR = 10
FUSE_DEV_MINOR = 229

MAGIC_HELLO = 0x45584849  # "EXHI"
MAGIC_HELLO_REPLY = 0x45584852  # "EXHR"
MAGIC_MOUNT = 0x45584D54  # "EXMT"
MAGIC_READY = 0x45584F4B  # "EXOK"
MAGIC_ERROR = 0x45584552  # "EXER"

MAGIC_NAMES = {
    MAGIC_HELLO: "HELLO",
    MAGIC_HELLO_REPLY: "HELLO_REPLY",
    MAGIC_MOUNT: "MOUNT",
    MAGIC_READY: "READY",
    MAGIC_ERROR: "ERROR",
}

MAGIC = struct.Struct(">I")
# magic, min_version, max_version, flags (no flags defined: must be zero)
HELLO = struct.Struct(">IHHI")
# magic, version, padding
HELLO_REPLY = struct.Struct(">IHH")
# magic, mode, image_kind, options_len, image_size; then options_len bytes
MOUNT_HEAD = struct.Struct(">IBBHQ")
# version 2, after the options: features_len, padding; then features_len bytes
REFUSED_HEAD = struct.Struct(">HH")
# version 3, after the features: server_options_len, padding; then that many bytes
SERVER_OPTIONS_HEAD = struct.Struct(">HH")
# magic, flags (none defined: must be zero)
READY = struct.Struct(">II")
# magic, errno, text_len, padding; then text_len bytes of UTF-8
ERROR_HEAD = struct.Struct(">IIHH")

# One option: a lowercase name, optionally =value; values are plain tokens.
_OPTION = re.compile(r"[a-z][a-z0-9_]{0,31}(=[A-Za-z0-9_.:+@/-]{1,128})?")
# One ext4 feature name as dumpe2fs prints it ("64bit", "read-only", "casefold").
_FEATURE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class Mode(IntEnum):
    """Access the helper granted; the image fd's open mode must match it."""

    RO = 1
    RW = 2


class ImageKind(IntEnum):
    """What the image fd refers to."""

    REGULAR = 1
    BLOCK = 2


class HandoffError(Exception):
    """The hand-off was refused or broke; `errno` travels in ERROR messages."""

    def __init__(self, reason: str, err: int = errno.EPROTO) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = err


class PeerRefused(HandoffError):
    """The other side sent an ERROR message; `reason` is its text."""


@dataclass(frozen=True, slots=True)
class MountRequest:
    """What the helper declares about the descriptors it hands over."""

    mode: Mode
    image_kind: ImageKind
    image_size: int
    options: tuple[str, ...] = ()
    # ext4 features the policy refuses: the server refuses a superblock that
    # has any of them (protocol version 2 and later).
    refused_features: tuple[str, ...] = ()
    # What the server itself must apply (quota enforcement, the atime rule),
    # in the order given (protocol version 3 and later); the server refuses
    # a name it does not know.
    server_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_options(self.options)
        validate_options(self.server_options)
        validate_refused_features(self.refused_features)
        if not 0 < self.image_size < 1 << 63:
            raise HandoffError(f"image size {self.image_size} out of range", errno.EINVAL)


@dataclass(frozen=True, slots=True)
class ReceivedMount:
    """A verified hand-off: the server owns (and must close) both fds."""

    version: int
    request: MountRequest
    fuse_fd: int
    image_fd: int

    def close(self) -> None:
        close_fds((self.fuse_fd, self.image_fd))


# --- codec -------------------------------------------------------------------


def validate_options(options: Sequence[str]) -> None:
    if len(options) > MAX_OPTIONS:
        raise HandoffError(f"{len(options)} mount options, at most {MAX_OPTIONS}", errno.EINVAL)
    for option in options:
        if not isinstance(option, str) or not _OPTION.fullmatch(option):
            raise HandoffError(f"malformed mount option {option!r}", errno.EINVAL)
    if len(",".join(options)) > MAX_OPTIONS_BYTES:
        raise HandoffError(f"mount options longer than {MAX_OPTIONS_BYTES} bytes", errno.EINVAL)


def validate_refused_features(names: Sequence[str]) -> None:
    if len(names) > MAX_REFUSED_FEATURES:
        raise HandoffError(
            f"{len(names)} refused features, at most {MAX_REFUSED_FEATURES}", errno.EINVAL
        )
    for name in names:
        if not isinstance(name, str) or not _FEATURE.fullmatch(name):
            raise HandoffError(f"malformed ext4 feature name {name!r}", errno.EINVAL)
    if len(",".join(names)) > MAX_REFUSED_BYTES:
        raise HandoffError(f"refused features longer than {MAX_REFUSED_BYTES} bytes", errno.EINVAL)


def encode_hello(
    min_version: int = MIN_PROTOCOL_VERSION, max_version: int = PROTOCOL_VERSION
) -> bytes:
    return HELLO.pack(MAGIC_HELLO, min_version, max_version, 0)


def decode_hello(packet: bytes) -> tuple[int, int]:
    _expect(packet, MAGIC_HELLO, HELLO.size, exact=True)
    _, low, high, flags = HELLO.unpack(packet)
    if flags:
        raise HandoffError(f"HELLO has unknown flags {flags:#x}")
    if low > high:
        raise HandoffError(f"HELLO version range {low}..{high} is empty")
    return low, high


def encode_hello_reply(version: int) -> bytes:
    return HELLO_REPLY.pack(MAGIC_HELLO_REPLY, version, 0)


def decode_hello_reply(packet: bytes) -> int:
    _expect(packet, MAGIC_HELLO_REPLY, HELLO_REPLY.size, exact=True)
    _, version, padding = HELLO_REPLY.unpack(packet)
    if padding:
        raise HandoffError("HELLO_REPLY has nonzero padding")
    return version


def encode_mount(request: MountRequest, version: int = PROTOCOL_VERSION) -> bytes:
    """MOUNT as the agreed protocol `version` lays it out."""
    if version < SERVER_OPTIONS_VERSION and request.server_options:
        # Never drop an option silently: quota enforcement may be among them.
        raise HandoffError(
            f"the server speaks hand-off protocol {version}, which cannot carry the server"
            f" options ({','.join(request.server_options)}); upgrade the server",
            errno.EPROTONOSUPPORT,
        )
    options = ",".join(request.options).encode("ascii")
    head = MOUNT_HEAD.pack(
        MAGIC_MOUNT, request.mode, request.image_kind, len(options), request.image_size
    )
    if version < REFUSED_FEATURES_VERSION:
        if request.refused_features:
            # Never drop a refusal silently: an old server could not enforce it.
            raise HandoffError(
                f"the server speaks hand-off protocol {version}, which cannot carry the refused"
                f" ext4 features ({','.join(request.refused_features)}); upgrade the server",
                errno.EPROTONOSUPPORT,
            )
        return head + options
    refused = ",".join(request.refused_features).encode("ascii")
    body = head + options + REFUSED_HEAD.pack(len(refused), 0) + refused
    if version < SERVER_OPTIONS_VERSION:
        return body
    server = ",".join(request.server_options).encode("ascii")
    return body + SERVER_OPTIONS_HEAD.pack(len(server), 0) + server


def decode_mount(packet: bytes, version: int = PROTOCOL_VERSION) -> MountRequest:
    _expect(packet, MAGIC_MOUNT, MOUNT_HEAD.size, exact=False)
    _, mode, kind, options_len, size = MOUNT_HEAD.unpack_from(packet)
    if options_len > MAX_OPTIONS_BYTES:
        raise HandoffError(f"MOUNT options length {options_len} over {MAX_OPTIONS_BYTES}")
    end = MOUNT_HEAD.size + options_len
    refused_raw = b""
    if version >= REFUSED_FEATURES_VERSION:
        if len(packet) < end + REFUSED_HEAD.size:
            raise HandoffError(
                f"MOUNT is {len(packet)} bytes, too short for its refused-features section"
            )
        refused_len, padding = REFUSED_HEAD.unpack_from(packet, end)
        if padding:
            raise HandoffError("MOUNT has nonzero padding")
        if refused_len > MAX_REFUSED_BYTES:
            raise HandoffError(
                f"MOUNT refused features length {refused_len} over {MAX_REFUSED_BYTES}"
            )
        refused_raw = packet[end + REFUSED_HEAD.size : end + REFUSED_HEAD.size + refused_len]
        end += REFUSED_HEAD.size + refused_len
    server_raw = b""
    if version >= SERVER_OPTIONS_VERSION:
        server_raw, end = _section(packet, end, "server options")
    if len(packet) != end:
        raise HandoffError(f"MOUNT is {len(packet)} bytes, header says {end}")
    if mode not in Mode._value2member_map_:
        raise HandoffError(f"MOUNT has unknown mode {mode}")
    if kind not in ImageKind._value2member_map_:
        raise HandoffError(f"MOUNT has unknown image kind {kind}")
    options = _ascii_list(packet[MOUNT_HEAD.size : MOUNT_HEAD.size + options_len], "options")
    refused = _ascii_list(refused_raw, "refused features")
    server = _ascii_list(server_raw, "server options")
    return MountRequest(Mode(mode), ImageKind(kind), size, options, refused, server)


def _section(packet: bytes, start: int, what: str) -> tuple[bytes, int]:
    """One length-prefixed section of MOUNT at `start`: its bytes, and where it ends."""
    if len(packet) < start + SERVER_OPTIONS_HEAD.size:
        raise HandoffError(f"MOUNT is {len(packet)} bytes, too short for its {what} section")
    length, padding = SERVER_OPTIONS_HEAD.unpack_from(packet, start)
    if padding:
        raise HandoffError("MOUNT has nonzero padding")
    if length > MAX_OPTIONS_BYTES:
        raise HandoffError(f"MOUNT {what} length {length} over {MAX_OPTIONS_BYTES}")
    begin = start + SERVER_OPTIONS_HEAD.size
    return packet[begin : begin + length], begin + length


def _ascii_list(raw: bytes, what: str) -> tuple[str, ...]:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise HandoffError(f"MOUNT {what} are not ASCII") from None
    return tuple(text.split(",")) if text else ()


def encode_ready() -> bytes:
    return READY.pack(MAGIC_READY, 0)


def decode_ready(packet: bytes) -> None:
    _expect(packet, MAGIC_READY, READY.size, exact=True)
    _, flags = READY.unpack(packet)
    if flags:
        raise HandoffError(f"READY has unknown flags {flags:#x}")


def encode_error(err: int, text: str) -> bytes:
    if not 0 < err < 4096:
        err = errno.EIO
    data = _printable(text).encode("utf-8")[:MAX_ERROR_TEXT]
    data = data.decode("utf-8", "ignore").encode("utf-8")  # never cut a character
    return ERROR_HEAD.pack(MAGIC_ERROR, err, len(data), 0) + data


def decode_error(packet: bytes) -> PeerRefused:
    _expect(packet, MAGIC_ERROR, ERROR_HEAD.size, exact=False)
    _, err, text_len, padding = ERROR_HEAD.unpack_from(packet)
    if padding or text_len > MAX_ERROR_TEXT or len(packet) != ERROR_HEAD.size + text_len:
        raise HandoffError("malformed ERROR message")
    if not 0 < err < 4096:
        raise HandoffError(f"ERROR carries errno {err} out of range")
    text = _printable(packet[ERROR_HEAD.size :].decode("utf-8", "replace"))
    return PeerRefused(text or os.strerror(err), err)


def magic_of(packet: bytes) -> int:
    if len(packet) < MAGIC.size:
        raise HandoffError(f"truncated message of {len(packet)} bytes")
    return MAGIC.unpack_from(packet)[0]


def _expect(packet: bytes, magic: int, size: int, *, exact: bool) -> None:
    name = MAGIC_NAMES[magic]
    got = magic_of(packet)
    if got != magic:
        raise HandoffError(f"expected {name}, got {_magic_text(got)}")
    if len(packet) < size or (exact and len(packet) != size):
        raise HandoffError(f"{name} is {len(packet)} bytes, expected {size}")


def _magic_text(magic: int) -> str:
    if magic in MAGIC_NAMES:
        return MAGIC_NAMES[magic]
    return f"unknown message {magic:#010x}"


def _printable(text: str) -> str:
    # Error text ends up in logs and terminals: no control characters.
    return "".join(ch if ch.isprintable() else "?" for ch in text)


# --- transport ---------------------------------------------------------------


def send_packet(sock: socket.socket, packet: bytes, fds: Sequence[int] = ()) -> None:
    """Send one datagram, with `fds` attached via SCM_RIGHTS."""
    if len(packet) > MAX_PACKET:
        raise HandoffError(f"refusing to send {len(packet)}-byte message", errno.EMSGSIZE)
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    try:
        sent = sock.sendmsg([packet], ancillary, socket.MSG_NOSIGNAL)
    except TimeoutError:
        raise HandoffError("timed out sending to peer", errno.ETIMEDOUT) from None
    except OSError as exc:
        reason = f"cannot send to peer: {exc.strerror}"
        raise HandoffError(reason, exc.errno or errno.EIO) from None
    if sent != len(packet):
        raise HandoffError(f"short send: {sent} of {len(packet)} bytes", errno.EIO)


def recv_packet(sock: socket.socket, max_fds: int = 0) -> tuple[bytes, list[int]]:
    """Receive one datagram and the fds attached to it (at most `max_fds`).

    Refuses (closing every received fd) a datagram that was truncated, that
    carried more fds than allowed or whose ancillary data was cut short, and
    end-of-file (the peer went away).
    """
    # Room for one fd more than allowed, so an extra fd is seen, not dropped.
    room = socket.CMSG_SPACE((MAX_FDS_PER_PACKET + 1) * array.array("i").itemsize)
    try:
        data, ancdata, flags, _ = sock.recvmsg(MAX_PACKET + 1, room, socket.MSG_CMSG_CLOEXEC)
    except TimeoutError:
        raise HandoffError("timed out waiting for peer", errno.ETIMEDOUT) from None
    except OSError as exc:
        reason = f"cannot receive from peer: {exc.strerror}"
        raise HandoffError(reason, exc.errno or errno.EIO) from None
    fds = _fds_from(ancdata)
    try:
        if flags & socket.MSG_CTRUNC:
            raise HandoffError("ancillary data truncated (too many fds)")
        if flags & socket.MSG_TRUNC or len(data) > MAX_PACKET:
            raise HandoffError(f"message larger than {MAX_PACKET} bytes")
        if not data and not fds:
            raise HandoffError("peer closed the connection", errno.ECONNRESET)
        if len(fds) > max_fds:
            raise HandoffError(f"message carries {len(fds)} fds, expected at most {max_fds}")
    except HandoffError:
        close_fds(fds)
        raise
    return data, fds


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % array.array("i").itemsize
            fds.extend(array.array("i", payload[:whole]))
    return fds


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd of `fds`, ignoring errors (a failure path is already under way)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def reply_error(sock: socket.socket, err: int, text: str) -> None:
    """Best effort: tell the peer why, never raise (we are already failing)."""
    with contextlib.suppress(HandoffError):
        send_packet(sock, encode_error(err, text))


# --- verification of received fds ---------------------------------------------


def verify_fuse_fd(fd: int) -> None:
    """The fd must be /dev/fuse (char 10:229) opened read-write."""
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode):
        raise HandoffError(
            f"fuse fd is a {_kind_name(st.st_mode)}, not the /dev/fuse character device",
            errno.EBADF,
        )
    if (os.major(st.st_rdev), os.minor(st.st_rdev)) != (FUSE_DEV_MAJOR, FUSE_DEV_MINOR):
        raise HandoffError(
            f"fuse fd is character device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)},"
            f" not /dev/fuse ({FUSE_DEV_MAJOR}:{FUSE_DEV_MINOR})",
            errno.EBADF,
        )
    if _access_mode(fd) != os.O_RDWR:
        raise HandoffError("fuse fd is not open read-write", errno.EBADF)


def verify_image_fd(fd: int, request: MountRequest) -> None:
    """The image fd must be what the helper declared, with exactly its access."""
    st = os.fstat(fd)
    if request.image_kind is ImageKind.REGULAR:
        if not stat.S_ISREG(st.st_mode):
            raise HandoffError(
                f"image fd is a {_kind_name(st.st_mode)}, declared a regular file", errno.EBADF
            )
        actual_size = st.st_size
    else:
        if not stat.S_ISBLK(st.st_mode):
            raise HandoffError(
                f"image fd is a {_kind_name(st.st_mode)}, declared a block device", errno.EBADF
            )
        actual_size = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
    want = os.O_RDONLY if request.mode is Mode.RO else os.O_RDWR
    got = _access_mode(fd)
    if got != want:
        raise HandoffError(
            f"image fd is open {_access_name(got)}, declared mode {request.mode.name.lower()}"
            f" needs {_access_name(want)}",
            errno.EBADF,
        )
    if actual_size != request.image_size:
        raise HandoffError(
            f"image is {actual_size} bytes, helper declared {request.image_size}", errno.EBADF
        )


def _access_mode(fd: int) -> int:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & getattr(os, "O_PATH", 0o10000000):
        return -1  # an O_PATH fd can neither read nor write
    return flags & os.O_ACCMODE


def _access_name(mode: int) -> str:
    return {os.O_RDONLY: "read-only", os.O_WRONLY: "write-only", os.O_RDWR: "read-write"}.get(
        mode, "O_PATH (no access)"
    )


def _kind_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return name
    return "unknown file type"


# --- both ends ---------------------------------------------------------------


def check_socket(sock: socket.socket) -> None:
    """Message boundaries are part of the protocol: only SOCK_SEQPACKET."""
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise HandoffError("hand-off socket must be AF_UNIX SOCK_SEQPACKET", errno.EPROTOTYPE)
