"""Corrupted images: the server stays up, fails only what is damaged, and says so.

One small metadata_csum image is built per module; each test flips bytes in a
copy of it at a location found with dumpe2fs/debugfs (a superblock field, a
group descriptor, an inode, an extent leaf block, a directory block, an xattr
block), serves the copy with `ext4box serve -o ro` and checks that the
affected entry answers EUCLEAN or EIO while an unrelated file stays readable.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import images
from support.kernel import kernel_mount
from support.serve import ServedMount, ext4box_argv, served

BLOCK_SIZE = 1024
INODES_PER_GROUP = 32
FAILURE_ERRNOS = {errno.EUCLEAN, errno.EIO}

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]


@dataclass(frozen=True, slots=True)
class BaseImage:
    path: Path
    inode_of: dict[str, int]  # relative path -> inode number, as the kernel reports it
    good_file: str  # a file (and parents) in group 0, never the target of a corruption
    good_content: bytes


def _build_tree(root: Path) -> None:
    def write(relpath: str, data: bytes) -> None:
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)

    write("ok/readme.txt", b"still readable\n")
    write("victim/inode.txt", b"this inode gets damaged\n")
    for i in range(12):
        write(f"dirblock/entry-{i:02d}.txt", b"in a damaged directory\n")
    write("xattr/big", b"xattr block gets damaged\n")
    os.setxattr(root / "xattr/big", "user.big", b"B" * 600)
    # Enough files that later inodes fall in groups 1 and beyond.
    for i in range(80):
        write(f"filler/file-{i:03d}", b"filler %d\n" % i)


@pytest.fixture(scope="module")
def base_image(
    tmp_path_factory: pytest.TempPathFactory, need_kernel_mounts: None, need_fuse: None
) -> BaseImage:
    work = tmp_path_factory.mktemp("corrupt")
    tree = work / "tree"
    _build_tree(tree)
    image = work / "base.img"
    images.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-g", "2048",
                "-N", str(8 * INODES_PER_GROUP), "-O", "metadata_csum", "-d", str(tree),
                str(image), "16M"])
    with kernel_mount(image, work / "rw", readonly=False, options="noinit_itable") as mnt:
        images.fragment_file(mnt / images.FRAGMENTED_FILE, BLOCK_SIZE, extents=True)
    header = images.dumpe2fs_header(image)
    assert header["Inodes per group"] == str(INODES_PER_GROUP)
    inode_of: dict[str, int] = {}
    with kernel_mount(image, work / "ro") as mnt:
        for dirpath, dirnames, filenames in os.walk(mnt):
            for name in dirnames + filenames:
                full = Path(dirpath, name)
                inode_of[str(full.relative_to(mnt))] = os.lstat(full).st_ino
            # mkfs -d numbers inodes in readdir order: pick the witness file by its groups.
        good_file = next(p for p in sorted(inode_of)
                         if p.startswith(("ok/", "filler/")) and set(_groups(inode_of, p)) == {0})
        good_content = (mnt / good_file).read_bytes()
    assert images.extent_tree_depth(image, images.FRAGMENTED_FILE) >= 1
    return BaseImage(image, inode_of, good_file, good_content)


def _group(ino: int) -> int:
    return (ino - 1) // INODES_PER_GROUP


def _groups(inode_of: dict[str, int], relpath: str) -> list[int]:
    """Groups of the inodes on the path to `relpath` (parents first; root is group 0)."""
    parts = relpath.split("/")
    return [0] + [_group(inode_of["/".join(parts[: i + 1])]) for i in range(len(parts))]


def _damaged_copy(base: BaseImage, tmp_path: Path, offset: int, length: int = 1) -> Path:
    """A copy of the base image with `length` bytes at `offset` inverted."""
    image = tmp_path / "damaged.img"
    shutil.copyfile(base.path, image)
    with image.open("r+b") as f:
        f.seek(offset)
        original = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in original))
    return image


def _expect_failure(action: Callable[[], object], what: str) -> None:
    with pytest.raises(OSError) as info:
        action()
    assert info.value.errno in FAILURE_ERRNOS, (
        f"{what}: expected EUCLEAN or EIO, got {errno.errorcode.get(info.value.errno or 0)}"
    )


def _still_healthy(handle: ServedMount, base: BaseImage) -> None:
    assert handle.alive(), f"server died:\n{handle.stderr_text()}"
    assert (handle.mountpoint / base.good_file).read_bytes() == base.good_content
    assert "ok" in os.listdir(handle.mountpoint)


def _debugfs_number(image: Path, request: str, pattern: str) -> int:
    match = re.search(pattern, images.debugfs(image, request))
    assert match, f"debugfs {request!r}: no match for {pattern!r}"
    return int(match.group(1))


def _inode_offset(image: Path, ino: int) -> int:
    output = images.debugfs(image, f"imap <{ino}>")
    match = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", output)
    assert match, output
    return int(match.group(1)) * BLOCK_SIZE + int(match.group(2), 16)


def test_corrupt_superblock_refuses_to_serve(base_image: BaseImage, tmp_path: Path) -> None:
    # s_free_inodes_count (superblock offset 0x10): only the checksum can notice.
    image = _damaged_copy(base_image, tmp_path, 1024 + 0x10)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run(ext4box_argv(image, mountpoint), capture_output=True, text=True,
                            timeout=60, check=False)
    if os.path.ismount(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        pytest.fail("ext4box served an image whose superblock checksum is wrong")
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{result.stderr}"
    assert "superblock" in lines[0].lower() or "checksum" in lines[0].lower(), lines[0]


def test_corrupt_group_descriptor(base_image: BaseImage, tmp_path: Path) -> None:
    # A file whose inode lives in a later group than every directory on its path.
    inode_of = base_image.inode_of
    victim = next(
        path for path in sorted(inode_of)
        if path.startswith("filler/") and _groups(inode_of, path)[-1] > 0
        and _groups(inode_of, path)[-1] not in _groups(inode_of, path)[:-1]
    )
    group = _group(inode_of[victim])
    header = images.dumpe2fs_header(base_image.path)
    desc_size = int(header.get("Group descriptor size", "32"))
    gdt_block = int(header["First block"]) + 1
    # bg_inode_table_lo (descriptor offset 0x08): its checksum no longer matches.
    image = _damaged_copy(base_image, tmp_path, gdt_block * BLOCK_SIZE + group * desc_size + 8)
    with served(image, tmp_path / "mnt") as handle:
        _expect_failure(lambda: os.lstat(handle.mountpoint / victim),
                        f"lstat {victim} (group {group})")
        _still_healthy(handle, base_image)


def test_corrupt_inode(base_image: BaseImage, tmp_path: Path) -> None:
    ino = base_image.inode_of["victim/inode.txt"]
    # i_size_lo (inode offset 0x04): caught by the inode checksum.
    image = _damaged_copy(base_image, tmp_path, _inode_offset(base_image.path, ino) + 4)
    with served(image, tmp_path / "mnt") as handle:
        _expect_failure(lambda: os.lstat(handle.mountpoint / "victim/inode.txt"),
                        "lstat of the damaged inode")
        assert os.lstat(handle.mountpoint / "victim").st_ino == base_image.inode_of["victim"]
        _still_healthy(handle, base_image)


def test_corrupt_extent_block(base_image: BaseImage, tmp_path: Path) -> None:
    output = images.debugfs(base_image.path, f'ex "/{images.FRAGMENTED_FILE}"')
    # An index line (level 0 of a depth >= 1 tree): its Physical column is the leaf block.
    match = re.search(r"^\s*0/\s*[1-9]\d*\s+\d+/\s*\d+\s+\d+\s*-\s*\d+\s+(\d+)", output, re.M)
    assert match, output
    leaf = int(match.group(1))
    # The first extent's start block (leaf offset 12 + 8): caught by the tail checksum.
    image = _damaged_copy(base_image, tmp_path, leaf * BLOCK_SIZE + 12 + 8, 2)
    with served(image, tmp_path / "mnt") as handle:
        target = handle.mountpoint / images.FRAGMENTED_FILE
        assert os.lstat(target).st_size > 0  # the inode itself is intact
        _expect_failure(target.read_bytes, "reading through a damaged extent leaf")
        _still_healthy(handle, base_image)


def test_corrupt_directory_block(base_image: BaseImage, tmp_path: Path) -> None:
    output = images.debugfs(base_image.path, 'blocks "/dirblock"')
    first_block = int(output.split()[0])
    # Bytes inside the third entry's name: only the directory block checksum notices.
    image = _damaged_copy(base_image, tmp_path, first_block * BLOCK_SIZE + 24 + 10, 2)
    with served(image, tmp_path / "mnt") as handle:
        _expect_failure(lambda: os.listdir(handle.mountpoint / "dirblock"),
                        "listing a directory with a damaged block")
        _expect_failure(lambda: os.lstat(handle.mountpoint / "dirblock/entry-05.txt"),
                        "lookup in a directory with a damaged block")
        _still_healthy(handle, base_image)


def test_corrupt_xattr_block(base_image: BaseImage, tmp_path: Path) -> None:
    block = images.xattr_block_of(base_image.path, "xattr/big")
    assert block != 0
    # A byte of the value area at the end of the block: caught by the block checksum.
    image = _damaged_copy(base_image, tmp_path, block * BLOCK_SIZE + BLOCK_SIZE - 100)
    with served(image, tmp_path / "mnt") as handle:
        target = handle.mountpoint / "xattr/big"
        _expect_failure(lambda: os.getxattr(target, "user.big"), "getxattr from a damaged block")
        _expect_failure(lambda: os.listxattr(target), "listxattr from a damaged block")
        _still_healthy(handle, base_image)
