"""10,000 unlinked-open files through a real mount, closed, then unmounted (issue 18 item 2).

Each file is created and kept open, then unlinked (it goes on the orphan
list), then every descriptor is closed in creation order: the first closed is
the list's tail, the case where finding its predecessor by walking the list
from the superblock costs the whole list each time (about 11 minutes in all
before the fix). The test waits until statfs shows every inode free again
(statfs is answered after the RELEASE requests queued before it; pytest's
timeout catches a server that takes minutes), then unmounts: the server must
exit 0, the image be e2fsck-clean with its orphan list empty. No time is
asserted: tests/ext4/test_orphan_chain.py counts the work of each release.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import pytest
from rw_support import assert_fsck_clean, make_image, rw_mount, skip_unless_possible

from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

FILES = 10_000


def _superblock(image: Path) -> Superblock:
    with image.open("rb") as f:
        f.seek(SUPERBLOCK_OFFSET)
        return Superblock.parse(f.read(SUPERBLOCK_SIZE))


def _need_descriptors(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= count:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(count, soft), max(count, hard)))
    except (ValueError, OSError) as exc:
        pytest.skip(f"cannot open {count} files at once (RLIMIT_NOFILE {soft}/{hard}): {exc}")


def test_ten_thousand_orphans_closed_then_unmounted(tmp_path: Path) -> None:
    skip_unless_possible()
    _need_descriptors(FILES + 200)
    image = make_image(tmp_path / "orphans.img", 64, "-N", str(FILES + 2000))
    free_before = _superblock(image).free_inodes_count
    with rw_mount(image, tmp_path / "mnt") as handle:
        files_free = os.statvfs(handle.mountpoint).f_ffree
        root = handle.mountpoint / "d"
        root.mkdir()
        fds = []
        try:
            for i in range(FILES):
                fd = os.open(root / f"f{i}", os.O_RDWR | os.O_CREAT, 0o644)
                fds.append(fd)
                if i % 7 == 0:
                    os.write(fd, b"x" * (i % 5000 + 1))  # some have blocks to free
            for i in range(FILES):
                os.unlink(root / f"f{i}")
            assert os.listdir(root) == []
            # Unlinked but open: still readable.
            assert os.pread(fds[7], 3, 0) == b"xxx"
        finally:
            for fd in fds:  # creation order: the tail of the orphan list first
                os.close(fd)
        root.rmdir()
        # The releases reach the server after the closes return; wait for them.
        while os.statvfs(handle.mountpoint).f_ffree != files_free:
            time.sleep(0.05)
    # The serve fixture has unmounted and seen the server exit 0.
    assert_fsck_clean(image)
    sb = _superblock(image)
    assert sb.free_inodes_count == free_before
    assert int(sb.fields["last_orphan"]) == 0
