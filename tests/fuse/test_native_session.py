"""The native FUSE session: INIT negotiation, unknown opcodes, the requests it saves.

Two kinds of test. On a real mount (`ext4box serve --debug`, one log line per
request): what INIT agreed, as the server logged it and as the kernel shows
it in /sys/fs/fuse/connections; which requests the kernel stops sending
because of it (FLUSH, OPENDIR, READDIRPLUS, GETXATTR(security.capability)
before every write); an ioctl the server does not handle gets ENOTTY (the
kernel's translation of ENOSYS) and one log line however often it comes.
Against a stand-in kernel (a SOCK_SEQPACKET socketpair keeps message
boundaries as /dev/fuse does): opcodes no kernel sends yet get ENOSYS, a
short body EINVAL, and the session ends when its peer goes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4.opening import open_filesystem
from ext4box.fuse import negotiate
from ext4box.fuse import protocol as p
from ext4box.fuse.operations import Operations
from ext4box.fuse.session import Session
from ext4box.iomap.engine import IOMapEngine
from support.serve import ext4box_argv, fuse_backend, served, why_no_fuse

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_GETVERSION = 0x80087601  # an ioctl ext4box does not serve


def _skip_unless_native_mounts() -> None:
    reason = why_no_fuse()
    if reason is None and os.geteuid() != 0:
        reason = "needs root (sysfs FUSE connections)"
    if reason is None and fuse_backend() != "native":
        reason = f"tests the native backend (EXT4BOX_TEST_BACKEND={fuse_backend()})"
    if reason:
        pytest.skip(reason)


def _image(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    for i in range(20):
        (tree / "dir" / f"f{i}").write_bytes(b"x" * i)
    image = tmp_path / "image.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "8M"], check=True,
                   capture_output=True)
    return image


def _events(log: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def _requests(events: list[dict]) -> list[str]:
    return [e["opcode"] for e in events if e.get("event") == "request"]


def test_init_agreement_and_the_requests_it_saves(tmp_path: Path) -> None:
    _skip_unless_native_mounts()
    image = _image(tmp_path)
    mnt = tmp_path / "mnt"
    with served(image, mnt, [*ext4box_argv(image, mnt, "rw"), "--debug"]) as handle:
        # The kernel's view of our INIT reply.
        kernel_view = _connection_settings(tmp_path / "fusectl", os.minor(os.stat(mnt).st_dev))
        first = len(_requests(_events(handle.stderr_text())))
        listing = sorted(os.listdir(mnt / "dir"))
        assert listing == sorted(f"f{i}" for i in range(20))
        os.listdir(mnt / "dir")
        with open(mnt / "new", "wb") as f:
            f.write(b"data")
        with open(mnt / "new", "ab", buffering=0) as f:
            for _ in range(5):
                f.write(b"more")
        events = _events(handle.stderr_text())
    assert kernel_view == {"max_background": negotiate.MAX_BACKGROUND,
                           "congestion_threshold": negotiate.CONGESTION_THRESHOLD}
    (session,) = [e for e in events if e.get("event") == "session"]
    agreed = set(session["flags"].split(","))
    wanted = {flag.name for flag, _ in negotiate.WANTED}
    # This kernel offers every flag we want; none we declined was agreed.
    assert agreed == wanted, (agreed ^ wanted, session)
    assert not agreed & {flag.name for flag, _ in negotiate.DECLINED}
    assert session["max_write"] == negotiate.MAX_WRITE
    seen = _requests(events)[first:]
    # Names-only listings, no directory handles, no FLUSH at close (FOPEN_NOFLUSH).
    # HANDLE_KILLPRIV_V2 brings SB_NOSEC: once the kernel has seen that a file
    # has no security.capability, it stops asking before each write (it asks
    # again after an attribute refresh, here the second open's GETATTR).
    assert "READDIR" in seen and "READDIRPLUS" not in seen
    assert seen.count("OPENDIR") <= 1 and "RELEASEDIR" not in seen
    assert "FLUSH" not in seen
    assert seen.count("WRITE") == 6 and seen.count("GETXATTR") <= 2, " ".join(seen)


def _connection_settings(where: Path, minor: int) -> dict[str, int]:
    """The kernel's record of a FUSE connection (fusectl, mounted here for the read)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "fusectl", "fusectl", str(where)], check=True,
                   capture_output=True)
    try:
        return {name: int((where / str(minor) / name).read_text())
                for name in ("max_background", "congestion_threshold")}
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_ioctls_answered_and_unknown_ones_enotty(tmp_path: Path) -> None:
    """FUSE_IOCTL is routed: GETFLAGS answers the inode's flags (read-only mount
    too); an ioctl ext4box does not serve is ENOTTY, as on ext4, and the
    session keeps serving."""
    _skip_unless_native_mounts()
    image = _image(tmp_path)
    mnt = tmp_path / "mnt"
    with served(image, mnt, ext4box_argv(image, mnt, "ro")) as handle:
        fd = os.open(mnt / "dir" / "f3", os.O_RDONLY)
        try:
            flags = int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)[:4], "little")
            assert flags & 0x80000  # EXTENTS, as lsattr shows 'e'
            for _ in range(3):
                with pytest.raises(OSError) as failure:
                    fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 8)
                assert failure.value.errno == errno.ENOTTY
            assert os.read(fd, 10) == b"xxx"  # still serving
        finally:
            os.close(fd)
        events = _events(handle.stderr_text())
    assert not [e for e in events if e.get("event") == "unsupported request"]


# -- a stand-in kernel -----------------------------------------------------------


def _request(opcode: int, unique: int, nodeid: int, body: bytes) -> bytes:
    header = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, unique, nodeid,
                              0, 0, os.getpid(), 0)
    return header + body


def _init_body() -> bytes:
    offered = negotiate.wanted_flags() | p.InitFlag.INIT_EXT
    return p.INIT_IN.pack(7, 45, 128 * 1024, offered & 0xFFFFFFFF, offered >> 32)


def test_stand_in_kernel_unknown_opcodes_and_short_bodies(tmp_path: Path) -> None:
    image = _image(tmp_path)
    kernel, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    requests = [
        _request(p.Opcode.INIT, 1, 0, _init_body()),
        _request(9999, 2, 1, b""),
        _request(9999, 3, 1, b""),
        _request(p.Opcode.SETUPMAPPING, 4, 1, b"\0" * 40),
        _request(p.Opcode.GETATTR, 5, 1, p.GETATTR_IN.pack(0, 0)),
        _request(p.Opcode.LOOKUP, 6, 1, b"n" * 256 + b"\0"),
        _request(p.Opcode.READ, 7, 1, b"\0" * 8),  # shorter than fuse_read_in
        _request(p.Opcode.LOOKUP, 8, 1, b"dir\0"),
        _request(p.Opcode.FORGET, 9, 1, p.FORGET_IN.pack(1)),
    ]
    for message in requests:
        kernel.send(message)
    kernel.shutdown(socket.SHUT_WR)
    dev = BlockDevice.open(str(image), writable=False)
    try:
        fs = open_filesystem(dev, readonly=True)
        session = Session(Operations(fs, IOMapEngine(fs, fs.dev)), server.fileno())
        with structlog.testing.capture_logs() as logs:
            session.run()
    finally:
        dev.close()
        server.close()
    replies = {}
    while True:
        message = kernel.recv(1 << 20)
        if not message:
            break
        length, error, unique = p.OUT_HEADER.unpack_from(message)
        assert length == len(message)
        replies[unique] = (error, message[p.OUT_HEADER.size:])
    kernel.close()
    assert sorted(replies) == [1, 2, 3, 4, 5, 6, 7, 8]  # FORGET has no reply
    init = p.INIT_OUT.unpack_from(replies[1][1])
    assert init[:2] == (7, p.KERNEL_MINOR_VERSION)
    assert {unique: replies[unique][0] for unique in (2, 3, 4, 6, 7)} == {
        2: -errno.ENOSYS, 3: -errno.ENOSYS, 4: -errno.ENOSYS,
        6: -errno.ENAMETOOLONG, 7: -errno.EINVAL}
    assert replies[5][0] == 0
    attr_out = dict(zip(p.ATTR_OUT.value_names(), p.ATTR_OUT.unpack_from(replies[5][1]),
                        strict=True))
    assert attr_out["attr.ino"] == 2 and attr_out["attr.mode"] >> 12 == 0o04
    entry = dict(zip(p.ENTRY_OUT.value_names(), p.ENTRY_OUT.unpack_from(replies[8][1]),
                     strict=True))
    assert entry["nodeid"] == entry["attr.ino"] > 2 and entry["attr.mode"] >> 12 == 0o04
    # One line per unknown opcode, not per request.
    unsupported = [e for e in logs if e["event"] == "unsupported request"]
    assert sorted(e["opcode"] for e in unsupported) == ["9999", "SETUPMAPPING"]
