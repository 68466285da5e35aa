"""The maximum file size, enforced as the kernel's ext4 enforces it (issue 18 item 1).

The same truncates, writes and copy_file_range calls at the boundary (limit - 1, limit, limit + 1,
17 TiB, 2^63 - 1) run on a kernel rw loop mount and on an `ext4box serve -o
rw` mount of copies of one image: the errno, the byte count a write returns,
the resulting sizes and st_blocks, and the bytes at the end of each file must
agree. Both images must then pass `e2fsck -fn`, and the kernel's view of the
ext4box image must show what ext4box showed. One image per format: extents
and block maps, 4, 2 and 1 KiB blocks, with and without huge_file, and an
inline-data file (which the kernel gives the block-map limit).

Which size is the limit comes from ext4/format/limits.py, but the test first insists
that the kernel takes that size and refuses one byte more: a wrong formula
fails here, against the kernel, not against itself.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from rw_support import assert_fsck_clean, errno_name, make_image, rw_mount, skip_unless_possible

from ext4box.ext4.format import features as F
from ext4box.ext4.format.limits import MAX_LFS_FILESIZE, blockmap_max_bytes, extent_max_bytes
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock
from support.fileops import syncfs
from support.kernel import kernel_mount

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

TIB = 1 << 40
TAIL = 8  # bytes read back at the end of every file

# name -> mkfs.ext4 arguments
FORMATS = {
    "extents-4k": ("-b", "4096"),
    "extents-4k-no-huge-file": ("-b", "4096", "-O", "^huge_file"),
    "extents-1k": ("-b", "1024"),
    "extents-1k-no-huge-file": ("-b", "1024", "-O", "^huge_file"),
    "ext3-4k": ("-t", "ext3", "-b", "4096"),
    "ext3-1k": ("-t", "ext3", "-b", "1024"),
    "ext3-2k": ("-t", "ext3", "-b", "2048"),
    "extents-2k": ("-b", "2048"),
    "blockmap-4k-huge-file": ("-b", "4096", "-O", "^extent,^64bit,huge_file"),
}

Scenario = Callable[[Path], list[object]]


def _superblock(image: Path) -> Superblock:
    with image.open("rb") as f:
        f.seek(SUPERBLOCK_OFFSET)
        return Superblock.parse(f.read(SUPERBLOCK_SIZE))


def _file_limit(image: Path) -> int:
    """The limit ext4box applies to a new regular file on `image`."""
    sb = _superblock(image)
    huge = sb.has_ro_compat(F.RO_COMPAT_HUGE_FILE)
    limit = extent_max_bytes(sb.block_size, huge)
    if not sb.has_incompat(F.INCOMPAT_EXTENTS):
        limit = min(limit, blockmap_max_bytes(sb.block_size, huge))
    return limit


def _attempt(func: Callable[[], object]) -> object:
    try:
        return func()
    except OSError as exc:
        return errno_name(exc)


def _observe_files(root: Path, prefixes: tuple[str, ...]) -> list[object]:
    # Settle delayed allocation first: before writeback, the kernel's st_blocks
    # counts the data block reserved but not the indirect blocks to come.
    syncfs(root)
    return [(name, _state(root / name)) for name in sorted(os.listdir(root))
            if name.startswith(prefixes)]


def _state(path: Path) -> tuple[int, int, bytes]:
    """(size, st_blocks, the last TAIL bytes) of a file."""
    st = os.stat(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        tail = os.pread(fd, TAIL, max(st.st_size - TAIL, 0))
    finally:
        os.close(fd)
    return st.st_size, st.st_blocks, tail


def _ftruncate(path: Path, size: int) -> object:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        return _attempt(lambda: os.ftruncate(fd, size))
    finally:
        os.close(fd)


def _pwrite(path: Path, data: bytes, pos: int, flags: int = 0) -> object:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        if flags & os.O_APPEND:
            return _attempt(lambda: os.write(fd, data))
        return _attempt(lambda: os.pwrite(fd, data, pos))
    finally:
        os.close(fd)


def _copy_range(root: Path, name: str, pos: int, count: int) -> object:
    """copy_file_range of `count` bytes of a small source file to `pos` in `name`."""
    src = os.open(root / "copy-source", os.O_RDWR | os.O_CREAT, 0o644)
    dst = os.open(root / name, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(src, b"C" * 8192, 0)
        return _attempt(lambda: os.copy_file_range(src, dst, count, 0, pos))
    finally:
        os.close(dst)
        os.close(src)


def boundary_scenario(limit: int) -> Scenario:
    """Truncates and writes around `limit`; observes every result and every file."""
    sizes = {"below": limit - 1, "at": limit, "above": limit + 1, "17t": 17 * TIB,
             "max-lfs": MAX_LFS_FILESIZE}

    def scenario(root: Path) -> list[object]:
        obs: list[object] = []
        for label, size in sizes.items():
            obs.append((f"truncate {label}", _ftruncate(root / f"t-{label}", size)))
        # A write crossing the limit is cut short there; at or past it, EFBIG.
        obs.append(("cross", _pwrite(root / "w-cross", b"abcdefgh", limit - 3)))
        obs.append(("last byte", _pwrite(root / "w-last", b"y", limit - 1)))
        obs.append(("at", _pwrite(root / "w-at", b"x", limit)))
        obs.append(("past", _pwrite(root / "w-past", b"x", limit + 4096)))
        obs.append(("max-lfs", _pwrite(root / "w-max-lfs", b"z", MAX_LFS_FILESIZE - 1)))
        # Appending: from just below the limit, then at it.
        obs.append(("append prep", _ftruncate(root / "w-append", limit - 2)))
        obs.append(("append cross", _pwrite(root / "w-append", b"12345", 0, os.O_APPEND)))
        obs.append(("append at", _pwrite(root / "w-append", b"6", 0, os.O_APPEND)))
        # Growing to the limit, then writing at it; shrinking back works.
        obs.append(("grow then write", _ftruncate(root / "w-grown", limit),
                    _pwrite(root / "w-grown", b"q", limit)))
        obs.append(("shrink", _ftruncate(root / "t-at", limit // 2)))
        for label, pos in (("cross", limit - 5), ("at", limit), ("17t", 17 * TIB),
                           ("8t", 8 * TIB), ("half", limit // 2)):
            obs.append((f"copy {label}", _copy_range(root, f"c-{label}", pos, 10)))
        obs.extend(_observe_files(root, ("t-", "w-", "c-")))
        return obs

    return scenario


def run_on_both(tmp_path: Path, image: Path, scenario: Scenario) -> None:
    """`scenario` on a kernel mount and an ext4box mount of copies of `image`: same
    observations, both images e2fsck-clean, the kernel sees what ext4box showed."""
    kernel_image = tmp_path / "kernel.img"
    ours_image = tmp_path / "ext4box.img"
    shutil.copyfile(image, kernel_image)
    shutil.copyfile(image, ours_image)
    with kernel_mount(kernel_image, tmp_path / "kmnt", readonly=False) as root:
        kernel_obs = scenario(root)
    with rw_mount(ours_image, tmp_path / "omnt") as handle:
        ours_obs = scenario(handle.mountpoint)
    differences = [f"kernel={k!r} ext4box={o!r}"
                   for k, o in zip(kernel_obs, ours_obs, strict=True) if k != o]
    assert not differences, "observations differ:\n" + "\n".join(differences)
    assert_fsck_clean(kernel_image)
    assert_fsck_clean(ours_image)
    states = [o for o in ours_obs if isinstance(o[1], tuple)]
    with kernel_mount(ours_image, tmp_path / "vmnt", readonly=True) as root:
        seen = [(name, _state(root / name)) for name, _ in states]
    assert seen == states, "the kernel reads the ext4box image differently"


@pytest.fixture(scope="module")
def format_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    skip_unless_possible()
    base = tmp_path_factory.mktemp("limits")
    return {name: make_image(base / f"{name}.img", 32, *args) for name, args in FORMATS.items()}


@pytest.mark.parametrize("name", list(FORMATS))
def test_size_limit_matches_kernel(tmp_path: Path, format_images: dict[str, Path],
                                   name: str) -> None:
    image = format_images[name]
    limit = _file_limit(image)
    # The probe sizes sit on the kernel's own boundary.
    probe = tmp_path / "probe.img"
    shutil.copyfile(image, probe)
    with kernel_mount(probe, tmp_path / "pmnt", readonly=False) as root:
        assert _ftruncate(root / "f", limit) is None
        assert _ftruncate(root / "f", limit + 1) == errno.errorcode[errno.EFBIG]
    run_on_both(tmp_path, image, boundary_scenario(limit))


def test_inline_data_file_has_the_block_map_limit(tmp_path: Path) -> None:
    """The kernel keeps an inline-data inode without the extents flag, so it checks
    it against the block-map limit even on an extent filesystem."""
    skip_unless_possible()
    image = make_image(tmp_path / "inline.img", 32, "-b", "4096", "-O",
                       "inline_data,^has_journal", "-I", "256")
    sb = _superblock(image)
    huge = sb.has_ro_compat(F.RO_COMPAT_HUGE_FILE)
    blockmap_limit = blockmap_max_bytes(sb.block_size, huge)
    assert blockmap_limit < extent_max_bytes(sb.block_size, huge)

    def scenario(root: Path) -> list[object]:
        obs: list[object] = []
        for label, size in (("above", blockmap_limit + 1), ("at", blockmap_limit)):
            path = root / f"inline-{label}"
            obs.append(("small write", _pwrite(path, b"inline body", 0)))
            obs.append((f"truncate {label}", _ftruncate(path, size)))
        path = root / "inline-write"
        obs.append(("small write", _pwrite(path, b"inline body", 0)))
        obs.append(("write past", _pwrite(path, b"x", blockmap_limit)))
        obs.append(("extent file", _ftruncate(root / "extent-file", blockmap_limit + 1)))
        obs.extend(_observe_files(root, ("inline-", "extent-")))
        return obs

    run_on_both(tmp_path, image, scenario)
