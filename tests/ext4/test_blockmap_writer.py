"""BlockMapWriter against e2fsck, debugfs and the kernel on ext2/ext3 images.

The same harness as test_extent_writer.py: the writer edits a file made by
`mkfs -d`, its callbacks read and write the image and take blocks from the
free ranges dumpe2fs lists; debugfs then stores i_block, i_size, i_blocks and
the bitmaps. `e2fsck -fn` must pass, the BLOCKS section of `debugfs stat`
must list the data and indirect blocks we expect, and the kernel must read
the content we wrote.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from helpers_debugfs import SparseDigest, block_listing, make_image, sparse_file_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_extent_writer import ImageHarness, block_content, e2fsck_clean

from ext4box.ext4.format.blockmap import BlockMapMapper
from ext4box.ext4.format.blockrun import BlockRun, append_merged
from ext4box.ext4.format.errors import NoSpace, Unsupported
from ext4box.ext4.write.blockmap_writer import BlockMapWriter
from support.kernel import kernel_mount

pytestmark = pytest.mark.usefixtures("need_kernel_mounts")

_IMAGES = {
    "ext3-1k": (1024, ("-t", "ext3", "-b", "1024")),
    "ext2-4k": (4096, ("-t", "ext2", "-b", "4096")),
}


def make_blockmap_image(tmp: Path, variant: str, size_mb: int = 16) -> Path:
    bs, args = _IMAGES[variant]
    root = tmp / "root"
    root.mkdir()
    (root / "f").write_bytes(bytes(range(256)) * (20 * bs // 256))
    return make_image(tmp / "img", size_mb, *args, root_dir=root)


class BlockMapCase:
    """One indirect-mapped file: the writer, the harness and the expected mapping."""

    def __init__(self, image: Path, path: str = "/f") -> None:
        self.image = image
        self.path = path
        self.h = ImageHarness(image, path)
        self.bs = self.h.bs
        self.per = self.bs // 4
        self.writer = BlockMapWriter(
            ino=self.h.ino, i_block=self.h.i_block, block_size=self.bs,
            read_meta=self.h.read_meta, write_meta=self.h.write_meta,
            alloc_block=self.h.alloc_block, free_block=self.h.free_block,
            check_run=self.h.check_run)
        self.model: dict[int, int] = {}
        mapper = self.mapper()
        for run_ in mapper.extents():
            assert run_.pblk is not None
            self.h.write_data(run_.lblk, run_.pblk, run_.length)
            for i in range(run_.length):
                self.model[run_.lblk + i] = run_.pblk + i
        self.tree_blocks_start = len(mapper.tree_blocks())

    @property
    def dind(self) -> int:
        return 12 + self.per

    @property
    def tind(self) -> int:
        return 12 + self.per + self.per * self.per

    def mapper(self) -> BlockMapMapper:
        return BlockMapMapper(ino=self.h.ino, i_block=self.writer.i_block,
                              read_block=self.h.read_meta, block_size=self.bs,
                              check_run=self.h.check_run)

    def insert(self, lblk: int, length: int, rng: random.Random | None) -> int:
        pblk = self.h.alloc_run(length, rng)
        self.h.write_data(lblk, pblk, length)
        self.writer.insert(lblk, pblk, length)
        for i in range(length):
            assert lblk + i not in self.model
            self.model[lblk + i] = pblk + i
        return pblk

    def punch(self, lblk: int, length: int) -> None:
        freed = self.writer.punch(lblk, length)
        expected = sorted(self.model.pop(b) for b in range(lblk, lblk + length)
                          if b in self.model)
        assert sorted(b for pblk, count in freed for b in range(pblk, pblk + count)) == expected
        self.h.release_data(freed)

    def truncate(self, lblk: int) -> None:
        freed = self.writer.truncate(lblk)
        expected = sorted(self.model.pop(b) for b in list(self.model) if b >= lblk)
        assert sorted(b for pblk, count in freed for b in range(pblk, pblk + count)) == expected
        self.h.release_data(freed)

    def check_mapping(self) -> list[int]:
        mapper = self.mapper()
        got = {}
        for run_ in mapper.extents():
            assert run_.pblk is not None
            for i in range(run_.length):
                got[run_.lblk + i] = run_.pblk + i
        assert got == self.model
        tree = mapper.tree_blocks()
        assert len(tree) == self.tree_blocks_start + self.writer.tree_blocks_delta
        return tree

    def size(self) -> int:
        return (max(self.model) + 1) * self.bs if self.model else 0

    def finish(self, *, kernel: bool = True) -> None:
        tree = self.check_mapping()
        i_blocks = (len(self.model) + len(tree)) * (self.bs // 512)
        self.h.store(self.writer.i_block, self.size(), i_blocks)
        e2fsck_clean(self.image)
        listing = block_listing(self.image, self.path)
        assert sorted(listing.tree_blocks) == sorted(tree)
        runs: list[BlockRun] = []
        for lblk in sorted(self.model):
            append_merged(runs, BlockRun(lblk, 1, self.model[lblk]))
        assert [(r.lblk, r.length, r.pblk) for r in runs] == _merge_listing(listing.data)
        if kernel:
            expected = SparseDigest(self.bs)
            for lblk in sorted(self.model):
                expected.add(lblk, block_content(lblk, self.model[lblk], self.bs))
            with tempfile.TemporaryDirectory(prefix="bw-mnt-") as mnt, \
                    kernel_mount(self.image, Path(mnt) / "m", readonly=True) as mountpoint:
                target = mountpoint / self.path.lstrip("/")
                assert target.stat().st_size == self.size()
                assert sparse_file_digest(target, self.bs) == expected.hexdigest()

    def close(self) -> None:
        self.h.close()


def _merge_listing(data: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """debugfs splits runs at indirect blocks; merge logically and physically adjacent ones."""
    merged: list[tuple[int, int, int]] = []
    for lblk, length, pblk in data:
        if merged and merged[-1][0] + merged[-1][1] == lblk \
                and merged[-1][2] + merged[-1][1] == pblk:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, merged[-1][2])
        else:
            merged.append((lblk, length, pblk))
    return merged


@pytest.fixture(params=sorted(_IMAGES))
def case(request: pytest.FixtureRequest, tmp_path: Path):
    built = BlockMapCase(make_blockmap_image(tmp_path, request.param))
    yield built
    built.close()


def test_every_level_then_truncate_in_steps(case: BlockMapCase) -> None:
    rng = random.Random(1)
    per = case.per
    # Direct, single, double (two subtrees) and triple indirect ranges, with holes.
    case.insert(25, 3, rng)
    case.insert(12 + per - 2, 5, None)  # across the single/double boundary
    case.insert(case.dind + 3 * per + 7, 2, rng)
    case.insert(case.tind + per * per + 5, 1, rng)
    case.check_mapping()
    case.finish()
    # Dropping the triple tree frees its three indirect blocks.
    before = case.writer.tree_blocks_delta
    case.truncate(case.tind)
    assert case.writer.tree_blocks_delta == before - 3
    case.finish()
    case.truncate(12 + per + 1)  # into the double tree
    case.finish()
    case.truncate(5)  # into the direct blocks
    case.finish()
    case.truncate(0)
    assert case.writer.i_block == bytes(60)
    assert case.writer.tree_blocks_delta == -case.tree_blocks_start
    case.finish()


def test_punch_frees_emptied_indirect_blocks(case: BlockMapCase) -> None:
    rng = random.Random(2)
    per = case.per
    case.insert(20, per + 32, None)  # the rest of the single tree and part of the double
    case.insert(case.dind + 2 * per, 10, rng)
    case.finish()
    start = case.writer.tree_blocks_delta
    case.punch(12, per)  # empties the single indirect block
    assert case.writer.tree_blocks_delta == start - 1
    case.punch(case.dind + 10, 5)  # a hole inside one leaf: nothing freed
    assert case.writer.tree_blocks_delta == start - 1
    case.punch(case.dind + 2 * per, 10)  # empties one leaf of the double tree
    assert case.writer.tree_blocks_delta == start - 2
    case.finish()
    case.punch(0, case.dind + 3 * per)  # everything: the double tree goes too
    assert case.writer.tree_blocks_delta == -case.tree_blocks_start
    case.finish()


def test_refusals_and_rollback(case: BlockMapCase) -> None:
    rng = random.Random(3)
    pblk = case.h.alloc_run(1, rng)
    with pytest.raises(Unsupported):
        case.writer.insert(40, pblk, 1, unwritten=True)
    with pytest.raises(ValueError, match="not a hole"):
        case.writer.insert(5, pblk, 1)
    with pytest.raises(ValueError):
        case.writer.insert(case.writer.limit, pblk, 1)
    before = case.writer.i_block
    case.h.fail_alloc_after = 1  # the double tree's root, then nothing
    with pytest.raises(NoSpace):
        case.writer.insert(case.dind + 5, pblk, 1)
    assert case.writer.i_block == before and case.writer.tree_blocks_delta == 0
    case.h.fail_alloc_after = None
    case.h.release_data([(pblk, 1)])
    case.writer.mark_written(0, 100)  # nothing to convert
    case.finish()


_OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "insert", "insert", "punch", "truncate"]),
              st.integers(0, 700), st.integers(1, 30), st.booleans()),
    min_size=1, max_size=40)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=_OPS, seed=st.integers(0, 2**16), variant=st.sampled_from(sorted(_IMAGES)))
def test_random_operation_sequences(tmp_path: Path, ops: list, seed: int, variant: str) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        case = BlockMapCase(make_blockmap_image(Path(tmp), variant, size_mb=8))
        try:
            for op, lblk, length, flag in ops:
                if flag and op == "insert":
                    lblk = case.dind + lblk * 3  # into the double tree
                if op == "insert":
                    cur = lblk
                    while cur < lblk + length:
                        if cur in case.model:
                            cur += 1
                            continue
                        stop = cur
                        while stop < lblk + length and stop not in case.model:
                            stop += 1
                        case.insert(cur, stop - cur, rng)
                        cur = stop
                elif op == "punch":
                    case.punch(lblk, length * (30 if flag else 1))
                else:
                    case.truncate(lblk)
                case.check_mapping()
            case.finish()
        finally:
            case.close()


def test_one_run_across_the_direct_pointers_end(case: BlockMapCase) -> None:
    # Regression: a run starting in the direct pointers and ending past block 12
    # once spilled data pointers into i_block words 12..14, the indirect roots.
    case.truncate(5)
    case.insert(5, 20, None)  # blocks 5..24: direct 5..11, then the single tree
    case.check_mapping()
    case.finish()
