"""ExtentTreeWriter against e2fsck, debugfs and the kernel on real images.

Each test takes an image made by mkfs.ext4 (with a file from `-d`), runs the
writer on that file's tree with callbacks backed by the image itself (blocks
read and written with pread/pwrite, tree and data blocks handed out from the
free ranges dumpe2fs lists), then stores the new root, i_size and i_blocks in
the inode and the bitmap changes with debugfs. The result must satisfy
`e2fsck -fn`, `debugfs ex` must list the extents our model expects, and the
kernel must read the content we wrote into the mapped blocks (zeros for holes
and unwritten extents).

`ImageHarness` is also used by test_blockmap_writer.py.
"""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import tempfile
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers_debugfs import (
    bounds_checker,
    extent_listing,
    fs_info,
    make_image,
    punch_hole,
    raw_inode,
    run,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext4box.ext4.format.blockrun import BlockRun
from ext4box.ext4.format.checksum import inode_csum_seed
from ext4box.ext4.format.errors import NoSpace
from ext4box.ext4.format.extents import ExtentMapper, block_max_entries
from ext4box.ext4.write.extent_writer import ExtentTreeWriter
from support.kernel import kernel_mount

pytestmark = pytest.mark.usefixtures("need_kernel_mounts")

_GROUP = re.compile(r"^Group (\d+): \(Blocks (\d+)-(\d+)\)(.*)$")
_GROUP_FREE_COUNT = re.compile(r"^\s+(\d+) free blocks,")
_FREE_RANGES = re.compile(r"^\s+Free blocks: (.*)$")
_BG_FLAGS = {"INODE_UNINIT": 1, "BLOCK_UNINIT": 2, "ITABLE_ZEROED": 4}
_BLOCK_UNINIT = 2
# debugfs names the last three i_block words after the indirect trees they hold.
_I_BLOCK_WORD_NAMES = {12: "IND", 13: "DIND", 14: "TIND"}


def block_content(lblk: int, pblk: int, bs: int) -> bytes:
    """What the tests write into data block `pblk` mapped at `lblk`: names both numbers."""
    tag = f"<{lblk}@{pblk}>".encode()
    return (tag * (bs // len(tag) + 1))[:bs]


@dataclass
class GroupFree:
    first: int
    last: int
    flags: int  # bg_flags
    desc_free: int  # the count the group descriptor holds
    free: list[int] = field(default_factory=list)  # from the bitmap


def _parse_ranges(text: str) -> list[int]:
    blocks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        lo, _, hi = item.partition("-")
        blocks.extend(range(int(lo), int(hi or lo) + 1))
    return blocks


def group_free_blocks(image: Path) -> list[GroupFree]:
    """Per group: its range, BLOCK_UNINIT flag, descriptor count and free blocks (dumpe2fs)."""
    groups: list[GroupFree] = []
    for line in run(["dumpe2fs", str(image)]).splitlines():
        if m := _GROUP.match(line):
            flags = sum(bit for name, bit in _BG_FLAGS.items() if name in m[4])
            groups.append(GroupFree(int(m[2]), int(m[3]), flags, 0))
        elif groups and (m := _GROUP_FREE_COUNT.match(line)):
            groups[-1].desc_free = int(m[1])
        elif groups and (m := _FREE_RANGES.match(line)):
            groups[-1].free = _parse_ranges(m[1])
    return groups


class ImageHarness:
    """The allocator/metadata callbacks of the design, backed by an image file.

    Blocks are handed out from every group (a BLOCK_UNINIT group that gets one
    loses the flag, as the kernel does); freed blocks are not reused before
    `store` has cleared them on the image, as the MetadataWriter defers frees.
    """

    def __init__(self, image: Path, path: str) -> None:
        self.image = image
        self.info = fs_info(image)
        self.bs = self.info.block_size
        inode = raw_inode(image, path, self.info)
        self.ino = inode.ino
        self.i_block = inode.i_block
        self.flags = inode.flags
        self.generation = inode.generation
        self.i_blocks = int.from_bytes(inode.raw[28:32], "little")
        self.fd = os.open(image, os.O_RDWR)
        self.free: list[int] = sorted(b for g in group_free_blocks(image) for b in g.free)
        self.in_use: dict[int, bool] = {}  # touched block -> in use now (bitmap to be)
        self.on_disk: dict[int, bool] = {}  # touched block -> bit as last stored
        self.deferred: list[int] = []
        self.check_run = bounds_checker(self.info.blocks_count)
        self.meta_reads = 0
        self.fail_alloc_after: int | None = None  # simulate ENOSPC after n allocations

    def close(self) -> None:
        os.close(self.fd)

    @property
    def csum_seed(self) -> int | None:
        if not self.info.metadata_csum:
            return None
        return inode_csum_seed(self.info.csum_seed, self.ino, self.generation)

    # -- the callbacks ------------------------------------------------------------------------

    def read_meta(self, pblk: int) -> bytes:
        self.meta_reads += 1
        return os.pread(self.fd, self.bs, pblk * self.bs)

    def write_meta(self, pblk: int, data: bytes) -> None:
        assert len(data) == self.bs
        assert self.in_use.get(pblk, pblk not in self.free), f"write to free block {pblk}"
        os.pwrite(self.fd, data, pblk * self.bs)

    def alloc_block(self, goal: int) -> int:
        if self.fail_alloc_after is not None:
            if self.fail_alloc_after == 0:
                raise NoSpace("test allocator exhausted")
            self.fail_alloc_after -= 1
        if not self.free:
            raise NoSpace("test allocator exhausted")
        slot = bisect_left(self.free, goal)
        block = self.free.pop(slot if slot < len(self.free) else 0)
        self._take(block)
        return block

    def free_block(self, pblk: int) -> None:
        assert self.in_use.get(pblk, True), f"double free of {pblk}"
        self.in_use[pblk] = False
        self.on_disk.setdefault(pblk, True)
        self.deferred.append(pblk)

    # -- data ---------------------------------------------------------------------------------

    def _take(self, block: int) -> None:
        self.on_disk.setdefault(block, False)
        self.in_use[block] = True

    def alloc_run(self, count: int, rng: random.Random | None) -> int:
        """A run of `count` free blocks: first fit after a random free block (None: the first)."""
        free = self.free
        start = rng.randrange(len(free)) if rng is not None else 0
        for offset in range(len(free)):
            i = (start + offset) % len(free)
            if i + count <= len(free) and free[i + count - 1] == free[i] + count - 1:
                first = free[i]
                del free[i:i + count]
                for block in range(first, first + count):
                    self._take(block)
                return first
        raise NoSpace(f"no run of {count} free blocks")

    def write_data(self, lblk: int, pblk: int, count: int) -> None:
        data = b"".join(block_content(lblk + i, pblk + i, self.bs) for i in range(count))
        os.pwrite(self.fd, data, pblk * self.bs)

    def release_data(self, runs: list[tuple[int, int]]) -> None:
        for pblk, count in runs:
            for block in range(pblk, pblk + count):
                self.free_block(block)

    # -- storing the result -------------------------------------------------------------------

    def store(self, i_block: bytes, size: int, i_blocks: int) -> None:
        """Write the inode fields and the bitmap/count changes with debugfs."""
        os.fsync(self.fd)
        commands = []
        # A BLOCK_UNINIT group's bitmap is neither read nor written: drop the flag first.
        for number, group in enumerate(group_free_blocks(self.image)):
            if group.flags & _BLOCK_UNINIT and any(
                    used and group.first <= block <= group.last
                    for block, used in self.in_use.items()):
                commands.append(f"set_bg {number} flags {group.flags & ~_BLOCK_UNINIT}")
                commands.append(f"set_bg {number} checksum calc")
        for block, used in sorted(self.in_use.items()):
            if self.on_disk.get(block) != used:
                commands.append(f"{'setb' if used else 'freeb'} {block}")
                self.on_disk[block] = used
        for word, value in enumerate(struct.unpack("<15I", i_block)):
            name = _I_BLOCK_WORD_NAMES.get(word, str(word))
            commands.append(f"sif <{self.ino}> block[{name}] {value}")
        commands.append(f"sif <{self.ino}> size {size}")
        commands.append(f"sif <{self.ino}> blocks {i_blocks}")
        self._debugfs(commands)
        # debugfs setb/freeb change bitmaps only: bring the counts in line.
        groups = group_free_blocks(self.image)
        fixes = []
        for number, group in enumerate(groups):
            if len(group.free) != group.desc_free and not group.flags & _BLOCK_UNINIT:
                fixes.append(f"set_bg {number} free_blocks_count {len(group.free)}")
                fixes.append(f"set_bg {number} checksum calc")
        fixes.append(f"ssv free_blocks_count {sum(len(g.free) for g in groups)}")
        self._debugfs(fixes)
        # The frees are durable now: those blocks may be handed out again.
        self.free = sorted(set(self.free) | set(self.deferred))
        self.deferred.clear()

    def _debugfs(self, commands: list[str]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as script:
            script.write("\n".join(commands) + "\n")
            script.flush()
            result = subprocess.run(["debugfs", "-w", "-f", script.name, str(self.image)],
                                    capture_output=True, text=True, check=False)
        # debugfs reports a failed request on stderr, after its version banner.
        errors = [line for line in result.stderr.splitlines()
                  if line.strip() and not line.startswith("debugfs ")]
        assert result.returncode == 0 and not errors, result.stderr


def e2fsck_clean(image: Path) -> str:
    """`e2fsck -fn` must exit 0; returns its output."""
    result = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def kernel_read(image: Path, path: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="ew-mnt-") as mnt, \
            kernel_mount(image, Path(mnt) / "m", readonly=True) as mountpoint:
        return (mountpoint / path.lstrip("/")).read_bytes()


# -- the extent-tree model ---------------------------------------------------------------------


class ExtentCase:
    """One file on one image: the writer, the harness and the expected mapping."""

    def __init__(self, image: Path, path: str = "/f", *, max_depth: int = 5) -> None:
        self.image = image
        self.path = path
        self.h = ImageHarness(image, path)
        self.bs = self.h.bs
        self.writer = ExtentTreeWriter(
            ino=self.h.ino, i_block=self.h.i_block, block_size=self.bs,
            csum_seed=self.h.csum_seed, read_meta=self.h.read_meta,
            write_meta=self.h.write_meta, alloc_block=self.h.alloc_block,
            free_block=self.h.free_block, check_run=self.h.check_run, max_depth=max_depth)
        # lblk -> (pblk, unwritten), starting from what the image holds.
        self.model: dict[int, tuple[int, bool]] = {}
        self.data_blocks = 0
        for run_ in self.mapper().extents():
            assert run_.pblk is not None
            self.h.write_data(run_.lblk, run_.pblk, run_.length)
            for i in range(run_.length):
                self.model[run_.lblk + i] = (run_.pblk + i, run_.unwritten)
            self.data_blocks += run_.length
        self.tree_blocks_start = len(self.mapper().tree_blocks())

    def mapper(self, i_block: bytes | None = None) -> ExtentMapper:
        return ExtentMapper(ino=self.h.ino, i_block=i_block or self.writer.i_block,
                            read_block=self.h.read_meta, block_size=self.bs,
                            csum_seed=self.h.csum_seed, check_run=self.h.check_run)

    def insert(self, lblk: int, length: int, rng: random.Random | None, *, unwritten: bool = False,
               pblk: int | None = None, write: bool = True) -> int:
        if pblk is None:
            pblk = self.h.alloc_run(length, rng)
        if write:
            self.h.write_data(lblk, pblk, length)
        self.writer.insert(lblk, pblk, length, unwritten=unwritten)
        for i in range(length):
            assert lblk + i not in self.model
            self.model[lblk + i] = (pblk + i, unwritten)
        self.data_blocks += length
        return pblk

    def punch(self, lblk: int, length: int) -> None:
        freed = self.writer.punch(lblk, length)
        expected = sorted(self.model.pop(b)[0] for b in range(lblk, lblk + length)
                          if b in self.model)
        got = sorted(b for pblk, count in freed for b in range(pblk, pblk + count))
        assert got == expected
        self.h.release_data(freed)
        self.data_blocks -= len(got)

    def truncate(self, lblk: int) -> None:
        freed = self.writer.truncate(lblk)
        expected = sorted(self.model.pop(b)[0] for b in list(self.model) if b >= lblk)
        got = sorted(b for pblk, count in freed for b in range(pblk, pblk + count))
        assert got == expected
        self.h.release_data(freed)
        self.data_blocks -= len(got)

    def mark_written(self, lblk: int, length: int) -> None:
        self.writer.mark_written(lblk, length)
        for b in range(lblk, lblk + length):
            if b in self.model:
                self.model[b] = (self.model[b][0], False)

    def mark_unwritten(self, lblk: int, length: int) -> None:
        self.writer.mark_unwritten(lblk, length)
        for b in range(lblk, lblk + length):
            if b in self.model:
                self.model[b] = (self.model[b][0], True)

    def collapse(self, lblk: int, length: int) -> None:
        """Block contents follow their logical block, so after a shift only
        finish(kernel=False) applies."""
        freed = self.writer.collapse(lblk, length)
        expected = sorted(self.model.pop(b)[0] for b in range(lblk, lblk + length)
                          if b in self.model)
        got = sorted(b for pblk, count in freed for b in range(pblk, pblk + count))
        assert got == expected
        self.h.release_data(freed)
        self.data_blocks -= len(got)
        self.model = {b - length if b >= lblk + length else b: v for b, v in self.model.items()}

    def insert_gap(self, lblk: int, length: int) -> None:
        self.writer.insert_gap(lblk, length)
        self.model = {b + length if b >= lblk else b: v for b, v in self.model.items()}

    def check_mapping(self) -> list[BlockRun]:
        """Our reader on the written tree agrees with the model, block by block."""
        mapper = self.mapper()
        extents = list(mapper.extents())
        got: dict[int, tuple[int, bool]] = {}
        for run_ in extents:
            assert run_.pblk is not None
            for i in range(run_.length):
                got[run_.lblk + i] = (run_.pblk + i, run_.unwritten)
        assert got == self.model
        assert len(mapper.tree_blocks()) == self.tree_blocks_start + self.writer.tree_blocks_delta
        self.check_shape()
        return extents

    def check_shape(self) -> None:
        """What e2fsck demands of the tree's shape, checked after every step with our own
        struct reads: eh_max of the space, non-empty non-root nodes, index key == first key
        of the child. (A root that is a lone index over entries that would fit it is
        fine: the kernel's ext4 never pulls a tree back into the inode either.)"""
        def walk(raw: bytes, depth: int | None, capacity: int, is_root: bool) -> int:
            magic, entries, eh_max, node_depth = struct.unpack_from("<HHHH", raw)
            assert magic == 0xF30A and eh_max == capacity
            assert depth is None or node_depth == depth
            assert entries > 0 or is_root
            first_keys = []
            for slot in range(entries):
                key, lo, hi = struct.unpack_from("<IIH", raw, 12 + 12 * slot)
                first_keys.append(key)
                if node_depth > 0:
                    child = self.h.read_meta(lo | hi << 32)
                    assert walk(child, node_depth - 1, (self.bs - 12) // 12, False) == key
            return first_keys[0] if first_keys else -1

        walk(self.writer.i_block, None, 4, True)

    def size(self) -> int:
        return (max(self.model) + 1) * self.bs if self.model else 0

    def finish(self, *, kernel: bool = True) -> None:
        """Store the inode and bitmaps, then ask e2fsck, debugfs and the kernel."""
        extents = self.check_mapping()
        tree_blocks = self.tree_blocks_start + self.writer.tree_blocks_delta
        i_blocks = (self.data_blocks + tree_blocks) * (self.bs // 512)
        self.h.store(self.writer.i_block, self.size(), i_blocks)
        e2fsck_clean(self.image)
        listing = extent_listing(self.image, self.path)
        assert listing.leaves == [(r.lblk, r.length, r.pblk, r.unwritten) for r in extents]
        assert listing.depth == self.writer.depth
        if kernel:
            assert kernel_read(self.image, self.path) == self.expected_content()

    def expected_content(self) -> bytes:
        zero = bytes(self.bs)
        out = []
        for lblk in range(self.size() // self.bs):
            entry = self.model.get(lblk)
            if entry is None or entry[1]:
                out.append(zero)
            else:
                out.append(block_content(lblk, entry[0], self.bs))
        return b"".join(out)

    def close(self) -> None:
        self.h.close()


def make_case_image(tmp: Path, *, bs: int, csum: bool, size_mb: int = 16,
                    file_blocks: int = 20, features: str = "") -> Path:
    root = tmp / "root"
    root.mkdir()
    (root / "f").write_bytes(bytes(range(256)) * (file_blocks * bs // 256))
    features = "^inline_data" + ("" if csum else ",^metadata_csum") + features
    return make_image(tmp / "img", size_mb, "-b", str(bs), "-O", features, root_dir=root)


@pytest.fixture(params=[(1024, True), (1024, False), (4096, True)],
                ids=["1k-csum", "1k-nocsum", "4k-csum"])
def case(request: pytest.FixtureRequest, tmp_path: Path):
    bs, csum = request.param
    built = ExtentCase(make_case_image(tmp_path, bs=bs, csum=csum,
                                       size_mb=16 if bs == 1024 else 48))
    yield built
    built.close()


# -- tests ---------------------------------------------------------------------------------------


def test_random_inserts_grow_to_depth_two_then_truncate(case: ExtentCase) -> None:
    rng = random.Random(1)
    leaf = block_max_entries(case.bs)
    # One-block extents at even logical blocks never merge: 4 * leaf of them need depth 2.
    count = 4 * leaf + 30 if case.bs == 1024 else 4 * leaf // 2
    lblks = [40 + 2 * i for i in range(count)]
    rng.shuffle(lblks)
    for lblk in lblks:
        case.insert(lblk, 1, rng)
    case.check_mapping()
    assert case.writer.depth == (2 if case.bs == 1024 else 1)
    case.finish()
    # Shrink in steps, then to nothing: only an empty tree goes back into the inode.
    case.truncate(40 + count)
    case.finish(kernel=False)
    case.punch(0, 300)
    case.finish(kernel=False)
    case.truncate(0)
    assert case.writer.depth == 0
    assert case.writer.tree_blocks_delta == -case.tree_blocks_start
    case.finish()


def test_sequential_appends_merge_and_pack_leaves(case: ExtentCase) -> None:
    rng = random.Random(2)
    # Physically contiguous appends become one extent.
    start = case.h.alloc_run(64, rng)
    for i in range(64):
        case.insert(100 + i, 1, rng, pblk=start + i)
    assert [(r.lblk, r.length) for r in case.mapper().extents()][-1] == (100, 64)
    # Appends that cannot merge fill leaves completely (only the last one is partial).
    leaf = block_max_entries(case.bs)
    for i in range(2 * leaf + 5):
        case.insert(200 + 2 * i, 1, rng)
    extents = case.check_mapping()
    assert len(extents) == 2 + 2 * leaf + 5
    fill = [int.from_bytes(case.h.read_meta(block)[2:4], "little")
            for block in case.mapper().tree_blocks()]
    assert fill == [leaf, leaf, 7]
    case.finish()
    # Filling the gaps with blocks contiguous on both sides merges three extents into one.
    lo = case.h.alloc_run(3, rng)
    case.insert(9000, 1, rng, pblk=lo)
    case.insert(9002, 1, rng, pblk=lo + 2)
    case.insert(9001, 1, rng, pblk=lo + 1)
    assert (9000, 3, lo, False) in [(r.lblk, r.length, r.pblk, r.unwritten)
                                     for r in case.mapper().extents()]
    case.finish()


def test_long_run_splits_at_maximum_extent_length(tmp_path: Path) -> None:
    # Runs this long cross block groups: 4k blocks, no journal, so groups 1 and 2 are
    # free but for one superblock backup.
    image = make_case_image(tmp_path, bs=4096, csum=True, size_mb=600,
                            features=",^has_journal")
    case = ExtentCase(image)
    try:
        case.insert(50, 40000, None, write=False)
        case.insert(50000, 33000, None, unwritten=True, write=False)
        lengths = [(r.length, r.unwritten) for r in case.mapper().extents()][1:]
        assert lengths == [(32768, False), (40000 - 32768, False),
                           (32767, True), (33000 - 32767, True)]
        case.mark_written(50000, 33000)
        case.finish(kernel=False)
    finally:
        case.close()


def test_unwritten_and_mark_written(case: ExtentCase) -> None:
    rng = random.Random(4)
    case.insert(100, 50, rng, unwritten=True)
    case.insert(300, 10, rng, unwritten=True)
    case.finish()
    # The middle of an extent: one extent becomes three.
    case.mark_written(110, 5)
    runs = [(r.lblk, r.length, r.unwritten) for r in case.mapper().extents()][-4:]
    assert runs == [(100, 10, True), (110, 5, False), (115, 35, True), (300, 10, True)]
    case.finish()
    # The written piece grows and merges with its written neighbour.
    case.mark_written(115, 5)
    case.mark_written(105, 5)
    runs = [(r.lblk, r.length, r.unwritten) for r in case.mapper().extents()][-4:]
    assert runs == [(100, 5, True), (105, 15, False), (120, 30, True), (300, 10, True)]
    # A range covering holes, written and unwritten extents.
    case.mark_written(0, 400)
    runs = [(r.lblk, r.length, r.unwritten) for r in case.mapper().extents()]
    assert all(not unwritten for _, _, unwritten in runs)
    assert (100, 50, False) in runs
    case.finish()


def test_punch_middle_ends_and_across_leaves(case: ExtentCase) -> None:
    leaf = block_max_entries(case.bs)
    for i in range(3 * leaf):
        case.insert(100 + 3 * i, 2, None)
    case.insert(5000, 100, None)
    case.finish(kernel=False)
    case.punch(5040, 20)  # the middle of one extent: it splits
    case.punch(5000, 5)  # its head
    case.punch(5095, 50)  # its tail, past the end of the mapping
    case.punch(100 + leaf, 2 * leaf)  # many extents across a leaf boundary, edges split
    case.punch(0, 10)  # the file's first blocks
    case.finish()


def test_failed_operations_leave_the_tree_unchanged(tmp_path: Path) -> None:
    case = ExtentCase(make_case_image(tmp_path, bs=1024, csum=True), max_depth=1)
    try:
        rng = random.Random(6)
        leaf = block_max_entries(1024)
        case.truncate(0)
        # Appends pack leaves: 4 * leaf - 1 extents fill the 4 leaves a depth-1 tree holds.
        for i in range(4 * leaf - 1):
            case.insert(100 + 2 * i, 1, rng)
        assert case.writer.depth == 1
        before = case.writer.i_block
        delta = case.writer.tree_blocks_delta
        case.finish(kernel=False)
        pblk = case.h.alloc_run(1, rng)
        # The first leaf is full: the split needs a block and the allocator has none.
        case.h.fail_alloc_after = 0
        with pytest.raises(NoSpace):
            case.writer.insert(101, pblk, 1)
        assert case.writer.i_block == before and case.writer.tree_blocks_delta == delta
        # With a block the split works, but a fifth leaf needs depth 2 > max_depth.
        case.h.fail_alloc_after = None
        with pytest.raises(NoSpace, match="depth"):
            case.writer.insert(101, pblk, 1)
        assert case.writer.i_block == before and case.writer.tree_blocks_delta == delta
        case.h.release_data([(pblk, 1)])
        # The last leaf still has room.
        case.insert(100 + 2 * (4 * leaf - 1), 1, rng)
        case.finish()
    finally:
        case.close()


def test_insert_over_mapped_block_is_refused(case: ExtentCase) -> None:
    rng = random.Random(7)
    with pytest.raises(ValueError, match="not a hole"):
        case.writer.insert(5, case.h.alloc_run(1, rng), 1)
    case.insert(30, 5, rng)
    with pytest.raises(ValueError, match="not a hole"):
        case.writer.insert(25, case.h.alloc_run(6, rng), 6)


# -- property-based: random operation sequences against a model ------------------------------

_OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "insert", "scatter", "punch", "written", "truncate"]),
              st.integers(0, 1500), st.integers(1, 40), st.booleans()),
    min_size=1, max_size=60)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=_OPS, seed=st.integers(0, 2**16), bs=st.sampled_from([1024, 4096]))
def test_random_operation_sequences(tmp_path: Path, ops: list, seed: int, bs: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        case = ExtentCase(make_case_image(Path(tmp), bs=bs, csum=bs == 1024, size_mb=16))
        try:
            for op, lblk, length, flag in ops:
                if op in ("punch", "written", "truncate") and case.model:
                    lblk %= max(case.model) + 1  # aim at the mapped part of the file
                if op == "insert":
                    # Fill the holes of the range, one piece per hole, some as single blocks.
                    _fill_holes(case, lblk, length, rng, unwritten=flag)
                elif op == "scatter":
                    # Many one-block extents that cannot merge: the tree grows fast.
                    for start in range(lblk, lblk + 10 * length, 2):
                        if start not in case.model:
                            case.insert(start, 1, None, unwritten=flag)
                elif op == "punch":
                    case.punch(lblk, length * (20 if flag else 1))
                elif op == "written":
                    case.mark_written(lblk, length * 5)
                else:
                    case.truncate(lblk + length * 10 if flag else lblk)
                case.check_mapping()
            case.finish()
        finally:
            case.close()


def _fill_holes(case: ExtentCase, lblk: int, length: int, rng: random.Random, *,
                unwritten: bool) -> None:
    cur = lblk
    end = lblk + length
    while cur < end:
        if cur in case.model:
            cur += 1
            continue
        stop = cur
        while stop < end and stop not in case.model:
            stop += 1
        piece = 1 if rng.random() < 0.3 else stop - cur
        try:
            case.insert(cur, piece, rng, unwritten=unwritten)
        except NoSpace:  # free space too fragmented for this run: one block at a time
            piece = 1
            case.insert(cur, piece, None, unwritten=unwritten)
        cur += piece


def test_kernel_made_deep_tree_is_edited(tmp_path: Path) -> None:
    """A depth-2 tree written by the kernel is punched and extended by the writer."""
    image = make_image(tmp_path / "k.img", 16, "-b", "1024", "-O", "^inline_data")
    with tempfile.TemporaryDirectory(prefix="ew-mnt-") as mnt, \
            kernel_mount(image, Path(mnt) / "m", readonly=False) as mountpoint:
        fd = os.open(mountpoint / "f", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            for i in range(4 * block_max_entries(1024) + 20):
                os.pwrite(fd, b"k" * 1024, 2 * i * 1024)
        finally:
            os.close(fd)
    case = ExtentCase(image)
    try:
        assert case.writer.depth == 2
        rng = random.Random(8)
        case.punch(300, 200)
        for i in range(60):
            case.insert(301 + 2 * i, 1, rng)
        case.truncate(600)
        case.finish()
    finally:
        case.close()



def test_kernel_keeps_writing_to_our_deep_tree(tmp_path: Path) -> None:
    """The kernel mounts our depth-2 tree read-write, changes it, and e2fsck still agrees."""
    case = ExtentCase(make_case_image(tmp_path, bs=1024, csum=True))
    try:
        for lblk in range(40, 40 + 2 * (4 * block_max_entries(1024) + 30), 2):
            case.insert(lblk, 1, None)
        assert case.writer.depth == 2
        case.finish()
        expected = bytearray(case.expected_content())
        with tempfile.TemporaryDirectory(prefix="ew-mnt-") as mnt, \
                kernel_mount(case.image, Path(mnt) / "m", readonly=False) as mountpoint:
            fd = os.open(mountpoint / "f", os.O_RDWR)
            try:
                for lblk in range(41, 400, 6):  # fill holes between our extents
                    os.pwrite(fd, b"K" * 1024, lblk * 1024)
                    expected[lblk * 1024:(lblk + 1) * 1024] = b"K" * 1024
                punch_hole(fd, 100 * 1024, 50 * 1024)
                expected[100 * 1024:150 * 1024] = bytes(50 * 1024)
                os.fsync(fd)
            finally:
                os.close(fd)
        e2fsck_clean(case.image)
        assert kernel_read(case.image, "/f") == bytes(expected)
    finally:
        case.close()


def test_collapse_insert_and_unwrite_keep_the_tree_sound(case: ExtentCase) -> None:
    """fallocate's tree operations on a tree with index levels (two on 1 KiB
    blocks): the model after every step, e2fsck and debugfs at the end."""
    rng = random.Random(13)
    leaf = block_max_entries(case.bs)
    count = 4 * leaf + 30 if case.bs == 1024 else 2 * leaf
    for index in range(count):  # one-block extents that never merge
        case.insert(40 + 2 * index, 1, rng)
    case.check_mapping()
    assert case.writer.depth == (2 if case.bs == 1024 else 1)
    for _step in range(30):
        start = rng.randrange(0, max(case.model))
        length = rng.randrange(1, 40)
        operation = rng.choice(("collapse", "insert_gap", "mark_unwritten"))
        getattr(case, operation)(start, length)
        case.check_mapping()
    case.finish(kernel=False)
