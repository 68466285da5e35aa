"""fallocate, SEEK_DATA/SEEK_HOLE, copy_file_range and statx btime through `ext4box serve -o rw`.

Each scenario runs on a kernel rw loop mount and on an ext4box rw mount of
copies of the same image (rw_support.assert_same_on_both): results, errnos,
sizes, st_blocks, contents and SEEK_DATA/SEEK_HOLE maps must be identical, the
final trees equal, both images `e2fsck -fn` clean.

The modes compared are the ones the kernel's FUSE forwards (6.18: default,
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, each with or without KEEP_SIZE as allowed);
COLLAPSE_RANGE, INSERT_RANGE and UNSHARE_RANGE are refused by fs/fuse itself
with EOPNOTSUPP before a request is sent, which the last test pins down.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from rw_support import (
    assert_fsck_clean,
    assert_same_on_both,
    attempt,
    errno_name,
    make_image,
    open_path_for_others,
    rw_mount,
    skip_unless_possible,
    syncfs,
)

from support.serve import fuse_backend

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
COLLAPSE_RANGE = 0x08
ZERO_RANGE = 0x10
INSERT_RANGE = 0x20
UNSHARE_RANGE = 0x40
BLOCK = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skip_unless_possible()
    if fuse_backend() != "native":
        pytest.skip(f"pyfuse3 has no fallocate/lseek/copy_file_range/statx handlers "
                    f"(EXT4BOX_TEST_BACKEND={fuse_backend()})")
    return make_image(tmp_path_factory.mktemp("ranges-base") / "base.img", 32, "-b", "4096")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def seek_map(fd: int) -> list[tuple[int, int]]:
    """The (data start, hole start) pairs of the whole file, by SEEK_DATA/SEEK_HOLE."""
    pairs, pos = [], 0
    for _ in range(10_000):
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            return pairs
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        pairs.append((data, hole))
        pos = hole
    raise AssertionError("SEEK_DATA/SEEK_HOLE never reached the end")


def describe(fd: int) -> tuple:
    """What a file looks like from outside: size, blocks, content digest, data map.

    The data map is taken with the file's pages out of the page cache: the
    kernel's ext4 counts a cached page over an unwritten extent as data (a FUSE
    server cannot see the client's cache), so both sides are asked in the state
    every later mount sees.
    """
    os.fsync(fd)  # settle delayed allocation on the kernel side
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    data_map = seek_map(fd)
    st = os.fstat(fd)
    content = os.pread(fd, st.st_size + 1, 0)
    return st.st_size, st.st_blocks, hashlib.sha256(content).hexdigest()[:16], data_map


def cached_view(fd: int) -> tuple[int, str]:
    """Size and content digest as read through whatever the page cache holds:
    after a fallocate or a copy, stale cached pages would show here."""
    size = os.fstat(fd).st_size
    return size, hashlib.sha256(os.pread(fd, size + 1, 0)).hexdigest()[:16]


def _pattern(blocks: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 + 1 for i in range(blocks * BLOCK))


# (mode, offset, length) steps applied in turn to one 16-block file.
FALLOCATE_STEPS = [
    (0, 20 * BLOCK, 4 * BLOCK),                      # extend with unwritten blocks
    (KEEP_SIZE, 30 * BLOCK, 3 * BLOCK),              # preallocate past EOF
    (PUNCH_HOLE | KEEP_SIZE, 2 * BLOCK, 3 * BLOCK),  # aligned punch
    (PUNCH_HOLE | KEEP_SIZE, 6 * BLOCK + 100, 2 * BLOCK),  # unaligned punch
    (ZERO_RANGE, 9 * BLOCK, 2 * BLOCK),              # aligned zero
    (ZERO_RANGE, 12 * BLOCK + 7, BLOCK + 9),         # unaligned zero
    (ZERO_RANGE | KEEP_SIZE, 23 * BLOCK, 5 * BLOCK),  # zero past EOF, size kept
    (ZERO_RANGE, 40 * BLOCK, BLOCK),                 # zero past EOF, size grows
    (PUNCH_HOLE | KEEP_SIZE, 0, 64 * BLOCK),         # punch everything, past EOF too
    (0, 0, 2 * BLOCK),                               # allocate inside the now-empty file
]

# Errors: the kernel's VFS and ext4 answer the same arguments the same way.
FALLOCATE_ERRORS = [
    (PUNCH_HOLE, 0, BLOCK),           # PUNCH_HOLE needs KEEP_SIZE: EOPNOTSUPP
    (0, 0, 0),                        # zero length: EINVAL
    (0, -1, BLOCK),                   # negative offset: EINVAL
    (ZERO_RANGE | PUNCH_HOLE, 0, BLOCK),  # two operations at once: EINVAL
    (0, (1 << 63) - BLOCK, 2 * BLOCK),  # past the largest offset: EFBIG
]


def test_fallocate_modes_match_the_kernel(tmp_path: Path, base_image: Path) -> None:
    def scenario(root: Path) -> list:
        path = root / "f"
        path.write_bytes(_pattern(16, 3))
        fd = os.open(path, os.O_RDWR)
        out: list = [describe(fd)]
        try:
            for mode, offset, length in FALLOCATE_STEPS:
                cached_view(fd)  # every page of the file in the cache
                out.append(((mode, offset, length), attempt(fallocate, fd, mode, offset, length)))
                out.append(cached_view(fd))
                out.append(describe(fd))
                # Data written over the unwritten and punched ranges reads back.
                os.pwrite(fd, b"w" * 10, offset + length // 2)
                out.append(describe(fd))
            for mode, offset, length in FALLOCATE_ERRORS:
                out.append(((mode, offset, length), attempt(fallocate, fd, mode, offset, length)))
            out.append(describe(fd))
        finally:
            os.close(fd)
        # A read-only handle: EBADF.
        fd = os.open(path, os.O_RDONLY)
        try:
            out.append(attempt(fallocate, fd, 0, 0, BLOCK))
        finally:
            os.close(fd)
        # Truncates crossing unwritten extents.
        fd = os.open(root / "t", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fallocate(fd, KEEP_SIZE, 0, 12 * BLOCK)
            for size in (5 * BLOCK + 123, 9 * BLOCK, 2 * BLOCK, 14 * BLOCK + 1, 0):
                os.ftruncate(fd, size)
                out.append(describe(fd))
        finally:
            os.close(fd)
        return out

    assert_same_on_both(tmp_path, base_image, scenario)


def test_seek_data_and_hole_match_the_kernel(tmp_path: Path, base_image: Path) -> None:
    def scenario(root: Path) -> list:
        out: list = []
        fd = os.open(root / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            out.append(describe(fd))  # empty: no data, SEEK_DATA at 0 is ENXIO
            out.append(attempt(os.lseek, fd, 0, os.SEEK_HOLE))
            for block in (3, 4, 10, 300, 301, 302, 1500):
                os.pwrite(fd, b"d" * 5, block * BLOCK + 17)
            os.ftruncate(fd, 2000 * BLOCK)  # a hole at the end
            out.append(describe(fd))
            for pos in (0, 3 * BLOCK, 3 * BLOCK + 17, 5 * BLOCK - 1, 5 * BLOCK, 1501 * BLOCK,
                        2000 * BLOCK - 1, 2000 * BLOCK, 3000 * BLOCK):
                out.append((pos, attempt(os.lseek, fd, pos, os.SEEK_DATA),
                            attempt(os.lseek, fd, pos, os.SEEK_HOLE)))
        finally:
            os.close(fd)
        return out

    assert_same_on_both(tmp_path, base_image, scenario)


def test_copy_file_range_matches_the_kernel(tmp_path: Path, base_image: Path) -> None:
    def scenario(root: Path) -> list:
        out: list = []
        src_path, dst_path = root / "src", root / "dst"
        fd = os.open(src_path, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, _pattern(3, 1), 0)
        os.pwrite(fd, _pattern(2, 9), 8 * BLOCK + 5)  # a hole between the two
        os.close(fd)
        src = os.open(src_path, os.O_RDWR)
        dst = os.open(dst_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            copy = os.copy_file_range
            out.append(attempt(copy, src, dst, 11 * BLOCK, 0, 0))        # whole file, holes
            out.append(describe(dst))
            out.append(attempt(copy, src, dst, 1 << 20, 9 * BLOCK, 100))  # clipped at EOF
            out.append(attempt(copy, src, dst, BLOCK, 20 * BLOCK, 0))     # past EOF: 0
            out.append(describe(dst))
            cached_view(dst)
            out.append(attempt(copy, src, dst, 3000, 7, 40 * BLOCK + 3))  # extends dst
            out.append(cached_view(dst))
            out.append(attempt(copy, src, dst, 5000, 100, 2 * BLOCK + 1))  # over cached pages
            out.append(cached_view(dst))
            out.append(describe(dst))
            # Within one file: apart is fine, overlapping is EINVAL.
            out.append(attempt(copy, src, src, BLOCK, 0, 20 * BLOCK))
            out.append(attempt(copy, src, src, 2 * BLOCK, 0, BLOCK))
            out.append(describe(src))
            out.append(attempt(copy, src, dst, 0, 0, 0))                  # length 0
        finally:
            os.close(src)
            os.close(dst)
        # Open modes: the VFS checks them; a FUSE server must agree.
        readonly = os.open(dst_path, os.O_RDONLY)
        writeonly = os.open(src_path, os.O_WRONLY)
        append = os.open(dst_path, os.O_WRONLY | os.O_APPEND)
        directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        src = os.open(src_path, os.O_RDONLY)
        try:
            out.append(attempt(os.copy_file_range, src, readonly, BLOCK, 0, 0))
            out.append(attempt(os.copy_file_range, writeonly, append, BLOCK, 0, 0))
            out.append(attempt(os.copy_file_range, src, append, BLOCK, 0, 0))
            out.append(attempt(os.copy_file_range, directory, append, BLOCK, 0, 0))
            out.append(attempt(os.copy_file_range, src, directory, BLOCK, 0, 0))
        finally:
            for fd in (readonly, writeonly, append, directory, src):
                os.close(fd)
        syncfs(root)
        return out

    assert_same_on_both(tmp_path, base_image, scenario)


def _crtime_ns(image: Path, name: str) -> int:
    """i_crtime of /name as debugfs reads it from the image (seconds:extra in hex)."""
    result = subprocess.run(["debugfs", "-R", f"stat /{name}", str(image)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    found = re.search(r"crtime: 0x([0-9a-f]+):([0-9a-f]+)", result.stdout)
    assert found, result.stdout
    seconds, extra = int(found[1], 16), int(found[2], 16)
    return (seconds + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


def _statx_btime_ns(path: Path) -> str:
    """btime by statx(2) (GNU stat asks for STATX_BTIME): '-' when not reported."""
    out = subprocess.run(["stat", "-c", "%W %.9W", str(path)], capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    if out[0] == "0":
        return "-"
    return str(int(out[1].replace(".", "")))


def test_statx_btime_is_i_crtime(tmp_path: Path, base_image: Path) -> None:
    image = tmp_path / "btime.img"
    image.write_bytes(base_image.read_bytes())
    names = ("file", "dir", "fifo")
    with rw_mount(image, tmp_path / "mnt") as handle:
        root = handle.mountpoint
        (root / "file").write_bytes(b"x")
        (root / "dir").mkdir()
        os.mkfifo(root / "fifo")
        seen = {name: _statx_btime_ns(root / name) for name in names}
    assert_fsck_clean(image)
    assert seen == {name: str(_crtime_ns(image, name)) for name in names}


def test_fuse_refuses_collapse_insert_and_unshare(tmp_path: Path, base_image: Path) -> None:
    """fs/fuse forwards no COLLAPSE_RANGE, INSERT_RANGE or UNSHARE_RANGE: the
    caller gets EOPNOTSUPP on the ext4box mount (the kernel's ext4 does them)."""
    image = tmp_path / "refused.img"
    image.write_bytes(base_image.read_bytes())
    with rw_mount(image, tmp_path / "mnt") as handle:
        path = handle.mountpoint / "f"
        path.write_bytes(_pattern(8, 5))
        fd = os.open(path, os.O_RDWR)
        try:
            answers = {mode: attempt(fallocate, fd, mode, BLOCK, 2 * BLOCK)
                       for mode in (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE)}  # fmt: skip
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
    assert_fsck_clean(image)
    assert answers == dict.fromkeys((COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE),
                                    errno_name(OSError(errno.EOPNOTSUPP, "")))  # fmt: skip
    assert size == 8 * BLOCK


_CHILD = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
op, target, source = sys.argv[1:] if len(sys.argv) > 3 else (*sys.argv[1:], None)
fd = os.open(target, os.O_RDWR)
if op == "fallocate":
    assert libc.fallocate(fd, int(source), 0, 8192) == 0, ctypes.get_errno()
else:
    src = os.open(source, os.O_RDONLY)
    os.copy_file_range(src, fd, 100, 0, 10)
"""


def test_suid_and_sgid_after_fallocate_and_copy_by_the_owner(tmp_path: Path,
                                                            base_image: Path) -> None:
    """A non-root owner's fallocate or copy into a set-id file: the bits as on ext4."""
    open_path_for_others(tmp_path)

    def scenario(root: Path) -> list:
        out: list = []
        src = root / "src"
        src.write_bytes(b"s" * 100)
        os.chmod(src, 0o644)
        cases = [("fallocate", "0"), ("fallocate", str(KEEP_SIZE)),
                 ("fallocate", str(PUNCH_HOLE | KEEP_SIZE)), ("fallocate", str(ZERO_RANGE)),
                 ("copy", str(src))]  # fmt: skip
        for index, (op, arg) in enumerate(cases):
            target = root / f"t{index}"
            target.write_bytes(b"t" * 5000)
            os.chown(target, 1000, 1000)
            os.chmod(target, 0o6775)
            result = subprocess.run(
                ["python3", "-c", _CHILD, op, str(target), arg], capture_output=True, text=True,
                preexec_fn=lambda: (os.setgroups([]), os.setgid(1000), os.setuid(1000)),
                timeout=60,
            )  # fmt: skip
            out.append((op, arg if op != "copy" else "src", result.returncode,
                        oct(os.stat(target).st_mode)))  # fmt: skip
        return out

    assert_same_on_both(tmp_path, base_image, scenario)
