"""Offline commands (inspect, ls, cat, extract) against the source tree and dumpe2fs."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

from fuse_helpers import run_ext4box


def test_inspect_matches_dumpe2fs(image: Path) -> None:
    result = run_ext4box("inspect", str(image))
    assert result.returncode == 0, result.stderr
    header = subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(re.findall(r"^([^:\n]+):\s+(.*)$", header, re.M))
    assert f"block size:       {fields['Block size']}" in result.stdout
    assert fields["Filesystem UUID"] in result.stdout
    assert f"{fields['Block count']} ({fields['Free blocks']} free)" in result.stdout
    assert set(fields["Filesystem features"].split()) <= set(
        result.stdout.split("features:", 1)[1].split()
    )


def test_ls_and_cat(image: Path, source_tree: Path) -> None:
    listing = run_ext4box("ls", str(image), "/dir")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == sorted(os.listdir(source_tree / "dir"))
    long = run_ext4box("ls", "-l", str(image), "/")
    assert "link_short -> small.txt" in long.stdout
    chardev_mode = stat.filemode(os.lstat(source_tree / "chardev").st_mode)
    assert f"{chardev_mode}   1     0     0      4, 64 " in long.stdout
    cat = subprocess.run(
        [*__import__("fuse_helpers").EXT4BOX, "cat", str(image), "link_dir/../../large.bin"],
        capture_output=True,
        env=__import__("fuse_helpers").env(),
        check=True,
    )
    # link_dir -> dir/nested, so link_dir/../.. is the root, as the kernel resolves it.
    assert cat.stdout == (source_tree / "large.bin").read_bytes()


def test_extract_whole_image(image: Path, mounts: tuple[Path, Path], tmp_path: Path) -> None:
    reference = mounts[1]  # the kernel's view of the image
    dest = tmp_path / "out"
    dest.mkdir()
    result = run_ext4box("extract", str(image), "/", str(dest))
    # Sockets are not extracted; everything in this tree is extractable as root.
    assert result.returncode == 0, result.stderr
    for dirpath, dirnames, filenames in os.walk(reference):
        for name in dirnames + filenames:
            src = Path(dirpath) / name
            copy = dest / src.relative_to(reference)
            ours, theirs = os.lstat(copy), os.lstat(src)
            expected_mode = theirs.st_mode
            if stat.S_ISREG(expected_mode):
                expected_mode &= ~(stat.S_ISUID | stat.S_ISGID)
                assert copy.read_bytes() == src.read_bytes(), src
            assert ours.st_mode == expected_mode, src
            assert (ours.st_uid, ours.st_gid) == (theirs.st_uid, theirs.st_gid), src
            assert ours.st_mtime_ns == theirs.st_mtime_ns, src
            if stat.S_ISLNK(theirs.st_mode):
                assert os.readlink(copy) == os.readlink(src)
    assert os.lstat(dest / "small.txt").st_ino == os.lstat(dest / "dir" / "hardlink.txt").st_ino


def test_extract_refuses_to_overwrite(image: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "small.txt").write_bytes(b"mine")
    result = run_ext4box("extract", str(image), "/small.txt", str(dest))
    assert result.returncode == 1
    assert (dest / "small.txt").read_bytes() == b"mine"
