"""DirectoryReader end to end: iterate vs the kernel's `ls -f`, lookup vs debugfs."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from dirs_support import (
    EXT4_INLINE_DATA_FL,
    debugfs_ls,
    inode_info,
    kernel_dirs_image,
    kernel_listing,
    mkfs,
    mounted,
    need_kernel,
    need_tools,
    open_directory,
)

from ext4box.ext4.format.dir_block import EXT4_FT_DIR
from ext4box.ext4.format.errors import Corrupt


@pytest.fixture(scope="module", params=["csum", "nocsum"])
def image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("directory")
    csum = request.param == "csum"
    return kernel_dirs_image(base, csum=csum, big=20000 if csum else 6000)


@pytest.mark.parametrize("spec", ["big", "small", "high", "/"])
def test_iterate_matches_kernel_listing(image: Path, tmp_path: Path, spec: str) -> None:
    reader = open_directory(image, spec, tmp_path)
    got = list(reader.iterate())
    with mounted(image, tmp_path / "mnt", readonly=True) as mnt:
        want = kernel_listing(mnt, spec.lstrip("/"))
    assert Counter(e.name for e, _ in got) == Counter(want)
    assert sorted((e.inode, e.name) for e, _ in got) == sorted(debugfs_ls(image, spec))
    cookies = [c for _, c in got]
    assert cookies == sorted(set(cookies)) and cookies[0] > 0
    assert got[0][0].name == b"." and got[1][0].name == b".."
    assert got[0][0].file_type == got[1][0].file_type == EXT4_FT_DIR


def test_iterate_resumes_after_any_cookie(image: Path, tmp_path: Path) -> None:
    reader = open_directory(image, "big", tmp_path)
    full = list(reader.iterate())
    for i in (0, 1, 2, 17, len(full) // 2, len(full) - 2, len(full) - 1):
        assert list(reader.iterate(full[i][1])) == full[i + 1 :]
    # A cookie inside a record (the directory changed since) resumes at the next record.
    assert list(reader.iterate(full[5][1] - 4)) == full[6:]


def test_lookup_every_name(image: Path, tmp_path: Path) -> None:
    for spec in ("big", "small", "high"):
        reader = open_directory(image, spec, tmp_path)
        listed = debugfs_ls(image, spec)
        for ino, name in listed:
            entry = reader.lookup(name)
            assert entry is not None and entry.inode == ino, name
        for missing in (b"missing", b"entry-00007-", b"x" * 255, b"x" * 256, b"", b"a/b"):
            assert reader.lookup(missing) is None


def test_unlinked_names_are_gone(image: Path, tmp_path: Path) -> None:
    from dirs_support import big_names

    reader = open_directory(image, "big", tmp_path)
    names = big_names(20000 if reader.csum_seed is not None else 6000)
    for name in names[::7][:300]:
        assert reader.lookup(name) is None
    assert reader.lookup(names[1]) is not None


def test_holes_in_linear_directories_are_skipped(image: Path, tmp_path: Path) -> None:
    # A linear directory made of three blocks, the middle one a hole.
    reader = open_directory(image, "small", tmp_path)
    block0 = reader._read_lblk(0)
    reader.size = 3 * reader.block_size
    original = reader._read_lblk
    reader._read_lblk = lambda lblk: {0: block0, 1: None, 2: original(0)}[lblk]
    names = [e.name for e, _ in reader.iterate()]
    assert len(names) == 2 * len(list(open_directory(image, "small", tmp_path).iterate()))
    assert reader.lookup(b"file") is not None


def test_index_leaf_hole_falls_back_to_linear(image: Path, tmp_path: Path) -> None:
    reader = open_directory(image, "big", tmp_path)
    victim = next(e for e, _ in reader.iterate() if e.name.startswith(b"entry-"))
    original = reader._read_lblk
    hole = next(lblk for lblk in range(1, reader.nblocks) if victim.name in original(lblk))
    reader._read_lblk = lambda lblk: None if lblk == hole else original(lblk)
    assert reader.lookup(victim.name) is None  # its leaf is gone; the scan skips the hole
    other = next(e for e, _ in reader.iterate() if e.name.startswith(b"entry-") and e != victim)
    found = reader.lookup(other.name)
    assert found == other


def test_leaf_checksum_failure_is_reported(image: Path, tmp_path: Path) -> None:
    reader = open_directory(image, "big", tmp_path)
    if reader.csum_seed is None:
        pytest.skip("no checksums")
    victim = next(e for e, _ in reader.iterate() if e.name.startswith(b"entry-"))
    original = reader._read_lblk
    leaf = next(lblk for lblk in range(1, reader.nblocks) if victim.name in original(lblk))

    def read(lblk: int) -> bytes | None:
        block = original(lblk)
        if lblk == leaf and block is not None:
            block = block[:-1] + bytes([block[-1] ^ 0xFF])
        return block

    reader._read_lblk = read
    with pytest.raises(Corrupt, match="checksum"):
        reader.lookup(victim.name)
    with pytest.raises(Corrupt, match="checksum") as err:
        list(reader.iterate())
    assert f"block {leaf}" in err.value.where


# ---- inline directories ----------------------------------------------------------


@pytest.fixture(scope="module")
def inline_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_tools()
    need_kernel()
    base = tmp_path_factory.mktemp("inline")
    image = mkfs(base / "inline.img", 16, features="inline_data,metadata_csum", inode_size=512)
    with mounted(image, base / "mnt", readonly=False) as mnt:
        (mnt / "tiny").mkdir()
        for name in ("a", "bb"):
            (mnt / "tiny" / name).write_bytes(b"")
        (mnt / "spill").mkdir()
        for i in range(8):  # more than i_block's 56 bytes: spills into system.data
            (mnt / "spill" / f"inline-name-{i}").write_bytes(b"")
        os.unlink(mnt / "spill" / "inline-name-3")
        (mnt / "empty").mkdir()
    return image


@pytest.mark.parametrize("spec", ["tiny", "spill", "empty"])
def test_inline_directory(inline_image: Path, tmp_path: Path, spec: str) -> None:
    info = inode_info(inline_image, spec)
    assert info.flags & EXT4_INLINE_DATA_FL
    reader = open_directory(inline_image, spec, tmp_path)
    assert reader.inline_body is not None
    if spec == "spill":
        assert len(reader.inline_body) > 60
    got = list(reader.iterate())
    want = debugfs_ls(inline_image, spec)
    assert sorted((e.inode, e.name) for e, _ in got) == sorted(want)
    with mounted(inline_image, tmp_path / "mnt", readonly=True) as mnt:
        assert Counter(e.name for e, _ in got) == Counter(kernel_listing(mnt, spec))
    for ino, name in want:
        entry = reader.lookup(name)
        assert entry is not None and entry.inode == ino
    assert reader.lookup(b"inline-name-3") is None
    for i in range(len(got)):
        assert list(reader.iterate(got[i][1])) == got[i + 1 :]


def test_inline_directory_bad_parent(inline_image: Path, tmp_path: Path) -> None:
    reader = open_directory(inline_image, "tiny", tmp_path)
    assert reader.inline_body is not None
    reader.inline_body = b"\0\0\0\0" + reader.inline_body[4:]
    with pytest.raises(Corrupt, match="parent"):
        list(reader.iterate())
    reader.inline_body = b"\x02\0\0\0" + b"\0" * 56  # records with rec_len 0
    with pytest.raises(Corrupt, match="below minimum"):
        list(reader.iterate())
