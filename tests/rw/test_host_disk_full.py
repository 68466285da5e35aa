"""The disk under the image fills up while ext4box writes to it.

The image is a sparse file on a small tmpfs that is then nearly filled: a
write whose blocks land in the image file's holes fails in the host. The
writer must get ENOSPC (not a dead server, not EIO), everything fsynced
before stays intact, no block of a deleted file shows up in the file whose
write failed, and once the host has room again the unmount completes and
leaves an e2fsck-clean image the kernel reads back.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from rw_support import assert_fsck_clean, kernel_view, rw_mount, skip_unless_possible

from support.serve import ext4box_argv, served

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

OLD_BYTE = 0xEE  # the content of a deleted file: must never reappear
CHUNK = 256 * 1024


def _fill(path: Path, leave: int) -> None:
    """Grow `path` until its filesystem has about `leave` bytes free."""
    with path.open("wb") as filler:
        while True:
            st = os.statvfs(path)
            room = st.f_bavail * st.f_frsize - leave
            if room <= 0:
                break
            filler.write(b"\xff" * min(room, 1 << 20))
            filler.flush()


def _write_until_error(path: Path, total: int) -> tuple[int, int | None]:
    """Write a pattern in CHUNK pieces, then fsync; (bytes written, errno or None)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    written = 0
    try:
        while written < total:
            written += os.write(fd, bytes([0x5A]) * CHUNK)
        os.fsync(fd)
    except OSError as err:
        return written, err.errno
    finally:
        os.close(fd)
    return written, None


@contextmanager
def small_host(tmp_path: Path, *mkfs_args: str) -> Iterator[tuple[Path, Path]]:
    """(host directory, image): a 40 MiB tmpfs holding a sparse 96 MiB ext4 image,
    larger than the host filesystem; unmounted afterwards."""
    host = tmp_path / "host"
    host.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(host)], check=True)
    try:
        image = host / "disk.img"
        with image.open("wb") as f:
            f.truncate(96 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", *mkfs_args, str(image)],
                       check=True, capture_output=True)
        yield host, image
    finally:
        subprocess.run(["umount", str(host)], check=False)


def test_full_host_disk_is_enospc_and_loses_nothing(tmp_path: Path) -> None:
    skip_unless_possible()
    with small_host(tmp_path) as (host, image):
        mnt = tmp_path / "mnt"
        with rw_mount(image, mnt) as served:
            root = served.mountpoint
            (root / "old").write_bytes(bytes([OLD_BYTE]) * (4 << 20))
            keep = bytes(range(256)) * 1024
            fd = os.open(root / "keep", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, keep)
            os.fsync(fd)
            os.close(fd)
            os.unlink(root / "old")
            dfd = os.open(root, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)

            filler = host / "filler"
            _fill(filler, leave=2 << 20)
            written, error = _write_until_error(root / "big", 64 << 20)
            assert error == errno.ENOSPC, (written, error)
            # The server is still there and everything fsynced before is intact.
            assert (root / "keep").read_bytes() == keep
            big = (root / "big").read_bytes()
            assert bytes([OLD_BYTE]) not in big
            filler.unlink()  # the host has room again: the unmount can commit
        assert_fsck_clean(image)
        with kernel_view(image, tmp_path / "kmnt") as kroot:
            assert (kroot / "keep").read_bytes() == keep
            big = (kroot / "big").read_bytes()
            assert bytes([OLD_BYTE]) not in big
            assert set(big) <= {0x5A, 0}


def test_failed_journal_write_aborts_and_keeps_what_committed(tmp_path: Path) -> None:
    """The log itself cannot be written (its blocks are holes of a sparse image on
    a full host disk): the commit fails, and from then on nothing changes (EROFS),
    as the kernel aborts its journal. What committed before survives replay."""
    skip_unless_possible()
    # lazy_journal_init: the journal is not written by mkfs, so it stays holes.
    with small_host(tmp_path, "-E", "lazy_journal_init=1") as (host, image):
        keep = bytes(range(256)) * 64
        mnt = tmp_path / "mnt"
        with served(image, mnt, ext4box_argv(image, mnt, "rw"), expect_exit_zero=False) as handle:
            root = handle.mountpoint
            fd = os.open(root / "keep", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, keep)
            os.fsync(fd)
            os.close(fd)
            filler = host / "filler"
            _fill(filler, leave=0)
            failed = None
            for i in range(200):
                try:
                    (root / f"new{i}").touch()
                    dfd = os.open(root, os.O_RDONLY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
                except OSError as err:
                    failed = err.errno
                    break
            assert failed in (errno.ENOSPC, errno.EIO), failed
            with pytest.raises(OSError) as after:
                (root / "later").touch()
            assert after.value.errno == errno.EROFS
            assert (root / "keep").read_bytes() == keep
            filler.unlink()
        # As jbd2, the abort is recorded in the journal superblock (-errno)...
        header = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True,
                                text=True, check=True).stdout
        assert re.search(rf"Journal errno:\s+-{failed}\b", header), header
        replay = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(image)],
                                capture_output=True, text=True, check=False)
        assert replay.returncode in (0, 1), replay.stdout + replay.stderr
        # ...which recovery turns into the filesystem's error state (full check due).
        state = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True,
                               text=True, check=True).stdout
        assert re.search(r"Filesystem state:\s+clean with errors", state), state
        assert_fsck_clean(image)
        with kernel_view(image, tmp_path / "kmnt") as kroot:
            assert (kroot / "keep").read_bytes() == keep
            assert not (kroot / "later").exists()
