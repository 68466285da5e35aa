"""`-o writeback_cache`: small writes through the kernel's page cache, kernel vs ext4box.

With FUSE_WRITEBACK_CACHE the kernel keeps buffered writes in its page cache
and sends them at writeback, fsync and close; it owns size, mtime and ctime of
regular files, places O_APPEND writes itself, may READ through a write-only
open to fill a partial page, and sends a write that must clear set-user-ID
through to the server (HANDLE_KILLPRIV_V2). Each scenario runs on the
kernel's ext4 and on ext4box with the option, on copies of one image: the
observations must match, the trees must match, both images must pass
`e2fsck -fn`, and the kernel's own mount of the ext4box image must show what
ext4box showed (times included: the times the kernel flushed reached the
disk). Native transport only: pyfuse3 refuses the option.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from rw_support import (
    assert_fsck_clean,
    assert_same_on_both,
    attempt,
    child_outcome,
    make_image,
    open_path_for_others,
    run_as,
    rw_mount,
    skip_unless_possible,
    syncfs,
)

from support.kernel import kernel_mount
from support.serve import ext4box_argv, fuse_backend

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

OPTIONS = ("writeback_cache",)
RECORD = b"abc\n"
APPENDS = 20_000
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_APPEND_FL = 0x20
# Longer than the kernel's coarse clock tick, so a time that moves is seen to.
TICK_S = 0.03


@pytest.fixture(autouse=True)
def _native_only(request: pytest.FixtureRequest) -> None:
    skip_unless_possible()
    if fuse_backend() != "native" and request.node.name != "test_pyfuse3_refuses_the_option":
        pytest.skip("writeback_cache is a native-transport option (pyfuse3 refuses it)")


def _image(tmp_path: Path, files: dict[str, bytes] | None = None, block_size: int = 4096,
           inode_size: int = 256) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name, data in (files or {}).items():
        (tree / name).write_bytes(data)
    return make_image(tmp_path / "base.img", 64, "-b", str(block_size), "-I", str(inode_size),
                      root=tree)


def _data_map(path: Path) -> list[tuple[int, int]]:
    """The file's data ranges by SEEK_DATA/SEEK_HOLE."""
    ranges: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, at = os.fstat(fd).st_size, 0
        while at < size:
            try:
                start = os.lseek(fd, at, os.SEEK_DATA)
            except OSError:
                break
            at = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, at))
    finally:
        os.close(fd)
    return ranges


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _times(path: Path | int) -> tuple[int, int]:
    st = os.fstat(path) if isinstance(path, int) else os.stat(path)
    return st.st_mtime_ns, st.st_ctime_ns


def _moved(before: tuple[int, int], after: tuple[int, int]) -> tuple[bool, bool, bool]:
    """(mtime moved, ctime moved, mtime == ctime): the rule both systems must follow."""
    return after[0] > before[0], after[1] > before[1], after[0] == after[1]


def test_small_appends_match_the_kernel(tmp_path: Path) -> None:
    def scenario(root: Path) -> list[object]:
        path = root / "log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for _ in range(APPENDS):
                os.write(fd, RECORD)
            sizes = [os.fstat(fd).st_size, os.lseek(fd, 0, os.SEEK_CUR)]
            os.fsync(fd)
            sizes.append(os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return [sizes, path.stat().st_size, _digest(path)]

    obs = assert_same_on_both(tmp_path, _image(tmp_path), scenario, OPTIONS)
    assert obs[1] == APPENDS * len(RECORD)


def test_appends_from_two_fds_interleave_as_on_the_kernel(tmp_path: Path) -> None:
    def scenario(root: Path) -> list[object]:
        path = root / "shared"
        first = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        second = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for i in range(2_000):
                os.write(first, b"1111"[: 1 + i % 4])
                os.write(second, b"22222"[: 1 + i % 5])
            positions = [os.lseek(first, 0, os.SEEK_CUR), os.lseek(second, 0, os.SEEK_CUR)]
        finally:
            os.close(first)
            os.close(second)
        return [positions, path.stat().st_size, _digest(path)]

    assert_same_on_both(tmp_path, _image(tmp_path), scenario, OPTIONS)


@pytest.mark.parametrize("block_size", [1024, 4096])
def test_partial_page_writes_through_a_write_only_open(tmp_path: Path, block_size: int) -> None:
    # The file is on the image before the mount: no page of it is cached, so
    # the kernel must READ through the O_WRONLY handle to fill each page.
    original = os.urandom(3 * 4096 + 123)

    def scenario(root: Path) -> list[object]:
        path = root / "existing"
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"xyz", 5)
            os.pwrite(fd, b"page-crossing", 4096 - 6)
            os.pwrite(fd, b"tail", len(original) - 2)
            os.pwrite(fd, b"past", len(original) + 5000)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        return [size, _digest(path)]

    image = _image(tmp_path, {"existing": original}, block_size)
    assert_same_on_both(tmp_path, image, scenario, OPTIONS)


def test_page_fill_through_a_write_only_open_keeps_atime(tmp_path: Path) -> None:
    """The kernel's READ to fill a page for a partial write is no read: under
    strictatime the kernel's ext4 leaves atime, and so must ext4box."""
    image = _image(tmp_path, {"existing": os.urandom(3 * 4096)})

    def scenario(root: Path) -> str:
        path = root / "existing"
        before = os.stat(path).st_atime_ns
        time.sleep(TICK_S)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"partial", 4096 + 10)  # an uncached page: READ, then write
            os.fsync(fd)
        finally:
            os.close(fd)
        return "kept" if os.stat(path).st_atime_ns == before else "moved"

    kernel_image, ours_image = tmp_path / "kernel.img", tmp_path / "ext4box.img"
    shutil.copyfile(image, kernel_image)
    shutil.copyfile(image, ours_image)
    with kernel_mount(kernel_image, tmp_path / "kmnt", readonly=False,
                      options="strictatime") as root:  # fmt: skip
        kernel_says = scenario(root)
    with rw_mount(ours_image, tmp_path / "omnt", *OPTIONS, "strictatime") as handle:
        ours_says = scenario(handle.mountpoint)
    assert (kernel_says, ours_says) == ("kept", "kept")
    assert_fsck_clean(ours_image)


def test_small_writes_into_fallocated_blocks_leave_the_rest_unwritten(tmp_path: Path) -> None:
    """1 KiB blocks: a writeback carries the whole page, but only the block
    written to stops being unwritten, as on ext4 (SEEK_DATA shows it)."""

    def scenario(root: Path) -> list[object]:
        path = root / "preallocated"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, 16 * 1024)
            os.pwrite(fd, b"x" * 100, 5000)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return [_data_map(path), _digest(path)]

    assert_same_on_both(tmp_path, _image(tmp_path, block_size=1024), scenario, OPTIONS)


@pytest.mark.parametrize("block_size", [1024, 2048, 4096])
def test_sparse_writes_allocate_what_ext4_allocates(tmp_path: Path, block_size: int) -> None:
    # The kernel writes back whole pages; on blocks smaller than a page the
    # zeros it adds over holes must stay holes (cached_writes.py). Zeros an
    # application writes into a hole of such a filesystem stay a hole too,
    # where ext4 allocates them: not checked here, the known price.
    def scenario(root: Path) -> list[object]:
        path = root / "sparse"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"tail", 5 * 1024 * 1024)
            os.pwrite(fd, b"head", 0)
            os.pwrite(fd, b"mid", 100_000)
            os.fsync(fd)
        finally:
            os.close(fd)
        with (root / "grown").open("wb") as f:  # appended past EOF, partly into a hole
            f.write(b"x" * 5000)
            f.truncate(9000)
            f.write(b"y" * 10)
        return [os.stat(path).st_blocks, _data_map(path), _data_map(root / "grown"),
                _digest(path)]

    assert_same_on_both(tmp_path, _image(tmp_path, block_size=block_size), scenario, OPTIONS)


# 128-byte inodes keep whole seconds: the kernel must stamp those too.
@pytest.mark.parametrize("inode_size", [128, 256])
def test_mtime_and_ctime_follow_the_kernels_rule(tmp_path: Path, inode_size: int) -> None:
    # Whole seconds move only after a second.
    tick = 1.05 if inode_size == 128 else TICK_S

    def scenario(root: Path) -> list[object]:
        path = root / "timed"
        path.write_bytes(b"start")
        obs: list[object] = []
        before = _times(path)
        time.sleep(tick)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"more")
            after_write = _times(fd)
            obs.append(("write", _moved(before, after_write)))
            time.sleep(tick)
            os.fsync(fd)
            obs.append(("fsync keeps", _times(fd) == after_write))
        finally:
            os.close(fd)
        obs.append(("close keeps", _times(path) == after_write))
        time.sleep(tick)
        with path.open("r+b") as f:
            f.write(b"S")
            f.flush()
            during = _times(path)
        obs.append(("overwrite", _moved(after_write, during), _times(path) == during))
        return obs

    assert_same_on_both(tmp_path, _image(tmp_path, inode_size=inode_size), scenario, OPTIONS)


def test_truncate_and_appends_race_dirty_pages(tmp_path: Path) -> None:
    def scenario(root: Path) -> list[object]:
        path = root / "cut"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        obs: list[object] = []
        try:
            os.write(fd, b"7" * 10_000)  # dirty, not yet written back
            os.ftruncate(fd, 100)
            for _ in range(10):
                os.write(fd, RECORD)
            obs.append(os.fstat(fd).st_size)
            os.truncate(path, 7_000)  # by path, with dirty pages below and above
            os.write(fd, b"end")
            obs.append(os.fstat(fd).st_size)
            obs.append(os.pread(fd, 200, 0).hex())
        finally:
            os.close(fd)
        os.truncate(path, 6_999)
        return [*obs, path.stat().st_size, _digest(path)]

    assert_same_on_both(tmp_path, _image(tmp_path), scenario, OPTIONS)


def test_mmap_writes_reach_the_image(tmp_path: Path) -> None:
    def scenario(root: Path) -> list[object]:
        path = root / "mapped"
        path.write_bytes(bytes(3 * 4096))
        before = _times(path)
        time.sleep(TICK_S)
        with path.open("r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[10:15] = b"hello"
            m[5000:5003] = b"abc"
            m.flush()
        after = _times(path)
        return [_moved(before, after)[:2], path.stat().st_size, _digest(path)]

    assert_same_on_both(tmp_path, _image(tmp_path), scenario, OPTIONS)


def test_write_by_a_non_owner_clears_setuid(tmp_path: Path) -> None:
    def scenario(root: Path) -> list[object]:
        pub = root / "pub"
        pub.mkdir()
        os.chmod(pub, 0o777)
        target = pub / "suid"
        target.write_bytes(b"payload")
        os.chown(target, 1000, 1000)
        os.chmod(target, 0o6777)
        open_path_for_others(target)
        child = run_as(2000, 2000, f"import os; fd = os.open({str(target)!r}, os.O_WRONLY); "
                                   "os.pwrite(fd, b'X', 2); os.close(fd)")
        return [child_outcome(child), oct(target.stat().st_mode), target.read_bytes()]

    obs = assert_same_on_both(tmp_path, _image(tmp_path), scenario, OPTIONS)
    assert obs[1] == oct(0o100777), obs


def test_append_only_file_keeps_refusing_a_cleared_o_append(tmp_path: Path) -> None:
    # The kernel's ext4 refuses the fcntl that clears O_APPEND; FUSE cannot
    # see the flag, so ext4box refuses the write that follows instead. Through
    # the page cache nothing could: opens for writing of an append-only file
    # must still send each write to the server with the file's flags.
    def scenario(root: Path) -> list[object]:
        path = root / "ledger"
        path.write_bytes(b"first\n")
        subprocess.run(["chattr", "+a", str(path)], check=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            appended = attempt(os.write, fd, b"second\n")
            overwrite = attempt(fcntl.fcntl, fd, fcntl.F_SETFL, os.O_WRONLY)
            if overwrite == 0:
                overwrite = attempt(os.pwrite, fd, b"X", 0)
            fsynced = attempt(os.fsync, fd)
        finally:
            os.close(fd)
        return [appended, overwrite, fsynced, path.read_bytes()]

    # Those writes bypass the page cache, and the kernel moves no time for
    # them while it keeps mtime/ctime of regular files its own: what stat
    # shows lags the image's times (docs/status.md). Content and errors agree.
    assert_same_on_both(tmp_path, _image(tmp_path), scenario, OPTIONS,
                        view_ignore=frozenset({"mtime_ns", "ctime_ns"}))


def test_file_made_append_only_while_dirty(tmp_path: Path) -> None:
    # The writes and their times are in the page cache when chattr +a comes:
    # the writeback and the kernel's time flush that follow must still land.
    def scenario(root: Path) -> list[object]:
        path = root / "journal"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"before the flag\n")
            # The ioctl on a second fd, nothing closed: chattr(1) would close
            # its own fd first, and a close writes everything back.
            flags_fd = os.open(path, os.O_RDONLY)
            flags = struct.unpack("i", fcntl.ioctl(flags_fd, FS_IOC_GETFLAGS, bytes(4)))[0]
            chattr = attempt(fcntl.ioctl, flags_fd, FS_IOC_SETFLAGS,
                             struct.pack("i", flags | FS_APPEND_FL))
            synced = attempt(os.fsync, fd)
        finally:
            os.close(fd)
        os.close(flags_fd)
        obs = [chattr, synced, attempt(syncfs, root), path.read_bytes()]
        subprocess.run(["chattr", "-a", str(path)], check=True)
        return obs

    # chattr's ctime: the kernel stamps none for it (kernel_times.py).
    assert_same_on_both(tmp_path, _image(tmp_path), scenario, OPTIONS,
                        view_ignore=frozenset({"ctime_ns"}))


def test_statfs_after_appends_and_fsync(tmp_path: Path) -> None:
    def scenario(root: Path) -> list[object]:
        before = os.statvfs(root)
        fd = os.open(root / "grow", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for _ in range(1_024):
                os.write(fd, bytes(1_024))
            os.fsync(fd)
        finally:
            os.close(fd)
        after = os.statvfs(root)
        return [(before.f_bfree - after.f_bfree) * after.f_frsize // 4096,
                before.f_ffree - after.f_ffree]

    assert_same_on_both(tmp_path, _image(tmp_path), scenario, OPTIONS)


def test_unlink_of_a_cached_file_then_syncfs(tmp_path: Path) -> None:
    # The kernel stamps the unlinked inode's ctime and flushes it by SETATTR,
    # after the server freed the inode: that must not fail (EUCLEAN came back
    # from syncfs, recorded on the mapping by the failed flush).
    def scenario(root: Path) -> list[object]:
        obs: list[object] = []
        for i in range(20):
            path = root / f"gone-{i}"
            path.write_bytes(b"x" * i)
            os.stat(path)
            os.unlink(path)
        keep = root / "kept"
        keep.write_bytes(b"linked twice")
        os.link(keep, root / "second")
        os.unlink(root / "second")  # a name left: its ctime is flushed too
        obs.append(attempt(syncfs, root))
        obs.append(os.stat(keep).st_nlink)
        return obs

    assert_same_on_both(tmp_path, _image(tmp_path), scenario, OPTIONS)


def test_pyfuse3_refuses_the_option(tmp_path: Path) -> None:
    image = _image(tmp_path)
    argv = ext4box_argv(image, tmp_path / "mnt", "rw,writeback_cache", backend="pyfuse3")
    (tmp_path / "mnt").mkdir()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "writeback_cache needs the native FUSE transport" in result.stderr
