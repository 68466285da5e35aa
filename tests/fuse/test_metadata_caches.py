"""The server's metadata caches never answer with something older than the image.

ext4box keeps parsed inodes, directory readers and extent mappers across
requests, and keeps a reader or mapper across an inode store when the store
cannot have changed what it reads. Here a directory is listed (readdirplus:
every entry's attributes come from the server's caches), then changed in many
ways through the mount; the kernel then forgets its dentries and inodes
(drop_caches 2), so the listing and lookups that follow must be answered by
the server again. What they show must be what the kernel's ext4 shows of the
image after the unmount, attribute for attribute.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support.fileops import truncate_by_fd
from support.kernel import kernel_mount, why_no_kernel_mounts
from support.serve import ext4box_argv, served, why_no_fuse

# atime is left out: reading through the two mounts sets it differently.
_FIELDS = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
           "st_mtime_ns", "st_ctime_ns", "st_rdev")


def _skip_reason() -> str | None:
    reason = why_no_kernel_mounts() or why_no_fuse()
    if reason is None and shutil.which("e2fsck") is None:
        reason = "no e2fsck"
    return reason


def _forget_dentries_and_inodes() -> None:
    # Slab objects only (dentries, inodes and their pages): never sync(2).
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def _view(directory: Path) -> dict[str, tuple]:
    """name -> attributes (from readdirplus, within the attribute timeout), the
    same by lookup, content digest and xattrs."""
    listed = {entry.name: entry.stat(follow_symlinks=False) for entry in os.scandir(directory)}
    view: dict[str, tuple] = {}
    for name, by_listing in sorted(listed.items()):
        path = directory / name
        by_lookup = os.lstat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        xattrs = tuple(sorted((key, os.getxattr(path, key, follow_symlinks=False))
                              for key in os.listxattr(path, follow_symlinks=False)))
        view[name] = (
            tuple(getattr(by_listing, field) for field in _FIELDS),
            tuple(getattr(by_lookup, field) for field in _FIELDS),
            digest,
            xattrs,
        )
    return view


def _change(directory: Path) -> None:
    """Many kinds of change to entries the server has just listed."""
    os.chmod(directory / "f001", 0o600)
    with open(directory / "f002", "ab") as handle:
        handle.write(b"appended" * 3000)  # new blocks: a new extent
    with open(directory / "f003", "r+b") as handle:
        handle.write(b"OVER")  # same blocks, new mtime
    os.link(directory / "f004", directory / "link004")
    os.chown(directory / "f005", 1234, 5678)
    os.utime(directory / "f006", ns=(1_000_000_000, 2_000_000_123))
    os.setxattr(directory / "f007", "user.cache", b"fresh")
    os.rename(directory / "f008", directory / "g008")
    os.unlink(directory / "f009")
    truncate_by_fd(directory / "f010", 0)
    (directory / "sub").mkdir()
    (directory / "sub" / "inner").write_bytes(b"inner")
    os.symlink("f011", directory / "sym011")
    # Names asked for before they exist, then created: the negative lookup
    # before each create must not leave a stale directory view behind.
    for index in range(40):
        path = directory / f"late{index:03d}"
        assert not path.exists()
        path.write_bytes(b"late")
        assert path.exists()


def test_cached_attributes_follow_every_change(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    image = tmp_path / "caches.img"
    with image.open("wb") as handle:
        handle.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", str(image)],
                   check=True, capture_output=True)
    mountpoint = tmp_path / "mnt"
    with served(image, mountpoint, ext4box_argv(image, mountpoint, "rw")):
        directory = mountpoint / "d"
        directory.mkdir()
        for index in range(60):
            path = directory / f"f{index:03d}"
            assert not path.exists()
            path.write_bytes(bytes([index]) * (index * 100))
        before = _view(directory)  # the server caches every entry's inode here
        _change(directory)
        _forget_dentries_and_inodes()
        served_view = _view(directory)
        served_sub = _view(directory / "sub")
        with pytest.raises(OSError) as gone:
            os.lstat(directory / "f009")
        assert gone.value.errno == errno.ENOENT
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with kernel_mount(image, tmp_path / "kmnt", readonly=True) as root:
        kernel_view = _view(root / "d")
        kernel_sub = _view(root / "d" / "sub")
    assert served_view != before  # the changes happened
    assert sorted(served_view) == sorted(kernel_view)
    differences = {name: (served_view[name], kernel_view[name])
                   for name in kernel_view if served_view[name] != kernel_view[name]}
    assert not differences
    assert served_sub == kernel_sub
