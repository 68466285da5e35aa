"""fallocate, SEEK_DATA/SEEK_HOLE and copy_file_range: ext4box against the kernel's ext4.

Every scenario runs the same calls on two copies of one mkfs.ext4 -d image, one
loop-mounted by the kernel, one opened in-process through the facade and the
iomap engine, and then requires the same outcome of every call (or the same
errno), the same sizes, st_blocks, content and SEEK_DATA/SEEK_HOLE segments,
the same extent layout (logical ranges, written or unwritten) and e2fsck -fn
clean on both images.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from falloc_support import (
    COLLAPSE_RANGE,
    INSERT_RANGE,
    KEEP_SIZE,
    PUNCH_HOLE,
    ZERO_RANGE,
    Twins,
    e2fsck_clean,
    fiemap_extent_count,
    make_image,
    open_ours,
    pattern,
    tree_depth,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext4box.ext4.format.errors import IsADirectory
from ext4box.ext4.format.inode import ROOT_INO
from support.kernel import kernel_mount, why_no_kernel_mounts

B = 4096


@pytest.fixture(autouse=True)
def _need_kernel() -> None:
    reason = why_no_kernel_mounts()
    if reason is not None:
        pytest.skip(reason)


Scenario = Callable[[Twins, list[str]], None]


def run_twins(tmp_path: Path, files: dict[str, bytes], scenario: Scenario, *,
              block_size: int = B, size_mb: int = 32, mkfs_extra: tuple[str, ...] = (),
              image: Path | None = None, remount: bool = False,
              exact_blocks: bool = True) -> Twins:
    """Run `scenario` on both sides; fail on any difference it or the final checks find.
    The image holds `files` (mkfs.ext4 -d), unless one is given."""
    if image is None:
        image = make_image(tmp_path, files, block_size=block_size, size_mb=size_mb,
                           mkfs_extra=mkfs_extra)
    twins = Twins.open(tmp_path, image)
    mismatches: list[str] = []
    try:
        scenario(twins, mismatches)
        names = sorted(set(files) | {n for n in twins.fds})
        if remount:
            twins.remount_kernel()
        mismatches += twins.compare_views(names, exact_blocks=exact_blocks)
        kernel_layouts = twins.kernel_layouts(names)
    finally:
        twins.close()
    mismatches += twins.compare_layouts(kernel_layouts)
    for side, image_path in (("kernel", twins.kernel_image), ("ours", twins.our_image)):
        report = e2fsck_clean(image_path)
        if report is not None:
            mismatches.append(f"e2fsck of {side}: {report[-1500:]}")
    assert not mismatches, "\n".join(mismatches)
    return twins


def same(mismatches: list[str], what: str, outcome: tuple[object, object]) -> None:
    if outcome[0] != outcome[1]:
        mismatches.append(f"{what}: kernel {outcome[0]} ours {outcome[1]}")


def apply(twins: Twins, mismatches: list[str],
          calls: list[tuple[str, int, int, int]]) -> None:
    for name, mode, offset, length in calls:
        same(mismatches, f"fallocate({name}, {mode:#x}, {offset}, {length})",
             twins.fallocate(name, mode, offset, length))


# ---- every mode on small files ------------------------------------------------------


@pytest.mark.parametrize("block_size", [4096, 1024])
def test_each_mode_on_small_files(tmp_path: Path, block_size: int) -> None:
    bs = block_size

    def scenario(twins: Twins, mismatches: list[str]) -> None:
        apply(twins, mismatches, [
            # default mode and KEEP_SIZE, within, across and past EOF
            ("cross", 0, 0, 3 * bs), ("cross", KEEP_SIZE, 10 * bs, 4 * bs),
            ("cross", 0, 7 * bs + 5, 100), ("empty", 0, 100, 100),
            ("empty", KEEP_SIZE, 0, 5 * bs + 1),
            # punch: inside a block, across blocks, at and past EOF
            ("mid", PUNCH_HOLE | KEEP_SIZE, 100, 3 * bs), ("mid", PUNCH_HOLE | KEEP_SIZE, 7, 20),
            ("mid", PUNCH_HOLE | KEEP_SIZE, 60 * bs, 100 * bs),
            ("mid", PUNCH_HOLE | KEEP_SIZE, 400 * bs, bs),
            # zero range, aligned and not, with and without KEEP_SIZE
            ("mid", ZERO_RANGE, 5 * bs + 10, 7 * bs), ("mid", ZERO_RANGE, 20 * bs, 4 * bs),
            ("mid", ZERO_RANGE | KEEP_SIZE, 70 * bs + 1, 10 * bs),
            ("cross", ZERO_RANGE, 20 * bs - 3, 10),
            # collapse and insert, fine and refused
            ("mid", COLLAPSE_RANGE, 8 * bs, 2 * bs), ("mid", INSERT_RANGE, 3 * bs, 5 * bs),
            ("mid", COLLAPSE_RANGE, 8 * bs, 100), ("mid", INSERT_RANGE, 100, bs),
            ("mid", COLLAPSE_RANGE, 0, 400 * bs), ("mid", INSERT_RANGE, 400 * bs, bs),
            ("cross", INSERT_RANGE, 0, bs), ("cross", COLLAPSE_RANGE, 0, bs),
            # what vfs_fallocate refuses before ext4 sees it
            ("mid", PUNCH_HOLE, 0, bs), ("mid", COLLAPSE_RANGE | KEEP_SIZE, 0, bs),
            ("mid", PUNCH_HOLE | ZERO_RANGE | KEEP_SIZE, 0, bs), ("mid", 0x40, 0, bs),
            ("mid", 0, 0, 0), ("mid", 0, -1, bs),
        ])

    run_twins(tmp_path, {"cross": pattern(1, bs + 904), "mid": pattern(2, 300 * 1024),
                         "empty": b""}, scenario, block_size=block_size)


def test_writes_into_unwritten_extents_convert_only_what_they_write(tmp_path: Path) -> None:
    def scenario(twins: Twins, mismatches: list[str]) -> None:
        apply(twins, mismatches, [("f", 0, 0, 32 * B), ("g", KEEP_SIZE, 0, 16 * B)])
        twins.write("f", 5 * B + 7, b"w" * 100)  # inside one block
        twins.write("f", 9 * B - 10, pattern(3, 2 * B + 20))  # across three blocks
        twins.write("f", 31 * B, pattern(4, B))  # the last block
        twins.write("g", 3 * B + 1, b"past EOF, into preallocated blocks")
        twins.write("g", 20 * B, b"beyond the preallocation")

    run_twins(tmp_path, {"seed": b"x"}, scenario)


def test_truncates_crossing_unwritten_extents(tmp_path: Path) -> None:
    def scenario(twins: Twins, mismatches: list[str]) -> None:
        apply(twins, mismatches, [("f", KEEP_SIZE, 0, 40 * B)])
        twins.write("f", 0, pattern(5, 2 * B + 100))
        twins.truncate("f", 10 * B + 5)  # up, over unwritten blocks
        twins.write("f", 6 * B, b"middle")
        twins.truncate("f", 7 * B - 1)  # down, through a converted block
        twins.truncate("f", 30 * B)  # up again: the tail of block 6 must read as zeros
        apply(twins, mismatches, [("f", ZERO_RANGE | KEEP_SIZE, 25 * B, 30 * B)])
        twins.truncate("f", 26 * B + 3)  # down, inside an unwritten extent
        twins.truncate("f", 0)

    run_twins(tmp_path, {"seed": b"x"}, scenario)


# ---- trees past the inode's four extents -------------------------------------------


def _punch_every_other(twins: Twins, mismatches: list[str], name: str, bs: int,
                       first: int, end: int) -> None:
    apply(twins, mismatches, [(name, PUNCH_HOLE | KEEP_SIZE, lblk * bs, bs)
                              for lblk in range(first, end, 2)])


def test_extent_leaf_boundary(tmp_path: Path) -> None:
    """Files with a handful of extents: more than the inode's four needs a leaf block."""

    def scenario(twins: Twins, mismatches: list[str]) -> None:
        _punch_every_other(twins, mismatches, "f", B, 1, 12)  # 6 holes: 7 extents, a leaf
        apply(twins, mismatches, [
            ("f", ZERO_RANGE, 2 * B, 3 * B), ("f", KEEP_SIZE, 60 * B, 2 * B),
            ("f", COLLAPSE_RANGE, 3 * B, 4 * B), ("f", INSERT_RANGE, B, 2 * B),
            ("g", 0, 0, 10 * B),
        ])
        for lblk in range(0, 10, 2):
            twins.write("g", lblk * B + 1, b"data")  # 5 written among unwritten blocks
        apply(twins, mismatches, [("g", PUNCH_HOLE | KEEP_SIZE, 3 * B, 5 * B),
                                  ("g", COLLAPSE_RANGE, 0, 2 * B)])
        same(mismatches, "copy f->h", twins.copy("f", "h", 100, 3, 40 * B))

    run_twins(tmp_path, {"f": pattern(6, 40 * B + 17), "g": b""}, scenario)


def test_two_level_extent_tree(tmp_path: Path) -> None:
    """1 KiB blocks: 84 extents a leaf, so ~400 extents need an index level below the root."""
    bs = 1024
    blocks = 820

    def scenario(twins: Twins, mismatches: list[str]) -> None:
        _punch_every_other(twins, mismatches, "f", bs, 1, blocks)
        twins.settle_kernel()
        kernel_extents.append(fiemap_extent_count(twins.mnt / "f"))
        apply(twins, mismatches, [
            ("f", ZERO_RANGE | KEEP_SIZE, 100 * bs + 3, 50 * bs),
            ("f", KEEP_SIZE, 300 * bs, 9 * bs),
            ("f", COLLAPSE_RANGE, 200 * bs, 64 * bs), ("f", INSERT_RANGE, 10 * bs, 30 * bs),
            ("f", PUNCH_HOLE | KEEP_SIZE, 500 * bs, 100 * bs),
        ])
        same(mismatches, "copy f->c", twins.copy("f", "c", 0, 0, blocks * bs))

    kernel_extents: list[int] = []
    twins = run_twins(tmp_path, {"f": pattern(7, blocks * bs)}, scenario, block_size=bs)
    # More extents than four leaves of 84 hold: the kernel's tree has two levels too.
    assert kernel_extents[0] > 4 * 84
    assert tree_depth(twins.our_image, "/f") >= 2


# ---- indirect block maps ----------------------------------------------------------


def test_block_map_files_punch_only(tmp_path: Path) -> None:
    def scenario(twins: Twins, mismatches: list[str]) -> None:
        apply(twins, mismatches, [
            ("f", 0, 0, B), ("f", KEEP_SIZE, 20 * B, B), ("f", ZERO_RANGE, 0, B),
            ("f", COLLAPSE_RANGE, 0, B), ("f", INSERT_RANGE, 0, B),
            ("f", PUNCH_HOLE | KEEP_SIZE, B + 5, 3 * B),
            ("f", PUNCH_HOLE | KEEP_SIZE, 13 * B, 300 * B),  # through the indirect block
        ])
        same(mismatches, "copy f->g", twins.copy("f", "g", 0, 0, 30 * B))

    run_twins(tmp_path, {"f": pattern(8, 20 * B + 1)}, scenario,
              mkfs_extra=("-O", "^extent,^64bit"))


# ---- inline data ----------------------------------------------------------------------


def test_inline_data_files(tmp_path: Path) -> None:
    """SEEK_DATA/SEEK_HOLE on inline files, and fallocate moving them into a block.

    The kernel's view is taken after a remount: on Linux 6.18, once fallocate
    has moved an inline file into a block, the kernel reads that block as zeros
    whenever its page is not cached, until the next mount (the image holds the
    right bytes, and ext4box reads them). PUNCH_HOLE and ZERO_RANGE on such a
    file are checked in test_inline_punch_and_zero_range instead.
    """

    def scenario(twins: Twins, mismatches: list[str]) -> None:
        apply(twins, mismatches, [("t1", KEEP_SIZE, 0, 3 * B), ("t2", 0, 10, 2 * B)])
        same(mismatches, "copy t4->t5", twins.copy("t4", "t5", 3, 0, 100))

    files = {f"t{n}": pattern(20 + n, 40 + n) for n in range(1, 6)}
    run_twins(tmp_path, files, scenario, mkfs_extra=("-O", "inline_data"), remount=True)


def test_inline_punch_and_zero_range(tmp_path: Path) -> None:
    """The kernel's ext4 (6.18) moves the inline file into a block and then
    zeroes nothing, as if that block were a hole: after a remount the punched
    bytes are back. The bytes fallocate(2) promises are the reference here."""
    image = make_image(tmp_path, {"p": pattern(31, 42), "z": pattern(32, 43)},
                       mkfs_extra=("-O", "inline_data"))
    with open_ours(image) as (fs, engine):
        p, z = fs.lookup(ROOT_INO, b"p"), fs.lookup(ROOT_INO, b"z")
        engine.fallocate(p, PUNCH_HOLE | KEEP_SIZE, 2, 5, now_ns=1)
        engine.fallocate(z, ZERO_RANGE, 10, 20, now_ns=1)
        expected_p = bytearray(pattern(31, 42))
        expected_p[2:7] = bytes(5)
        expected_z = bytearray(pattern(32, 43))
        expected_z[10:30] = bytes(20)
        assert engine.read(fs.inode(p), 0, 100) == expected_p
        assert engine.read(fs.inode(z), 0, 100) == expected_z
    report = e2fsck_clean(image)
    assert report is None, report
    mnt = tmp_path / "check"
    with kernel_mount(image, mnt) as root:
        assert (root / "p").read_bytes() == expected_p
        assert (root / "z").read_bytes() == expected_z


# ---- copy_file_range ------------------------------------------------------------------


def test_copy_file_range_rules(tmp_path: Path) -> None:
    def scenario(twins: Twins, mismatches: list[str]) -> None:
        apply(twins, mismatches, [("src", PUNCH_HOLE | KEEP_SIZE, 3 * B, 4 * B),
                                  ("src", KEEP_SIZE, 20 * B, 4 * B),
                                  ("src", ZERO_RANGE, 10 * B, 2 * B)])
        checks = [
            ("src", "dst", 0, 0, 100 * B),  # holes and unwritten blocks become zeros
            ("src", "dst", 5, 20 * B + 3, 3 * B),  # unaligned, past the destination's EOF
            ("src", "src", 0, B, 2 * B),  # overlapping inside one file
            ("src", "src", 0, 16 * B, 2 * B),  # the same file, apart
            ("src", "dst", 16 * B, 0, B),  # at the source's EOF: nothing
            ("src", "dst", 50 * B, 0, B),  # past it
            ("src", "dst", -1, 0, B),
            ("src", "dst", 0, 0, 0),
        ]
        for src, dst, src_pos, dst_pos, length in checks:
            same(mismatches, f"copy {src}@{src_pos} -> {dst}@{dst_pos} ({length})",
                 twins.copy(src, dst, src_pos, dst_pos, length))

    run_twins(tmp_path, {"src": pattern(9, 16 * B), "dst": pattern(10, 2 * B)}, scenario)


def test_copy_file_range_refuses_directories(tmp_path: Path) -> None:
    image = make_image(tmp_path, {"f": b"data"})
    twins = Twins.open(tmp_path, image)
    try:
        with pytest.raises(IsADirectory):
            twins.engine.copy_file_range(ROOT_INO, 0, twins.ino("f"), 0, 10, now_ns=0)
        with pytest.raises(IsADirectory):
            twins.engine.fallocate(ROOT_INO, 0, 0, 10, now_ns=0)
    finally:
        twins.close()


# ---- a generated sequence, compared step by step ------------------------------------------

NAMES = ("a", "b", "c")
# EXT4BOX_FALLOC_EXAMPLES / EXT4BOX_FALLOC_STEPS make the long run; CI runs a
# few derandomized examples (the same sequences every run).
EXAMPLES = int(os.environ.get("EXT4BOX_FALLOC_EXAMPLES", "4"))
STEPS = int(os.environ.get("EXT4BOX_FALLOC_STEPS", "60"))


def _offsets(limit_blocks: int) -> st.SearchStrategy[int]:
    """Byte offsets that like block boundaries and their neighbours."""
    return st.builds(lambda block, within: block * B + within, st.integers(0, limit_blocks - 1),
                     st.sampled_from((0, 0, 1, B // 2, B - 1)))


_FALLOC_MODES = (0, KEEP_SIZE, PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE, ZERO_RANGE | KEEP_SIZE)
STEP = st.one_of(
    st.tuples(st.just("falloc"), st.sampled_from(NAMES), st.sampled_from(_FALLOC_MODES),
              _offsets(96), st.integers(1, 24 * B)),
    st.tuples(st.just("falloc"), st.sampled_from(NAMES),
              st.sampled_from((COLLAPSE_RANGE, INSERT_RANGE)),
              st.integers(0, 40).map(lambda n: n * B), st.integers(1, 8).map(lambda n: n * B)),
    st.tuples(st.just("write"), st.sampled_from(NAMES), _offsets(96), st.integers(1, 6 * B)),
    st.tuples(st.just("truncate"), st.sampled_from(NAMES), _offsets(120)),
    st.tuples(st.just("copy"), st.sampled_from(NAMES), st.sampled_from(NAMES), _offsets(40),
              _offsets(60), st.integers(1, 20 * B)),
)


def _run_steps(twins: Twins, mismatches: list[str], steps: list[tuple]) -> None:
    for number, step in enumerate(steps, 1):
        if step[0] == "falloc":
            _, name, mode, offset, length = step
            same(mismatches, f"step {number} {step}", twins.fallocate(name, mode, offset, length))
        elif step[0] == "write":
            _, name, offset, length = step
            twins.write(name, offset, pattern(number, length))
            # ext4box allocates at write time, the kernel at writeback: an fsync
            # puts the kernel's allocations in the same order as ours, so that
            # which extents touch on disk (and with it i_blocks) can compare.
            os.fsync(twins.fd(name))
        elif step[0] == "truncate":
            twins.truncate(step[1], step[2])
        else:
            _, src, dst, src_pos, dst_pos, length = step
            same(mismatches, f"step {number} {step}",
                 twins.copy(src, dst, src_pos, dst_pos, length))
            os.fsync(twins.fd(dst))
        if mismatches:
            return


def test_generated_sequences_match_kernel(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hypothesis-made mixes of every fallocate mode, writes, truncates and copies.

    Everything is compared as in the fixed scenarios except st_blocks, which is
    compared as data blocks: over a random history the kernel's allocator
    (preallocation windows) places blocks where ours does not, and whether
    neighbouring extents touch on disk decides how many tree blocks a file
    needs. The count of files that differ that way is printed."""

    lengths: list[int] = []
    tree_block_differences: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(st.lists(STEP, min_size=STEPS // 2, max_size=STEPS))
    def check(steps: list[tuple]) -> None:
        lengths.append(len(steps))
        workdir = tmp_path_factory.mktemp("falloc-seq")
        try:
            twins = run_twins(workdir, {"a": pattern(11, 30 * B + 5), "b": pattern(12, 3 * B),
                                        "c": b""},
                              lambda twins, mismatches: _run_steps(twins, mismatches, steps),
                              size_mb=64, exact_blocks=False)
            tree_block_differences.append(twins.tree_block_differences)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    check()
    print(f"fallocate sequences: {len(lengths)} run, {sum(lengths)} steps; files whose "
          f"st_blocks differ by tree blocks only: {sum(tree_block_differences)}")


# ---- the size limit ---------------------------------------------------------------


def test_size_limit(tmp_path: Path) -> None:
    """s_maxbytes of 4 KiB blocks: (2^32 - 1) blocks. The last block can be
    preallocated; a byte past it is EFBIG, for fallocate, insert and copy."""
    max_bytes = ((1 << 32) - 1) * B

    def scenario(twins: Twins, mismatches: list[str]) -> None:
        apply(twins, mismatches, [
            ("f", KEEP_SIZE, max_bytes - B, B), ("f", KEEP_SIZE, max_bytes - B, B + 1),
            ("f", 0, max_bytes - 2 * B, B),
            ("g", INSERT_RANGE, 0, max_bytes - 4 * B), ("f", PUNCH_HOLE | KEEP_SIZE, 1 << 50, B),
            ("f", ZERO_RANGE, max_bytes, 1), ("f", PUNCH_HOLE | KEEP_SIZE, max_bytes - 2 * B, B),
        ])
        # A block preallocated at 2^32 - 2, past EOF: an insert would move it
        # past what the kernel maps. Both refuse (EINVAL); the kernel has grown
        # i_size all the same (see ext4/write/fallocate.py), so the file is emptied
        # on both sides afterwards.
        twins.write("k", 0, b"k" * 100)
        apply(twins, mismatches, [("k", KEEP_SIZE, max_bytes - B, B), ("k", INSERT_RANGE, 0, B)])
        twins.truncate("k", 0)
        for dst_pos in (max_bytes, max_bytes - 10, max_bytes + B):
            same(mismatches, f"copy to {dst_pos}", twins.copy("g", "h", 0, dst_pos, 3 * B))

    run_twins(tmp_path, {"f": pattern(13, 3 * B), "g": pattern(14, 5 * B)}, scenario)
