"""Indirect block maps: our BlockMapMapper against debugfs and the kernel.

Images are ext3 (1k blocks) and ext4 without extents (4k blocks), written
through a kernel loop mount (direct, single, double and triple indirect
ranges, holes at every level, physically interleaved files) or built by
`mkfs.ext4 -t ext3 -d`. Expected mappings come from the BLOCKS section of
`debugfs stat`; contents from the kernel mount.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
from helpers_debugfs import (
    SparseDigest,
    block_listing,
    bounds_checker,
    memory_block_reader,
    sparse_file_digest,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mapped_images import (
    DEBUGFS_CACHE,
    BuiltImage,
    cached_inode,
    kernel_built,
    mkfs_d_built,
    write_blocks,
)

from ext4box.ext4.format.blockmap import BlockMapMapper
from ext4box.ext4.format.blockrun import BlockRun, append_merged
from ext4box.ext4.format.errors import Corrupt

EXTENTS_FL = 0x80000


def _tree_starts(bs: int) -> tuple[int, int, int]:
    per = bs // 4
    return 12, 12 + per, 12 + per + per * per


def _populate(mnt: Path, bs: int) -> None:
    ind, dind, tind = _tree_starts(bs)
    per = bs // 4
    # Something in every tree, holes at every level, size past the last block.
    levels = [0, 5, 6, 7, 11, ind, ind + 1, ind + 2, ind + per - 1,
              dind + 3, dind + per + 7, dind + 5 * per, tind + 2, tind + per * per + per + 1]
    write_blocks(mnt / "levels", bs, levels, size=(levels[-1] + 4) * bs + 1)
    # Contiguous across the direct/IND and IND/DIND boundaries.
    write_blocks(mnt / "contiguous", bs, list(range(dind + 40)))
    # Two files written block by block, synced in turn, so they interleave on disk.
    fds = [os.open(mnt / name, os.O_CREAT | os.O_WRONLY | os.O_SYNC, 0o644)
           for name in ("left", "right")]
    try:
        for lblk in range(60):
            for fd in fds:
                os.pwrite(fd, bytes([lblk + 1]) * bs, lblk * bs)
    finally:
        for fd in fds:
            os.close(fd)
    (mnt / "empty").write_bytes(b"")
    (mnt / "tiny").write_bytes(b"tiny file")


FILES = ("levels", "contiguous", "left", "right", "empty", "tiny")

_IMAGES = {
    "ext3-1k": (1024, 16, ("-t", "ext3", "-b", "1024")),
    "ext4-noextent-4k": (4096, 32, ("-b", "4096", "-O", "^extent,^64bit,^inline_data")),
}


@pytest.fixture(scope="module", params=sorted(_IMAGES))
def kernel_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> BuiltImage:
    bs, size_mb, mkfs_args = _IMAGES[request.param]
    return kernel_built(tmp_path_factory.mktemp(request.param) / "bm.img", size_mb, mkfs_args,
                        bs, _populate, FILES, lambda p: sparse_file_digest(p, bs))


@pytest.fixture(scope="module")
def mkfs_d_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return mkfs_d_built(tmp_path_factory, seed=11, plain=400_000,
                        sparse=(100_000, 30_000, 2_000_000, 2_500_000),
                        mkfs_args=("-t", "ext3", "-b", "1024"),
                        digest=lambda p: sparse_file_digest(p, 1024))


def _mapper(image: BuiltImage, name: str, *, data: bytes | bytearray | None = None,
            i_block: bytes | None = None) -> BlockMapMapper:
    inode = cached_inode(image, name)
    assert not inode.flags & EXTENTS_FL
    bs = image.info.block_size
    return BlockMapMapper(
        ino=inode.ino, i_block=inode.i_block if i_block is None else i_block,
        read_block=memory_block_reader(image.data if data is None else data, bs),
        block_size=bs, check_run=bounds_checker(image.info.blocks_count))


def _expected(listing_data: list[tuple[int, int, int]], lblk: int, count: int
              ) -> list[int | None]:
    """Per logical block in [lblk, lblk+count): pblk or None, from debugfs's listing."""
    table: list[int | None] = [None] * count
    for first, length, pblk in listing_data:
        for i in range(length):
            if lblk <= first + i < lblk + count:
                table[first + i - lblk] = pblk + i
    return table


def _runs_to_table(runs: list[BlockRun]) -> list[int | None]:
    table: list[int | None] = []
    for run in runs:
        assert not run.unwritten
        table += [None] * run.length if run.pblk is None else [
            run.pblk + i for i in range(run.length)]
    return table


def _assert_well_formed(runs: list[BlockRun], lblk: int, count: int) -> None:
    cur = lblk
    for i, run in enumerate(runs):
        assert run.lblk == cur and run.length > 0
        if i:
            prev = runs[i - 1]
            assert not (prev.pblk is None and run.pblk is None)
            assert not (prev.pblk is not None and run.pblk is not None
                        and prev.pblk + prev.length == run.pblk)
        cur = run.end
    assert cur == lblk + count


def _check_file(image: BuiltImage, name: str) -> BlockMapMapper:
    listing = block_listing(image.path, "/" + name)
    mapper = _mapper(image, name)
    bs = image.info.block_size
    nblocks = -(-image.sizes[name] // bs) + 3
    runs = mapper.map(0, nblocks)
    _assert_well_formed(runs, 0, nblocks)
    assert _runs_to_table(runs) == _expected(listing.data, 0, nblocks)
    assert mapper.tree_blocks() == listing.tree_blocks
    # extents(): the same mapped blocks, merged the same way as map() merges them.
    merged: list[BlockRun] = []
    for first, length, pblk in listing.data:
        append_merged(merged, BlockRun(first, length, pblk))
    assert list(mapper.extents()) == merged
    digest = SparseDigest(bs)
    size = image.sizes[name]
    for run in runs:
        if run.pblk is not None:
            length = min(run.length, -(-size // bs) - run.lblk)
            body = bytearray(image.data[run.pblk * bs:(run.pblk + length) * bs])
            if (run.lblk + length) * bs > size:  # bytes past EOF in the last block read as 0
                body[size - run.lblk * bs:] = bytes(len(body) - (size - run.lblk * bs))
            digest.add(run.lblk, bytes(body))
    assert digest.hexdigest() == image.hashes[name]
    return mapper


@pytest.mark.kernel
@pytest.mark.parametrize("name", FILES)
def test_map_matches_debugfs_and_kernel(kernel_image: BuiltImage, name: str) -> None:
    _check_file(kernel_image, name)


@pytest.mark.kernel
def test_fixture_shapes(kernel_image: BuiltImage) -> None:
    levels = block_listing(kernel_image.path, "/levels")
    assert len(levels.tree_blocks) >= 1 + 3 + 4  # IND, DIND + 2 IND, TIND + DIND + 2 IND ...
    left = list(_mapper(kernel_image, "left").extents())
    assert len(left) > 1  # physically interleaved with "right"


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["levels", "contiguous", "left"])
def test_random_windows_match_debugfs(kernel_image: BuiltImage, name: str) -> None:
    listing = block_listing(kernel_image.path, "/" + name)
    bs = kernel_image.info.block_size
    nblocks = -(-kernel_image.sizes[name] // bs) + 10
    mapper = _mapper(kernel_image, name)
    rng = random.Random(name)
    points = sorted({first for first, _, _ in listing.data})
    for _ in range(150):
        # Windows near mapped blocks, and anywhere (most of "levels" is hole).
        lblk = rng.choice(points) + rng.randrange(-20, 20) if rng.random() < 0.7 else (
            rng.randrange(nblocks))
        lblk = max(0, min(lblk, nblocks - 1))
        count = rng.randrange(0, min(5000, nblocks - lblk) + 1)
        runs = mapper.map(lblk, count)
        _assert_well_formed(runs, lblk, count)
        assert _runs_to_table(runs) == _expected(listing.data, lblk, count)


def test_mkfs_d_files(mkfs_d_image: BuiltImage) -> None:
    for name in ("plain", "sparse"):
        _check_file(mkfs_d_image, name)


def test_beyond_addressable_is_hole(mkfs_d_image: BuiltImage) -> None:
    mapper = _mapper(mkfs_d_image, "plain")
    assert mapper.limit == 12 + 256 + 256**2 + 256**3
    assert mapper.map(mapper.limit - 1, 10) == [BlockRun(mapper.limit - 1, 10, None)]
    assert mapper.map(0, 0) == []
    with pytest.raises(ValueError):
        mapper.map(0, -1)


# ---- corruption: always Corrupt, never another exception, never a hang ----


def _ptr(data: bytes | bytearray, block: int, slot: int, bs: int) -> int:
    return struct.unpack_from("<I", data, block * bs + 4 * slot)[0]


@pytest.mark.kernel
def test_direct_pointer_past_device(kernel_image: BuiltImage) -> None:
    i_block = bytearray(cached_inode(kernel_image, "levels").i_block)
    struct.pack_into("<I", i_block, 5 * 4, kernel_image.info.blocks_count)
    mapper = _mapper(kernel_image, "levels", i_block=bytes(i_block))
    with pytest.raises(Corrupt, match="outside the device"):
        mapper.map(0, 20)
    assert mapper.map(0, 5)[0].pblk is not None  # the rest of the map still answers


@pytest.mark.kernel
@pytest.mark.parametrize("slot", [12, 13, 14])
def test_indirect_pointer_past_device(kernel_image: BuiltImage, slot: int) -> None:
    i_block = bytearray(cached_inode(kernel_image, "levels").i_block)
    struct.pack_into("<I", i_block, slot * 4, kernel_image.info.blocks_count + 5)
    mapper = _mapper(kernel_image, "levels", i_block=bytes(i_block))
    with pytest.raises(Corrupt):
        mapper.map(0, mapper.limit)
    with pytest.raises(Corrupt):
        mapper.tree_blocks()


@pytest.mark.kernel
def test_data_pointer_in_indirect_block_past_device(kernel_image: BuiltImage) -> None:
    bs = kernel_image.info.block_size
    ind_block = cached_inode(kernel_image, "levels").i_block[48:52]
    ind = int.from_bytes(ind_block, "little")
    data = bytearray(kernel_image.data)
    struct.pack_into("<I", data, ind * bs + 4, 0xFFFFFFFF)
    with pytest.raises(Corrupt, match="outside the device"):
        _mapper(kernel_image, "levels", data=data).map(0, 100)


@pytest.mark.kernel
def test_double_indirect_pointing_to_itself(kernel_image: BuiltImage) -> None:
    bs = kernel_image.info.block_size
    dind = int.from_bytes(cached_inode(kernel_image, "levels").i_block[52:56], "little")
    data = bytearray(kernel_image.data)
    struct.pack_into("<I", data, dind * bs, dind)
    mapper = _mapper(kernel_image, "levels", data=data)
    with pytest.raises(Corrupt, match="twice"):
        mapper.map(0, mapper.limit)
    with pytest.raises(Corrupt, match="twice"):
        mapper.tree_blocks()


@pytest.mark.kernel
def test_triple_indirect_fan_in_is_refused_quickly(kernel_image: BuiltImage) -> None:
    """Every TIND/DIND slot naming one full IND block would mean per^3 pointers to walk."""
    bs = kernel_image.info.block_size
    per = bs // 4
    i_block = bytearray(cached_inode(kernel_image, "levels").i_block)
    tind = int.from_bytes(i_block[56:60], "little")
    dind = _ptr(kernel_image.data, tind, 0, bs)
    ind = _ptr(kernel_image.data, dind, 0, bs)
    data = bytearray(kernel_image.data)
    data[tind * bs:(tind + 1) * bs] = struct.pack(f"<{per}I", *[dind] * per)
    data[dind * bs:(dind + 1) * bs] = struct.pack(f"<{per}I", *[ind] * per)
    mapper = _mapper(kernel_image, "levels", data=data)
    with pytest.raises(Corrupt, match="twice"):
        mapper.map(0, mapper.limit)
    with pytest.raises(Corrupt, match="twice"):
        list(mapper.extents())
    with pytest.raises(Corrupt, match="twice"):
        mapper.tree_blocks()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_corruption_only_corrupt(mkfs_d_image: BuiltImage, data: st.DataObject) -> None:
    """Random damage to i_block and the indirect blocks: a clean answer or Corrupt."""
    bs = mkfs_d_image.info.block_size
    tree = DEBUGFS_CACHE.setdefault(
        (mkfs_d_image.path, "tree"), block_listing(mkfs_d_image.path, "/plain").tree_blocks)
    image = bytearray(mkfs_d_image.data)
    i_block = bytearray(cached_inode(mkfs_d_image, "plain").i_block)
    for _ in range(data.draw(st.integers(1, 6))):
        value = data.draw(st.integers(0, 0xFFFFFFFF))
        if data.draw(st.booleans()):
            struct.pack_into("<I", i_block, 4 * data.draw(st.integers(0, 14)), value)
        else:
            block = data.draw(st.sampled_from(tree))
            struct.pack_into("<I", image, block * bs + 4 * data.draw(st.integers(0, bs // 4 - 1)),
                             value % (mkfs_d_image.info.blocks_count + 50))
    mapper = _mapper(mkfs_d_image, "plain", data=image, i_block=bytes(i_block))
    try:
        runs = mapper.map(0, 2000)
        _assert_well_formed(runs, 0, 2000)
        list(mapper.extents())
        mapper.tree_blocks()
    except Corrupt:
        pass
