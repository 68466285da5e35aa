"""Failure paths: corrupt inodes, bad command lines, signals."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from fuse_helpers import EXT4BOX, env, is_mountpoint, mkfs, run_ext4box, served, start_server

pytestmark = pytest.mark.usefixtures("fuse_env")


def _inode_location(image: Path, path: str) -> tuple[int, int]:
    """(inode number, byte offset of the inode in the image), as debugfs reports them."""
    out = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=True
    ).stdout
    ino = int(re.search(r"Inode: (\d+)", out).group(1))
    imap = subprocess.run(
        ["debugfs", "-R", f"imap <{ino}>", str(image)], capture_output=True, text=True, check=True
    ).stdout
    block, offset = re.search(r"located at block (\d+), offset 0x([0-9a-f]+)", imap).groups()
    block_size = int(
        re.search(
            r"Block size:\s+(\d+)",
            subprocess.run(
                ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True
            ).stdout,
        ).group(1)
    )
    return ino, int(block) * block_size + int(offset, 16)


def test_corrupt_inode_is_euclean_and_server_keeps_serving(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "victim").write_bytes(b"doomed\n")
    (tree / "survivor").write_bytes(b"alive\n")
    image = mkfs(tree, tmp_path / "bad.ext4", "8M", "-O", "metadata_csum")
    ino, offset = _inode_location(image, "/victim")
    with open(image, "r+b") as f:  # flip a bit of i_size: the inode checksum fails
        f.seek(offset + 4)
        byte = f.read(1)
        f.seek(offset + 4)
        f.write(bytes([byte[0] ^ 0x40]))
    with served(image, tmp_path / "mnt") as server:
        mnt = server.mountpoint
        for _ in range(2):
            with pytest.raises(OSError) as caught:
                os.stat(mnt / "victim")
            assert caught.value.errno == errno.EUCLEAN
        assert (mnt / "survivor").read_bytes() == b"alive\n"
        assert sorted(os.listdir(mnt)) == ["lost+found", "survivor", "victim"]
        assert (mnt / "survivor").read_bytes() == b"alive\n"
    records = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    corrupt = [r for r in records if r.get("event") == "corrupt"]
    assert corrupt, server.stderr()
    assert all({"what", "where", "why", "op"} <= r.keys() for r in corrupt)
    assert any(f"inode {ino}" in r["where"] for r in corrupt)


def test_sigterm_unmounts_and_exits_zero(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    image = mkfs(tree, tmp_path / "img.ext4", "8M")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        server = start_server(image, tmp_path / "mnt")
        assert (server.mountpoint / "f").read_bytes() == b"x"
        server.proc.send_signal(signum)
        assert server.proc.wait(timeout=30) == 0, server.stderr()
        assert not is_mountpoint(server.mountpoint)


def test_dev_fd_mountpoint(tmp_path: Path) -> None:
    """The hand-off form: mount(2) done by someone else, server gets /dev/fd/N."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"via fd")
    image = mkfs(tree, tmp_path / "img.ext4", "8M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fuse_fd = os.open("/dev/fuse", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    data = f"fd={fuse_fd},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other"
    flags = 1 | 2 | 4  # MS_RDONLY | MS_NOSUID | MS_NODEV
    if (
        libc.mount(str(image).encode(), str(mnt).encode(), b"fuse.ext4box", flags, data.encode())
        != 0
    ):
        os.close(fuse_fd)
        pytest.skip(f"mount(2) failed: {os.strerror(ctypes.get_errno())}")
    try:
        proc = subprocess.Popen(
            [*EXT4BOX, "serve", "-f", str(image), f"/dev/fd/{fuse_fd}"],
            pass_fds=(fuse_fd,),
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        os.close(fuse_fd)
        assert (mnt / "f").read_bytes() == b"via fd"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr


def _one_error_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("ext4box")]
    assert len(lines) == 1, result.stderr
    assert text in lines[0], lines[0]


def test_cli_errors(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    image = mkfs(tree, tmp_path / "ok.ext4", "8M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(os.urandom(64 * 1024))
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    unreadable_dir = tmp_path
    cases = [
        (("serve", str(tmp_path / "missing.img"), str(mnt)), 1, "No such file"),
        (("serve", str(garbage), str(mnt)), 1, "not an ext2/3/4 filesystem"),
        (("serve", str(unreadable_dir), str(mnt)), 1, "cannot"),
        (("serve", str(image), str(tmp_path / "nomnt")), 1, "does not exist"),
        (("serve", str(image), str(a_file)), 1, "not a directory"),
        (("serve", str(image), str(mnt), "-o", "ro,bogus"), 1, "unknown mount option 'bogus'"),
        (("serve", str(image), str(mnt), "-o", "rw,dev"), 1, "nodev"),
        (("serve", str(image), str(mnt), "-o", "suid"), 1, "nosuid"),
        (("cat", str(image), "/nope"), 1, "error"),
        (("cat", str(image), "/"), 1, "is a directory"),
        (("ls", str(garbage)), 1, "not an ext2/3/4 filesystem"),
    ]
    for args, code, text in cases:
        _one_error_line(run_ext4box(*args), code, text)
    assert not is_mountpoint(mnt)
    usage = run_ext4box("serve", str(image))
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert run_ext4box().returncode == 2


def test_corrupt_superblock_refused(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    image = mkfs(tree, tmp_path / "img.ext4", "8M", "-O", "metadata_csum")
    with open(image, "r+b") as f:  # s_inodes_count: breaks the superblock checksum
        f.seek(1024)
        f.write(b"\xff\xff")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = run_ext4box("serve", str(image), str(mnt))
    _one_error_line(result, 1, "corrupt")
    assert not is_mountpoint(mnt)
