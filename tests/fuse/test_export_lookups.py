"""The "." and ".." lookups of FUSE export, as a stand-in kernel sees the replies.

What a real mount cannot show: the kernel forgives a root reply whose
generation is not 0 (it warns once and uses 0), so the mount tests pass
either way. Here the root's i_generation is set to a non-zero value with
debugfs, and the replies are read byte for byte from a SOCK_SEQPACKET
socketpair standing in for /dev/fuse: ".." of a top-level directory and "."
of the root name node 1 with generation 0; "." of any other inode its own
inode number and the i_generation debugfs reads; ".." of a subdirectory its
parent; node ids no handle can hold are ESTALE.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from ext4box.blockdev import BlockDevice
from ext4box.ext4.opening import open_filesystem
from ext4box.fuse import negotiate
from ext4box.fuse import protocol as p
from ext4box.fuse.operations import Operations
from ext4box.fuse.session import Session
from ext4box.iomap.engine import IOMapEngine

ROOT_GENERATION = 777_777


def _debugfs(image: Path, command: str, *, write: bool = False) -> str:
    argv = ["debugfs", *(["-w"] if write else []), "-R", command, str(image)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _generation(image: Path, ino: int) -> int:
    found = re.search(r"Generation: (\d+)", _debugfs(image, f"stat <{ino}>"))
    assert found
    return int(found.group(1))


def _image(tmp_path: Path) -> Path:
    if shutil.which("debugfs") is None or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 and debugfs")
    tree = tmp_path / "tree"
    (tree / "dir" / "sub").mkdir(parents=True)
    (tree / "dir" / "file").write_bytes(b"x")
    image = tmp_path / "image.ext4"
    # No metadata_csum: its directory block checksums are seeded with the
    # directory's generation, which debugfs would leave stale.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum", "-d", str(tree), str(image),
                    "8M"], check=True, capture_output=True)  # fmt: skip
    _debugfs(image, f"sif <2> generation {ROOT_GENERATION}", write=True)
    assert _generation(image, 2) == ROOT_GENERATION
    return image


def _request(opcode: int, unique: int, nodeid: int, body: bytes) -> bytes:
    header = p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, unique, nodeid,
                              0, 0, os.getpid(), 0)  # fmt: skip
    return header + body


def _lookup(unique: int, nodeid: int, name: bytes) -> bytes:
    return _request(p.Opcode.LOOKUP, unique, nodeid, name + b"\0")


def _serve(image: Path, requests: list[bytes]) -> dict[int, tuple[int, bytes]]:
    """Run a session over `requests` (INIT first); unique -> (error, payload)."""
    kernel, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    offered = negotiate.wanted_flags() | p.InitFlag.INIT_EXT
    init = p.INIT_IN.pack(7, 45, 128 * 1024, offered & 0xFFFFFFFF, offered >> 32)
    for message in [_request(p.Opcode.INIT, 1, 0, init), *requests]:
        kernel.send(message)
    kernel.shutdown(socket.SHUT_WR)
    dev = BlockDevice.open(str(image), writable=False)
    try:
        fs = open_filesystem(dev, readonly=True)
        Session(Operations(fs, IOMapEngine(fs, fs.dev)), server.fileno()).run()
    finally:
        dev.close()
        server.close()
    replies = {}
    while message := kernel.recv(1 << 20):
        _length, error, unique = p.OUT_HEADER.unpack_from(message)
        replies[unique] = (error, message[p.OUT_HEADER.size :])
    kernel.close()
    return replies


def _entry(reply: tuple[int, bytes]) -> tuple[int, int, int]:
    """(node id, generation, attr.ino) of an entry reply."""
    error, payload = reply
    assert error == 0, errno.errorcode.get(-error, error)
    entry = dict(zip(p.ENTRY_OUT.value_names(), p.ENTRY_OUT.unpack_from(payload), strict=True))
    return entry["nodeid"], entry["generation"], entry["attr.ino"]


def test_dot_and_dotdot_replies_name_stable_nodes(tmp_path: Path) -> None:
    image = _image(tmp_path)
    # First the path walk, as the kernel would have done it, to learn the inode numbers.
    first = _serve(image, [_lookup(2, 1, b"dir")])
    dir_ino = _entry(first[2])[0]
    sub_ino = _entry(_serve(image, [_lookup(2, dir_ino, b"sub")])[2])[0]

    replies = _serve(image, [
        _lookup(2, dir_ino, b".."),
        _lookup(3, 1, b"."),
        _lookup(4, dir_ino, b"."),
        _lookup(5, sub_ino, b"."),
        _lookup(6, sub_ino, b".."),
    ])  # fmt: skip
    assert _entry(replies[2]) == (p.ROOT_ID, 0, 2)
    assert _entry(replies[3]) == (p.ROOT_ID, 0, 2)
    assert _entry(replies[4]) == (dir_ino, _generation(image, dir_ino), dir_ino)
    assert _entry(replies[5]) == (sub_ino, _generation(image, sub_ino), sub_ino)
    assert _entry(replies[6]) == (dir_ino, _generation(image, dir_ino), dir_ino)


def test_node_ids_no_handle_can_hold_are_stale(tmp_path: Path) -> None:
    image = _image(tmp_path)
    dumped = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    found = re.search(r"Inode count:\s+(\d+)", dumped)
    assert found
    # The root under a second node id, far past the table, just past it, the
    # journal, a free slot never written.
    bad = [2, 1 << 40, int(found.group(1)) + 1, 8, 111]
    replies = _serve(image, [_lookup(2 + i, node, b".") for i, node in enumerate(bad)])
    assert [replies[2 + i][0] for i in range(len(bad))] == [-errno.ESTALE] * len(bad)
