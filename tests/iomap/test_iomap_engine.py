"""The iomap engine over files the kernel wrote: mappings, coalescing, reads."""

from __future__ import annotations

import itertools
import random
import re
import subprocess
from pathlib import Path

import pytest
from iomap_support import BLOCK, Extent, KernelImage, Opened, open_image

from ext4box.ext4.format.errors import ReadOnly
from ext4box.iomap.types import IOMap, IOMapKind


def _inode(opened: Opened, name: str):
    return opened.fs.inode(opened.fs.lookup(2, name.encode()))


def _expected_maps(extents: list[Extent], pos: int, length: int, block: int = BLOCK) -> list[IOMap]:
    """The byte mappings debugfs's extent list implies for [pos, pos+length)."""
    end = pos + length
    first, last = pos // block, -(-end // block)
    per_block: list[tuple[IOMapKind, int | None]] = []
    for lblk in range(first, last):
        kind, addr = IOMapKind.HOLE, None
        for ext in extents:
            if ext.lblk <= lblk < ext.lblk + ext.length:
                kind = IOMapKind.UNWRITTEN if ext.unwritten else IOMapKind.MAPPED
                addr = (ext.pblk + lblk - ext.lblk) * block
        per_block.append((kind, addr))
    maps: list[IOMap] = []
    for index, (kind, addr) in enumerate(per_block):
        start = max((first + index) * block, pos)
        stop = min((first + index + 1) * block, end)
        if addr is not None:
            addr += start - (first + index) * block
        if (
            maps
            and maps[-1].kind is kind
            and (addr is None or maps[-1].addr + maps[-1].length == addr)
        ):
            prev = maps[-1]
            maps[-1] = IOMap(kind, prev.offset, prev.length + stop - start, prev.addr)
        else:
            maps.append(IOMap(kind, start, stop - start, addr))
    return maps


def test_fragmented_file_has_every_kind(kernel_image: KernelImage) -> None:
    extents = kernel_image.extents["frag"]
    assert len(extents) > 4, "the fragmenting write pattern did not fragment"
    assert any(e.unwritten for e in extents)


@pytest.mark.parametrize(
    ("pos", "length"),
    [
        (0, 50 * BLOCK + 1234),
        (1, 1),
        (5 * BLOCK - 1, 3 * BLOCK),
        (29 * BLOCK + 7, 2 * BLOCK),
        (37 * BLOCK, 20 * BLOCK),
        (100, 20 * BLOCK + 5),
    ],
)
def test_begin_matches_debugfs(
    opened: Opened, kernel_image: KernelImage, pos: int, length: int
) -> None:
    inode = _inode(opened, "frag")
    maps = opened.engine.begin(inode, pos, length)
    assert maps == _expected_maps(kernel_image.extents["frag"], pos, length)
    assert sum(m.length for m in maps) == length and maps[0].offset == pos


def test_begin_kinds(opened: Opened) -> None:
    inode = _inode(opened, "frag")
    kinds = {m.kind for m in opened.engine.begin(inode, 0, inode.size)}
    assert kinds == {IOMapKind.MAPPED, IOMapKind.HOLE, IOMapKind.UNWRITTEN}


def test_begin_write_is_refused_for_now(opened: Opened) -> None:
    with pytest.raises(ReadOnly):
        opened.engine.begin(_inode(opened, "frag"), 0, 1, write=True)


def test_plan_coalesces_physically_adjacent_ranges(
    opened: Opened, kernel_image: KernelImage
) -> None:
    inode = _inode(opened, "frag")
    plan = opened.engine.plan_read(inode, 0, inode.size)
    mapped = [
        m
        for m in _expected_maps(kernel_image.extents["frag"], 0, inode.size)
        if m.kind is IOMapKind.MAPPED
    ]
    # One device segment per run of device-contiguous MAPPED ranges.
    groups = 1 + sum(1 for a, b in itertools.pairwise(mapped) if a.addr + a.length != b.addr)
    assert len(plan.segments) == groups
    assert plan.segments[0].addr == mapped[0].addr
    assert sum(s.length for s in plan.segments) == sum(m.length for m in mapped)

    contig = _inode(opened, "contig")
    assert len(kernel_image.extents["contig"]) >= 1
    plan = opened.engine.plan_read(contig, 0, contig.size)
    assert len(plan.segments) == 1 and plan.segments[0].slices == ((0, contig.size),)


def test_reads_match_kernel_at_unaligned_offsets(opened: Opened, kernel_image: KernelImage) -> None:
    rng = random.Random(7)
    for name, expected in kernel_image.contents.items():
        inode = _inode(opened, name)
        assert opened.engine.read(inode, 0, inode.size + 10) == expected, name
        for _ in range(60):
            pos = rng.randrange(0, len(expected) + 2 * BLOCK)
            size = rng.choice([1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 128 * 1024])
            assert opened.engine.read(inode, pos, size) == expected[pos : pos + size], (
                name,
                pos,
                size,
            )


def test_read_clips_at_eof(opened: Opened, kernel_image: KernelImage) -> None:
    inode = _inode(opened, "frag")
    size = inode.size
    assert opened.engine.read(inode, size, 100) == b""
    assert opened.engine.read(inode, size + 5 * BLOCK, 100) == b""
    tail = opened.engine.read(inode, size - 10, 1 << 20)
    assert tail == kernel_image.contents["frag"][-10:] == bytes(10)  # EOF sits in a hole
    assert opened.engine.read(inode, 0, 0) == b""


def test_holes_and_unwritten_read_as_zeros(opened: Opened) -> None:
    inode = _inode(opened, "frag")
    assert opened.engine.read(inode, 5 * BLOCK, 2 * BLOCK) == bytes(2 * BLOCK)  # punched
    assert opened.engine.read(inode, 30 * BLOCK, 8 * BLOCK) == bytes(8 * BLOCK)  # unwritten
    assert opened.engine.read(inode, 24 * BLOCK, 6 * BLOCK) == bytes(6 * BLOCK)  # never written


def _debugfs_block_maps(image: Path, path: str, size: int, block_size: int) -> list[IOMap]:
    """Expected mappings from `debugfs stat` (works for extents and block maps alike)."""
    out = subprocess.run(
        ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, check=True
    ).stdout
    listing = out.split("EXTENTS:" if "EXTENTS:" in out else "BLOCKS:", 1)[1]
    extents = [
        Extent(int(first), int(last or first) - int(first) + 1, int(pblk), False)
        for first, last, pblk in re.findall(r"\((\d+)(?:-(\d+))?\):(\d+)", listing)
    ]
    return _expected_maps(extents, 0, size, block_size)


class _CountingSource:
    """The real facade, counting how often the engine walks a mapping."""

    def __init__(self, fs) -> None:
        self.fs = fs
        self.block_size = fs.block_size
        self.calls = 0

    def map_blocks(self, inode, lblk, count):
        self.calls += 1
        return self.fs.map_blocks(inode, lblk, count)

    def inline_data(self, inode):
        return self.fs.inline_data(inode)


def test_mapping_cache_serves_sequential_reads(kernel_image: KernelImage) -> None:
    from ext4box.iomap.engine import IOMapEngine

    for opened in open_image(kernel_image.path):
        source = _CountingSource(opened.fs)
        engine = IOMapEngine(source, opened.fs.dev, cache_inodes=2)
        inode = _inode(opened, "frag")
        data = b"".join(engine.read(inode, pos, 5000) for pos in range(0, inode.size, 5000))
        assert data == kernel_image.contents["frag"]
        assert source.calls == 1  # one walk, ahead to EOF, served every request
        engine.invalidate(inode.ino)
        engine.read(inode, 0, 10)
        assert source.calls == 2
        for name in ("other", "contig", "tiny"):
            engine.read(_inode(opened, name), 0, 10)
        assert len(engine.cache) == 2  # LRU over inodes stays bounded


def test_mapping_cache_bounded_per_inode(kernel_image: KernelImage) -> None:
    for opened in open_image(kernel_image.path, cache_runs_per_inode=3, map_ahead_bytes=BLOCK):
        inode = _inode(opened, "frag")
        expected = kernel_image.contents["frag"]
        for pos in range(0, inode.size, 3000):
            assert opened.engine.read(inode, pos, 3000) == expected[pos : pos + 3000]
        with opened.engine.cache.lock:
            assert len(opened.engine.cache.runs_for(inode.ino)) <= 3 + 2


def test_inline_and_blockmap_files(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "inline").write_bytes(b"tiny inline body\n")
    with open(tree / "sparse", "wb") as f:
        f.seek(40_000)
        f.write(b"island")
        # (a trailing hole is not used: mkfs.ext4 1.47.0 -d drops it from i_size)
        f.seek(199_997)
        f.write(b"end")
    expected = {name: (tree / name).read_bytes() for name in ("inline", "sparse")}
    for variant, options in (
        ("inline", ["-O", "inline_data"]),
        ("blockmap", ["-O", "^extent,^64bit"]),
    ):
        image = tmp_path / f"{variant}.ext4"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-b", "1024", *options, "-d", str(tree), str(image), "8M"],
            check=True,
            capture_output=True,
        )
        for opened in open_image(image):
            inline = _inode(opened, "inline")
            maps = opened.engine.begin(inline, 3, 5)
            if variant == "inline":
                assert maps == [IOMap(IOMapKind.INLINE, 3, 5)]
            else:
                assert [m.kind for m in maps] == [IOMapKind.MAPPED]
            sparse = _inode(opened, "sparse")
            maps = opened.engine.begin(sparse, 0, sparse.size)
            assert maps == _debugfs_block_maps(image, "/sparse", sparse.size, 1024)
            assert IOMapKind.HOLE in {m.kind for m in maps}
            for name, data in expected.items():
                inode = _inode(opened, name)
                assert opened.engine.read(inode, 0, 1 << 20) == data, (variant, name)
                assert opened.engine.read(inode, 5, 39_999) == data[5:40_004], (variant, name)
