"""FS_IOC_GETFSLABEL/SETFSLABEL and FITRIM through the facade, against the kernel.

Label: the same SETFSLABEL calls on a kernel rw loop mount (ioctl) and on the
facade, on copies of one image, must leave the same bytes in the primary and
every backup superblock (each with a valid checksum), e2label must print the
label, and the errnos (EINVAL over 16 bytes, EPERM for a user) must agree.

FITRIM: on copies of one image whose free space the kernel shaped (files
written and removed, unmounted), the same fstrim ranges must report the same
number of bytes as the kernel's FITRIM (a second whole trim: 0, as the kernel
remembers trimmed groups), every file's content must be intact, e2fsck clean,
and the image file's allocated size must drop by the bytes reported.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock
from ext4box.ext4.write.trim import TrimRange
from support.facade import Ours, assert_clean, make_image, need_kernel, pattern
from support.flag_drivers import as_user, errno_name
from support.kernel import kernel_mount

pytestmark = pytest.mark.kernel

FS_IOC_GETFSLABEL = 0x81009431
FS_IOC_SETFSLABEL = 0x41009432
FITRIM = 0xC0185879
FSTRIM_RANGE = struct.Struct("=QQQ")
LABEL_OFFSET = 120


def _superblock_copies(image: Path) -> dict[int, bytes]:
    """group -> the 1024 bytes of its superblock copy (group 0: the primary)."""
    with image.open("rb") as f:
        f.seek(SUPERBLOCK_OFFSET)
        sb = Superblock.parse(f.read(SUPERBLOCK_SIZE))
        copies = {}
        for group in range(sb.group_count):
            if not sb.group_has_super(group):
                continue
            offset = SUPERBLOCK_OFFSET if group == 0 else (
                (sb.first_data_block + group * sb.blocks_per_group) * sb.block_size)
            f.seek(offset)
            copies[group] = f.read(SUPERBLOCK_SIZE)
    return copies


def _kernel_set_label(root: Path, label: bytes, uid: int = 0) -> str:
    fd = os.open(root, os.O_RDONLY)
    try:
        with as_user(uid):
            fcntl.ioctl(fd, FS_IOC_SETFSLABEL, label.ljust(256, b"\0"))
    except OSError as err:
        return errno_name(err.errno or 0)
    finally:
        os.close(fd)
    return "OK"


def _kernel_get_label(root: Path) -> bytes:
    fd = os.open(root, os.O_RDONLY)
    try:
        return fcntl.ioctl(fd, FS_IOC_GETFSLABEL, bytes(256))[:17]
    finally:
        os.close(fd)


def _ours_set_label(ours: Ours, label: bytes, uid: int = 0) -> str:
    try:
        ours.fs.set_label(label.ljust(256, b"\0"), uid)
    except Ext4Error as err:
        return errno_name(err.errno)
    return "OK"


@pytest.mark.parametrize("mkfs", [["-b", "1024"],
                                  ["-b", "4096", "-g", "8192", "-O", "^metadata_csum"],
                                  ["-b", "1024", "-O", "sparse_super2"]],
                         ids=["1k-csum", "4k-nocsum", "sparse_super2"])
def test_label_matches_the_kernel(tmp_path: Path, mkfs: list[str]) -> None:
    need_kernel()
    base = make_image(tmp_path / "base.img", ["-t", "ext4", "-L", "before", *mkfs], 64)
    ours_img, kernel_img = tmp_path / "ours.img", tmp_path / "kernel.img"
    shutil.copyfile(base, ours_img)
    shutil.copyfile(base, kernel_img)
    steps = [(b"x" * 17, 0), (b"user-label", 1000), (b"sixteen-bytes-ok", 0), (b"short", 0)]
    ours = Ours(ours_img)
    try:
        our_labels = [ours.fs.get_label()]
        our_results = []
        for label, uid in steps:
            our_results.append(_ours_set_label(ours, label, uid))
            our_labels.append(ours.fs.get_label())
    finally:
        ours.close()
    with kernel_mount(kernel_img, tmp_path / "k", readonly=False) as root:
        kernel_labels = [_kernel_get_label(root)]
        kernel_results = []
        for label, uid in steps:
            kernel_results.append(_kernel_set_label(root, label, uid))
            kernel_labels.append(_kernel_get_label(root))
    assert our_results == kernel_results == ["EINVAL", "EPERM", "OK", "OK"]
    assert our_labels == kernel_labels
    ours_copies, kernel_copies = _superblock_copies(ours_img), _superblock_copies(kernel_img)
    assert len(ours_copies) > 1
    for group, raw in ours_copies.items():
        # The label as the kernel left it in the same copy; the checksum valid.
        assert raw[LABEL_OFFSET:LABEL_OFFSET + 16] == \
            kernel_copies[group][LABEL_OFFSET:LABEL_OFFSET + 16], f"group {group}"
        if group:
            Superblock.parse(raw)  # checks the checksum under metadata_csum
    assert_clean(ours_img)
    e2label = subprocess.run(["e2label", str(ours_img)], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert e2label == "short"


# ---- FITRIM -------------------------------------------------------------------------


def _shape_free_space(image: Path, tmp: Path) -> None:
    """Files written and removed by the kernel: free runs of many lengths."""
    with kernel_mount(image, tmp / "shape", readonly=False) as root:
        for i in range(40):
            (root / f"f{i}").write_bytes(os.urandom(1024 * (1 + (i * 37) % 300)))
        for i in range(0, 40, 3):
            (root / f"f{i}").unlink()


def _content_hashes(image: Path, mnt: Path) -> dict[str, str]:
    with kernel_mount(image, mnt, readonly=True) as root:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.iterdir()) if p.is_file()}


def _kernel_trim(root: Path, request: TrimRange) -> str | int:
    fd = os.open(root, os.O_RDONLY)
    try:
        out = fcntl.ioctl(fd, FITRIM, FSTRIM_RANGE.pack(request.start, request.length,
                                                       request.minlen))
    except OSError as err:
        return errno_name(err.errno or 0)
    finally:
        os.close(fd)
    return FSTRIM_RANGE.unpack(out)[1]


def _ours_trim(ours: Ours, request: TrimRange, uid: int = 0) -> str | int:
    try:
        return ours.fs.trim(request, uid)
    except Ext4Error as err:
        return errno_name(err.errno)


ALL = (1 << 64) - 1
REQUESTS = [
    TrimRange(0, 4096 * 3, 0),  # the start: group metadata, nothing free
    TrimRange(6 << 20, 4096, 0),  # one block: a run starting there is trimmed whole
    TrimRange(5 << 20, 3 << 20, 16 * 1024),  # where files were removed, with a minlen
    TrimRange(4 << 20, 8 << 20, 0),
    TrimRange(0, ALL, 1 << 20),  # big runs only
    TrimRange(0, ALL, 0),  # the rest
    TrimRange(0, ALL, 0),  # again: groups remembered as trimmed
    TrimRange(0, 512, 0),  # shorter than a block: EINVAL
    TrimRange(1 << 40, ALL, 0),  # past the end: EINVAL
]


@pytest.mark.parametrize("mkfs", [["-b", "4096"], ["-b", "1024", "-O", "^metadata_csum"]],
                         ids=["4k", "1k-nocsum"])
def test_fitrim_matches_the_kernel(tmp_path: Path, mkfs: list[str]) -> None:
    need_kernel()
    base = make_image(tmp_path / "base.img", ["-t", "ext4", *mkfs], 64)
    _shape_free_space(base, tmp_path)
    ours_img, kernel_img = tmp_path / "ours.img", tmp_path / "kernel.img"
    shutil.copyfile(base, ours_img)
    shutil.copyfile(base, kernel_img)
    hashes = _content_hashes(base, tmp_path / "h0")
    allocated_before = os.stat(ours_img).st_blocks * 512

    ours = Ours(ours_img)
    try:
        refused = _ours_trim(ours, TrimRange(0, ALL, 0), uid=1000)
        ours_results = [_ours_trim(ours, request) for request in REQUESTS]
    finally:
        ours.close()
    with kernel_mount(kernel_img, tmp_path / "k", readonly=False) as root:
        kernel_results = [_kernel_trim(root, request) for request in REQUESTS]

    assert refused == "EPERM"
    assert ours_results == kernel_results
    assert all(isinstance(r, int) and r > 0 for r in ours_results[3:5])
    assert ours_results[6] == 0
    assert_clean(ours_img)
    assert _content_hashes(ours_img, tmp_path / "h1") == hashes
    trimmed = sum(r for r in ours_results if isinstance(r, int))
    allocated_after = os.stat(ours_img).st_blocks * 512
    # Every trimmed byte is a hole now (mkfs left the free space unwritten, so
    # only the blocks the files had used were allocated in the image file).
    assert allocated_after < allocated_before
    assert allocated_before - allocated_after <= trimmed


def test_fitrim_never_discards_blocks_in_use(tmp_path: Path) -> None:
    """Blocks allocated and written but not yet committed, and blocks freed but
    still pending, keep their contents through FITRIM (a journaled image)."""
    need_kernel()
    image = make_image(tmp_path / "img", ["-t", "ext4", "-b", "4096"], 64)
    ours = Ours(image)
    try:
        ours.create("/keep")
        ours.write("/keep", 0, pattern(1, 300_000))  # uncommitted allocation
        ours.create("/gone")
        ours.write("/gone", 0, pattern(2, 200_000))
        ours.fs.commit(durable=True)
        ours.unlink("/gone")  # its blocks: a pending free until the next commit
        ours.create("/late")
        ours.write("/late", 0, pattern(3, 100_000))
        trimmed = ours.fs.trim(TrimRange(0, (1 << 64) - 1, 0), 0)
        ours.write("/late", 100_000, pattern(4, 50_000))
    finally:
        ours.close()
    assert trimmed > 0
    assert_clean(image)
    with kernel_mount(image, tmp_path / "m", readonly=True) as root:
        assert (root / "keep").read_bytes() == pattern(1, 300_000)
        assert (root / "late").read_bytes() == pattern(3, 100_000) + pattern(4, 50_000)
        assert not (root / "gone").exists()
