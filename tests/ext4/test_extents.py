"""Extent trees: our ExtentMapper against debugfs and the kernel on real images.

Images are written through a kernel loop mount (fragmented files, trees of
depth 1 and 2, holes, unwritten extents, punched holes) or built by
`mkfs.ext4 -d`. Expected mappings come from `debugfs ex`; file contents from
the kernel mount.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import struct
from pathlib import Path

import pytest
from helpers_debugfs import (
    bounds_checker,
    extent_listing,
    fs_info,
    loop_mount,
    make_image,
    memory_block_reader,
    punch_hole,
    raw_inode,
    sha256_file,
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

from ext4box.ext4.format.blockrun import BlockRun
from ext4box.ext4.format.checksum import crc32c_raw, inode_csum_seed
from ext4box.ext4.format.errors import Corrupt
from ext4box.ext4.format.extents import (
    ExtentMapper,
    ExtentNodeCache,
    block_max_entries,
    extent_tail_checksum,
    parse_extent_node,
)
from support.fileops import syncfs

EXTENTS_FL = 0x80000


def _populate(mnt: Path, bs: int) -> None:
    """Files whose trees cover the shapes we care about."""
    leaf_cap = block_max_entries(bs)
    # Depth 2: more one-block extents than a depth-1 tree (4 leaves) can hold.
    # Holes at the start, between every extent and at the end (size past last block).
    deep = [3 + 2 * i for i in range(4 * leaf_cap + 40)]
    write_blocks(mnt / "deep", bs, deep, size=(deep[-1] + 7) * bs + 100)
    # Depth 1.
    medium = [2 * i for i in range(leaf_cap + 20)]
    write_blocks(mnt / "medium", bs, medium)
    # Unwritten extents mixed with written ones.
    fd = os.open(mnt / "prealloc", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.posix_fallocate(fd, 0, 300 * bs)
        for lblk in (0, 17, 18, 100, 299):
            os.pwrite(fd, b"u" * bs, lblk * bs)
        os.pwrite(fd, b"partial", 150 * bs + 9)
    finally:
        os.close(fd)
    # Contiguous file with holes punched all over it: the kernel splits extents and
    # rewrites index keys.
    write_blocks(mnt / "punched", bs, list(range(3 * leaf_cap)))
    fd = os.open(mnt / "punched", os.O_RDWR)
    try:
        os.fsync(fd)
        for lblk in range(1, 3 * leaf_cap, 3):
            punch_hole(fd, lblk * bs, bs)
    finally:
        os.close(fd)
    # Physically fragmented but logically contiguous: punch every other block and
    # write it again before the punch commits, so the freed blocks cannot be reused.
    write_blocks(mnt / "fragmented", bs, list(range(150)))
    fd = os.open(mnt / "fragmented", os.O_RDWR)
    try:
        os.fsync(fd)
        for lblk in range(1, 150, 2):
            punch_hole(fd, lblk * bs, bs)
        for lblk in range(1, 150, 2):
            os.pwrite(fd, bytes([lblk % 13 + 1]) * bs, lblk * bs)
        os.fsync(fd)
    finally:
        os.close(fd)
    (mnt / "empty").write_bytes(b"")
    (mnt / "tiny").write_bytes(b"tiny file")


FILES = ("deep", "medium", "prealloc", "punched", "fragmented", "empty", "tiny")


@pytest.fixture(scope="module", params=[1024, 4096], ids=["1k", "4k"])
def kernel_image(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> BuiltImage:
    bs = request.param
    return kernel_built(tmp_path_factory.mktemp(f"ext4-{bs}") / "ext4.img",
                        16 if bs == 1024 else 40, ("-b", str(bs), "-O", "^inline_data"), bs,
                        _populate, FILES, sha256_file)


@pytest.fixture(scope="module")
def mkfs_d_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    return mkfs_d_built(tmp_path_factory, seed=7, plain=300_000,
                        sparse=(200_000, 50_000, 900_000, 1_200_000), mkfs_args=("-b", "1024"),
                        digest=sha256_file)


def _mapper(image: BuiltImage, name: str, *, data: bytes | bytearray | None = None,
            i_block: bytes | None = None, checksums: bool = True,
            read_block=None) -> ExtentMapper:
    inode = cached_inode(image, name)
    assert inode.flags & EXTENTS_FL
    seed = None
    if checksums and image.info.metadata_csum:
        seed = inode_csum_seed(image.info.csum_seed, inode.ino, inode.generation)
    bs = image.info.block_size
    return ExtentMapper(
        ino=inode.ino, i_block=inode.i_block if i_block is None else i_block,
        read_block=read_block or memory_block_reader(data or image.data, bs), block_size=bs,
        csum_seed=seed, check_run=bounds_checker(image.info.blocks_count))


def _expected_table(leaves: list[tuple[int, int, int, bool]], nblocks: int
                    ) -> list[tuple[int | None, bool]]:
    """Per logical block (pblk or None, unwritten), built from debugfs's listing."""
    table: list[tuple[int | None, bool]] = [(None, False)] * nblocks
    for lblk, length, pblk, unwritten in leaves:
        for i in range(length):
            if lblk + i < nblocks:
                table[lblk + i] = (pblk + i, unwritten)
    return table


def _runs_to_table(runs: list[BlockRun]) -> list[tuple[int | None, bool]]:
    table: list[tuple[int | None, bool]] = []
    for run in runs:
        for i in range(run.length):
            table.append((None, False) if run.pblk is None else (run.pblk + i, run.unwritten))
    return table


def _assert_well_formed(runs: list[BlockRun], lblk: int, count: int) -> None:
    cur = lblk
    for i, run in enumerate(runs):
        assert run.lblk == cur and run.length > 0
        if i:
            prev = runs[i - 1]
            contiguous = (prev.pblk is None and run.pblk is None) or (
                prev.pblk is not None and run.pblk is not None
                and prev.pblk + prev.length == run.pblk)
            assert not (contiguous and prev.unwritten == run.unwritten), (prev, run)
        cur = run.end
    assert cur == lblk + count


def _content_hash(image: BuiltImage, runs: list[BlockRun], size: int) -> str:
    bs = image.info.block_size
    body = bytearray()
    for run in runs:
        if run.pblk is None or run.unwritten:
            body += bytes(run.length * bs)
        else:
            body += image.data[run.pblk * bs:(run.pblk + run.length) * bs]
    return hashlib.sha256(bytes(body[:size])).hexdigest()


def _check_file(image: BuiltImage, name: str) -> ExtentMapper:
    listing = extent_listing(image.path, "/" + name)
    mapper = _mapper(image, name)
    bs = image.info.block_size
    nblocks = -(-image.sizes[name] // bs) + 3  # a little past EOF: holes there too
    assert mapper.depth == listing.depth
    assert [(r.lblk, r.length, r.pblk, r.unwritten) for r in mapper.extents()] == listing.leaves
    assert mapper.tree_blocks() == listing.node_blocks
    runs = mapper.map(0, nblocks)
    _assert_well_formed(runs, 0, nblocks)
    assert _runs_to_table(runs) == _expected_table(listing.leaves, nblocks)
    assert _content_hash(image, runs, image.sizes[name]) == image.hashes[name]
    return mapper


@pytest.mark.kernel
@pytest.mark.parametrize("name", FILES)
def test_map_matches_debugfs_and_kernel(kernel_image: BuiltImage, name: str) -> None:
    _check_file(kernel_image, name)


@pytest.mark.kernel
def test_tree_shapes_were_produced(kernel_image: BuiltImage) -> None:
    """Guard the fixture itself: the shapes the other tests rely on exist."""
    assert _mapper(kernel_image, "deep").depth >= 2
    assert _mapper(kernel_image, "medium").depth == 1
    prealloc = list(_mapper(kernel_image, "prealloc").extents())
    assert any(r.unwritten for r in prealloc) and any(not r.unwritten for r in prealloc)
    fragmented = list(_mapper(kernel_image, "fragmented").extents())
    assert any(a.end == b.lblk and a.pblk + a.length != b.pblk
               for a, b in itertools.pairwise(fragmented))
    assert list(_mapper(kernel_image, "empty").extents()) == []


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["deep", "punched", "prealloc"])
def test_random_windows_match_debugfs(kernel_image: BuiltImage, name: str) -> None:
    listing = extent_listing(kernel_image.path, "/" + name)
    bs = kernel_image.info.block_size
    nblocks = -(-kernel_image.sizes[name] // bs) + 10
    table = _expected_table(listing.leaves, nblocks)
    mapper = _mapper(kernel_image, name)
    rng = random.Random(name)
    for _ in range(200):
        lblk = rng.randrange(nblocks)
        count = rng.randrange(0, nblocks - lblk + 1)
        runs = mapper.map(lblk, count)
        _assert_well_formed(runs, lblk, count)
        assert _runs_to_table(runs) == table[lblk:lblk + count]


@pytest.mark.kernel
def test_sequential_small_maps_reuse_the_path(kernel_image: BuiltImage) -> None:
    reads: list[int] = []
    base = memory_block_reader(kernel_image.data, kernel_image.info.block_size)

    def counting_read(block: int) -> bytes:
        reads.append(block)
        return base(block)

    mapper = _mapper(kernel_image, "deep", read_block=counting_read)
    nblocks = -(-kernel_image.sizes["deep"] // kernel_image.info.block_size)
    tiled: list[BlockRun] = []
    for lblk in range(nblocks):
        tiled += mapper.map(lblk, 1)
    assert _runs_to_table(tiled) == _runs_to_table(mapper.map(0, nblocks))
    tree = _mapper(kernel_image, "deep").tree_blocks()
    # Each tree block is read once on the way through: the path stays cached.
    assert sorted(reads) == sorted(tree)


def test_mkfs_d_files(mkfs_d_image: BuiltImage) -> None:
    for name in ("plain", "sparse"):
        _check_file(mkfs_d_image, name)


def test_map_beyond_32bit_logical_space_is_hole(mkfs_d_image: BuiltImage) -> None:
    mapper = _mapper(mkfs_d_image, "plain")
    assert mapper.map((1 << 32) - 2, 5) == [BlockRun((1 << 32) - 2, 5, None)]
    assert mapper.map(3, 0) == []
    with pytest.raises(ValueError):
        mapper.map(-1, 2)


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["deep", "medium", "punched"])
def test_nodes_round_trip(kernel_image: BuiltImage, name: str) -> None:
    """parse -> build gives back the image's bytes, and our tail checksum is the image's."""
    mapper = _mapper(kernel_image, name)
    bs = kernel_image.info.block_size
    root = mapper.root
    rebuilt = root.header.build() + b"".join(e.build() for e in root.indexes + root.extents)
    assert rebuilt == raw_inode(kernel_image.path, "/" + name, kernel_image.info).i_block[
        :len(rebuilt)]
    inode = raw_inode(kernel_image.path, "/" + name, kernel_image.info)
    seed = inode_csum_seed(kernel_image.info.csum_seed, inode.ino, inode.generation)
    for block in mapper.tree_blocks():
        raw = kernel_image.data[block * bs:(block + 1) * bs]
        node = parse_extent_node(raw, ino=inode.ino, block=block,
                                 max_entries=block_max_entries(bs), expect_depth=None, first=0,
                                 limit=1 << 32, csum_seed=seed, check_run=lambda p, n: None)
        rebuilt = node.header.build() + b"".join(e.build() for e in node.indexes + node.extents)
        assert rebuilt == raw[:len(rebuilt)]
        tail = 12 + 12 * node.header.max_entries
        assert extent_tail_checksum(seed, raw, node.header.max_entries) == struct.unpack_from(
            "<I", raw, tail)[0]


# ---- corruption: always Corrupt, never another exception, never a hang ----

_HEADER = struct.Struct("<HHHHI")
_ENTRY_LEAF = struct.Struct("<IHHI")
_ENTRY_INDEX = struct.Struct("<IIHH")


@pytest.fixture(scope="module")
def deep_1k(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A 1k-block image with one depth-2 file (metadata_csum on)."""
    path = make_image(tmp_path_factory.mktemp("corrupt") / "c.img", 8, "-b", "1024")
    with loop_mount(path) as mnt:
        write_blocks(mnt / "deep", 1024, [1 + 2 * i for i in range(400)])
        syncfs(mnt)
        size = (mnt / "deep").stat().st_size
    image = BuiltImage(path, path.read_bytes(), fs_info(path), {}, {"deep": size})
    assert _mapper(image, "deep").depth == 2
    return image


def _reseal(image: BuiltImage, data: bytearray, block: int) -> None:
    """Recompute a tree block's tail so a structural corruption gets past the checksum."""
    inode = cached_inode(image, "deep")
    seed = inode_csum_seed(image.info.csum_seed, inode.ino, inode.generation)
    bs = image.info.block_size
    eh_max = _HEADER.unpack_from(data, block * bs)[2]
    tail = block * bs + 12 + 12 * eh_max
    struct.pack_into("<I", data, tail, crc32c_raw(seed, bytes(data[block * bs:tail])))


def _full_walk(mapper: ExtentMapper, nblocks: int) -> None:
    mapper.map(0, nblocks)
    list(mapper.extents())
    mapper.tree_blocks()


def _tree(image: BuiltImage) -> tuple[int, list[int]]:
    """(index block at depth 1, leaf blocks) of the deep file."""
    key = (image.path, "tree")
    if key not in DEBUGFS_CACHE:
        listing = extent_listing(image.path, "/deep")
        DEBUGFS_CACHE[key] = (listing.node_blocks[0], listing.node_blocks[1:])
    return DEBUGFS_CACHE[key]


def test_flipped_byte_in_leaf_fails_checksum(deep_1k: BuiltImage) -> None:
    _, leaves = _tree(deep_1k)
    data = bytearray(deep_1k.data)
    data[leaves[0] * 1024 + 12 + 5] ^= 0x40
    mapper = _mapper(deep_1k, "deep", data=data)
    with pytest.raises(Corrupt, match="checksum") as info:
        mapper.map(0, 10)
    assert f"block {leaves[0]}" in info.value.where and "inode" in info.value.where


def test_root_depth_6(deep_1k: BuiltImage) -> None:
    i_block = bytearray(cached_inode(deep_1k, "deep").i_block)
    struct.pack_into("<H", i_block, 6, 6)
    with pytest.raises(Corrupt, match="depth"):
        _full_walk(_mapper(deep_1k, "deep", i_block=bytes(i_block)), 1000)


@pytest.mark.parametrize(("entries", "eh_max", "why"), [
    (5, 4, "eh_entries"), (2, 5, "eh_max"), (0, 0, "eh_max"), (0, 4, "without entries")])
def test_root_counts(deep_1k: BuiltImage, entries: int, eh_max: int, why: str) -> None:
    i_block = bytearray(cached_inode(deep_1k, "deep").i_block)
    struct.pack_into("<HH", i_block, 2, entries, eh_max)
    with pytest.raises(Corrupt, match=why):
        _full_walk(_mapper(deep_1k, "deep", i_block=bytes(i_block)), 1000)


def test_extent_crossing_2_pow_32(mkfs_d_image: BuiltImage) -> None:
    i_block = bytearray(cached_inode(mkfs_d_image, "plain").i_block)
    assert struct.unpack_from("<H", i_block, 6)[0] == 0  # a leaf root
    struct.pack_into("<IH", i_block, 12, (1 << 32) - 1, 2)
    with pytest.raises(Corrupt, match="outside"):
        _mapper(mkfs_d_image, "plain", i_block=bytes(i_block))


def test_block_entries_over_max(deep_1k: BuiltImage) -> None:
    _, leaves = _tree(deep_1k)
    data = bytearray(deep_1k.data)
    struct.pack_into("<H", data, leaves[0] * 1024 + 2, 85)
    _reseal(deep_1k, data, leaves[0])
    with pytest.raises(Corrupt, match="eh_max"):
        _full_walk(_mapper(deep_1k, "deep", data=data), 1000)


def test_bad_magic(deep_1k: BuiltImage) -> None:
    _, leaves = _tree(deep_1k)
    data = bytearray(deep_1k.data)
    struct.pack_into("<H", data, leaves[1] * 1024, 0x1234)
    with pytest.raises(Corrupt, match="magic"):
        _full_walk(_mapper(deep_1k, "deep", data=data, checksums=False), 1000)


def test_index_pointing_to_itself(deep_1k: BuiltImage) -> None:
    index_block, _ = _tree(deep_1k)
    data = bytearray(deep_1k.data)
    struct.pack_into("<IH", data, index_block * 1024 + 12 + 4, index_block, 0)
    _reseal(deep_1k, data, index_block)
    with pytest.raises(Corrupt, match="depth"):
        _full_walk(_mapper(deep_1k, "deep", data=data), 1000)


def test_two_indexes_to_one_empty_leaf(deep_1k: BuiltImage) -> None:
    """A DAG passes per-node range checks if the shared leaf is empty; walks must refuse it."""
    index_block, leaves = _tree(deep_1k)
    data = bytearray(deep_1k.data)
    struct.pack_into("<H", data, leaves[0] * 1024 + 2, 0)  # leaf 0 now empty
    _reseal(deep_1k, data, leaves[0])
    struct.pack_into("<I", data, index_block * 1024 + 12 + 12 + 4, leaves[0])  # slot 1 -> leaf 0
    _reseal(deep_1k, data, index_block)
    mapper = _mapper(deep_1k, "deep", data=data)
    with pytest.raises(Corrupt, match="twice"):
        list(mapper.extents())
    with pytest.raises(Corrupt, match="twice"):
        mapper.tree_blocks()


@pytest.mark.parametrize("shape", ["overlap", "unsorted", "zero_length", "outside_index"])
def test_bad_leaf_entries(deep_1k: BuiltImage, shape: str) -> None:
    _, leaves = _tree(deep_1k)
    data = bytearray(deep_1k.data)
    base = leaves[1] * 1024 + 12
    lblk0, len0, _hi, _lo = _ENTRY_LEAF.unpack_from(data, base)
    if shape == "overlap":
        struct.pack_into("<I", data, base + 12, lblk0 + len0 - 1)
    elif shape == "unsorted":
        struct.pack_into("<I", data, base + 12, lblk0 - 1)
    elif shape == "zero_length":
        struct.pack_into("<H", data, base + 4, 0)
    else:
        struct.pack_into("<I", data, base, 0)  # before the index key of this leaf
    _reseal(deep_1k, data, leaves[1])
    with pytest.raises(Corrupt):
        _full_walk(_mapper(deep_1k, "deep", data=data), 1000)


def test_unsorted_index(deep_1k: BuiltImage) -> None:
    index_block, _ = _tree(deep_1k)
    data = bytearray(deep_1k.data)
    key0 = struct.unpack_from("<I", data, index_block * 1024 + 12)[0]
    struct.pack_into("<I", data, index_block * 1024 + 24, key0)
    _reseal(deep_1k, data, index_block)
    with pytest.raises(Corrupt, match="outside"):
        _full_walk(_mapper(deep_1k, "deep", data=data), 1000)


@pytest.mark.parametrize("where", ["extent", "index"])
def test_pointer_past_device(deep_1k: BuiltImage, where: str) -> None:
    index_block, leaves = _tree(deep_1k)
    data = bytearray(deep_1k.data)
    past = deep_1k.info.blocks_count + 10
    if where == "extent":
        struct.pack_into("<HI", data, leaves[0] * 1024 + 12 + 6, 0, past)
        _reseal(deep_1k, data, leaves[0])
    else:
        struct.pack_into("<I", data, index_block * 1024 + 12 + 4, past)
        _reseal(deep_1k, data, index_block)
    with pytest.raises(Corrupt, match="outside the device"):
        _full_walk(_mapper(deep_1k, "deep", data=data), 1000)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_corruption_only_corrupt(deep_1k: BuiltImage, data: st.DataObject) -> None:
    """Random byte damage anywhere in the tree: a clean answer or Corrupt, nothing else."""
    index_block, leaves = _tree(deep_1k)
    image = bytearray(deep_1k.data)
    i_block = bytearray(cached_inode(deep_1k, "deep").i_block)
    checksums = data.draw(st.booleans())
    for _ in range(data.draw(st.integers(1, 6))):
        target = data.draw(st.sampled_from(["root", "index", "leaf"]))
        value = data.draw(st.integers(0, 255))
        if target == "root":
            i_block[data.draw(st.integers(0, 59))] = value
        else:
            block = index_block if target == "index" else data.draw(st.sampled_from(leaves))
            image[block * 1024 + data.draw(st.integers(0, 1023))] = value
    try:
        mapper = _mapper(deep_1k, "deep", data=image, i_block=bytes(i_block),
                         checksums=checksums)
        runs = mapper.map(0, 1000)
        _assert_well_formed(runs, 0, 1000)
        list(mapper.extents())
        mapper.tree_blocks()
    except Corrupt:
        pass


# ---- the shared node cache ----------------------------------------------------


def test_node_cache_answers_only_for_the_bytes_it_parsed(deep_1k: BuiltImage) -> None:
    """A cached leaf is returned for the same bytes (even a copy of them); once the
    block holds other bytes, the cache gives what parse_extent_node gives for them,
    and an image's corruption is still Corrupt through the cache."""
    _, leaves = _tree(deep_1k)
    leaf = leaves[0]
    inode = cached_inode(deep_1k, "deep")
    seed = inode_csum_seed(deep_1k.info.csum_seed, inode.ino, inode.generation)
    bs = deep_1k.info.block_size
    data = bytearray(deep_1k.data)
    args = dict(ino=inode.ino, block=leaf, max_entries=block_max_entries(bs), expect_depth=0,
                first=0, limit=1 << 32, csum_seed=seed,
                check_run=bounds_checker(deep_1k.info.blocks_count))
    cache = ExtentNodeCache(4)
    raw = bytes(data[leaf * bs:(leaf + 1) * bs])
    first = cache.parse(raw, **args)
    assert first == parse_extent_node(raw, **args)
    assert cache.parse(bytearray(raw), **args) is first  # equal bytes: the cached node

    entries = _HEADER.unpack_from(data, leaf * bs)[1]
    struct.pack_into("<H", data, leaf * bs + 2, entries - 1)  # one extent fewer
    _reseal(deep_1k, data, leaf)
    fewer = bytes(data[leaf * bs:(leaf + 1) * bs])
    shorter = cache.parse(fewer, **args)
    assert shorter == parse_extent_node(fewer, **args)
    assert len(shorter.extents) == len(first.extents) - 1
    assert cache.parse(raw, **args) == first  # back to the first bytes: their parse

    flipped = bytearray(raw)
    flipped[20] ^= 0xFF
    with pytest.raises(Corrupt):
        cache.parse(bytes(flipped), **args)
