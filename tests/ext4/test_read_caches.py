"""The read facade's parsed-metadata caches stay coherent with read-write changes.

The facade keeps each inode's parsed xattr list and each directory reader's
parsed dx_root. These tests read (filling the caches), change the filesystem
through the read-write facade, and read again: the answers must be the new
ones, and the image must end as e2fsck and debugfs describe it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from helpers_debugfs import debugfs, xattr_value

from ext4box.blockdev import BlockDevice, MetadataCache
from ext4box.ext4.format.errors import NoData
from ext4box.ext4.format.inode import FL_INDEX, ROOT_INO
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.read.filesystem import Filesystem
from ext4box.ext4.write.writable import WritableFilesystem


def _image(path: Path, *mkfs_args: str) -> Path:
    with path.open("wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-I", "256", *mkfs_args, str(path)],
                   check=True, capture_output=True)
    return path


def _assert_clean(image: Path) -> None:
    result = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _open_rw(image: Path) -> tuple[BlockDevice, WritableFilesystem]:
    dev = BlockDevice.open(str(image), writable=True)
    fs = open_filesystem(dev, readonly=False)
    assert isinstance(fs, WritableFilesystem)
    return dev, fs


def _get(fs: Filesystem, ino: int, name: bytes) -> bytes | None:
    try:
        return fs.getxattr(ino, name)
    except NoData:
        return None


@pytest.mark.parametrize("mkfs_args", [(), ("-O", "^metadata_csum")])
def test_xattr_answers_follow_set_replace_remove(tmp_path: Path, mkfs_args: tuple[str, ...]
                                                 ) -> None:
    image = _image(tmp_path / "x.img", *mkfs_args)
    big = b"B" * 300  # does not fit in a 256-byte inode: goes to the xattr block
    dev, fs = _open_rw(image)
    try:
        ino = fs.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0, 0).ino
        assert _get(fs, ino, b"user.small") is None  # negative answer first
        fs.setxattr(ino, b"user.small", b"one")
        assert _get(fs, ino, b"user.small") == b"one"
        assert _get(fs, ino, b"user.small") == b"one"  # from the cache
        fs.setxattr(ino, b"user.big", big)
        assert _get(fs, ino, b"user.big") == big
        assert fs.inode(ino).file_acl != 0
        fs.setxattr(ino, b"user.big", big[:250] + b"C")  # in place in the block
        assert _get(fs, ino, b"user.big") == big[:250] + b"C"
        fs.setxattr(ino, b"user.small", b"two")
        assert sorted(fs.listxattr(ino)) == [b"user.big", b"user.small"]
        fs.removexattr(ino, b"user.big")
        assert _get(fs, ino, b"user.big") is None
        assert fs.listxattr(ino) == [b"user.small"]
        assert _get(fs, ino, b"user.small") == b"two"
    finally:
        fs.close()
        dev.close()
    _assert_clean(image)
    assert xattr_value(image, "/f", "user.small") == b"two"
    assert xattr_value(image, "/f", "user.big") is None


def test_htree_lookups_follow_index_growth(tmp_path: Path) -> None:
    image = _image(tmp_path / "h.img")
    names = [f"a-fairly-long-file-name-{i:04d}".encode() for i in range(400)]
    dev, fs = _open_rw(image)
    try:
        dir_ino = fs.mkdir(ROOT_INO, b"d", stat.S_IFDIR | 0o755, 0, 0).ino
        made: dict[bytes, int] = {}
        for start in range(0, len(names), 40):
            for name in names[start : start + 40]:
                made[name] = fs.create(dir_ino, name, stat.S_IFREG | 0o644, 0, 0).ino
            # Every lookup after a batch of creates goes through the reader (and
            # its cached dx_root) of the directory as it is now.
            for name, ino in made.items():
                assert fs.lookup(dir_ino, name) == ino
            with pytest.raises(Exception, match="not in directory"):
                fs.lookup(dir_ino, b"a-fairly-long-file-name-9999")
        assert fs.inode(dir_ino).flags & FL_INDEX
    finally:
        fs.close()
        dev.close()
    _assert_clean(image)
    listing = debugfs(image, "ls -l /d")
    assert all(name.decode() in listing for name in names)


class _PausingDevice(BlockDevice):
    """Reads block `block` and then waits for `resume` before returning it, so a
    test can change the device and invalidate the cache while a read is in flight."""

    def __init__(self, fd: int, block_size: int, block: int) -> None:
        super().__init__(fd, writable=True)
        self.offset = block * block_size
        self.read_done = threading.Event()
        self.resume = threading.Event()

    def pread(self, offset: int, length: int) -> bytes:
        data = super().pread(offset, length)
        if offset == self.offset and not self.resume.is_set():
            self.read_done.set()
            assert self.resume.wait(10)
        return data


def test_metadata_cache_never_keeps_a_read_that_raced_an_invalidation(tmp_path: Path) -> None:
    image = tmp_path / "race.img"
    image.write_bytes(b"A" * 4096 * 4)
    fd = os.open(image, os.O_RDWR)
    try:
        dev = _PausingDevice(fd, 4096, 2)
        cache = MetadataCache(dev, 4096)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(cache.read(2)))
        reader.start()
        assert dev.read_done.wait(10)
        # The writer's side: new bytes on the device, then the invalidation.
        os.pwrite(fd, b"B" * 4096, 2 * 4096)
        cache.invalidate(2)
        dev.resume.set()
        reader.join(10)
        assert got == [b"A" * 4096]  # the racing reader saw the older copy...
        assert cache.read(2) == b"B" * 4096  # ...but did not leave it in the cache
    finally:
        os.close(fd)
