"""Structure-aware mutation fuzzing of read-write sessions, bounded for CI.

Hypothesis mutates a seed image as the read-side test does (checksums
re-sealed or left stale), opens it with `open_filesystem(dev, readonly=False)`
in-process (a refusal is fine when it is an Ext4Error) and runs a short
random sequence of write operations through the facade and the iomap
executor (rw_driver). Oracles:
1. only Ext4Error subclasses escape;
2. every operation (open, each write operation, close) under OP_TIMEOUT_S;
3. traced memory under a cap tied to the image size;
4. nothing outside what the session owns is written (rw_driver.check_writes:
   inside the filesystem, never the boot block, superblock/GDT backups or
   reserved GDT blocks, never blocks of files the session never reached);
5. when the engine detected damage (a Corrupt answer), the session did not
   make the image worse: `e2fsck -fn` of the result reports no problem class
   that `e2fsck -fn` of the mutated input did not (names and numbers are
   stripped from its messages to get classes; an orphan the session had to
   leave on the list, its blocks unfreeable, brings the classes e2fsck -n
   reports for any pending orphan, which are then allowed). Skipped when e2fsck reads the
   input through its backup descriptors (it then judges a different image than
   the engine did), and the superblock's total free counts are not compared:
   like the kernel, the engine recomputes them from the group descriptors, so a
   damaged descriptor count reappears there.

On the journal seeds the rw open first replays the journal onto the device;
oracle 5 then compares against the same image replayed by a session without
operations, so what the journal itself brings (a damaged logged copy) is not
blamed on the operations.

EXT4BOX_FUZZ_RW_EXAMPLES (base seeds, default 800, about 25 s) and
EXT4BOX_FUZZ_RW_JOURNAL_EXAMPLES (journal and EA-inode seeds, default 400)
scale the run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import Corrupt, Ext4Error
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock
from ext4box.ext4.opening import open_filesystem
from fuzz.driver import OP_TIMEOUT_S, quiet_logs
from fuzz.program import Program, Seed, load_seeds, materialise
from fuzz.regions import Mutation, reseal
from fuzz.rw_driver import (
    COMMIT,
    CREATE,
    JOURNAL_INO,
    KIND_NAMES,
    LINK,
    MKDIR,
    REMOVEXATTR,
    RENAME,
    RMDIR,
    SETXATTR,
    SYMLINK,
    TRUNCATE,
    UNLINK,
    WRITE,
    RwOp,
    RwReport,
    SeedFacts,
    run_session,
    seed_facts,
)
from fuzz.seeds import build_seed_images
from fuzz.test_fuzz_mutations import (
    BASE_SEEDS,
    EA_SEEDS,
    JOURNAL_SEEDS,
    memory_cap,
    note_longest,
    programs,
    seed_indexes,
)

EXAMPLES = int(os.environ.get("EXT4BOX_FUZZ_RW_EXAMPLES", "800"))
JOURNAL_EXAMPLES = int(os.environ.get("EXT4BOX_FUZZ_RW_JOURNAL_EXAMPLES", "400"))
SEED_CSUM, SEED_INLINE, SEED_EXT2 = "ext4-csum-1k", "ext4-inline-nocsum-4k", "ext2-1k"

# Every kind of operation once or more, on names that exist in the seed tree.
FULL_SESSION = tuple(RwOp(*op) for op in (
    (CREATE, 0, 5, 0), (WRITE, 0, 5, 0x2003), (WRITE, 0, 0, 0x0500), (MKDIR, 1, 0, 0),
    (CREATE, 2, 4, 0), (WRITE, 2, 4, 0x1010), (TRUNCATE, 0, 0, 3), (SETXATTR, 0, 1, 0x0401),
    (REMOVEXATTR, 0, 0, 0), (SYMLINK, 0, 6, 900), (LINK, 0, 1, 0x0701), (COMMIT, 0, 0, 0),
    (RENAME, 0, 5, 0x0502), (UNLINK, 0, 4, 0), (RMDIR, 1, 0, 0), (UNLINK, 2, 0, 1),
    (TRUNCATE, 2, 4, 0)))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    missing = [t for t in ("mkfs.ext4", "e2fsck") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    return load_seeds(build_seed_images(tmp_path_factory.mktemp("fuzz-rw-seeds")))


@pytest.fixture(scope="module")
def facts(seeds: list[Seed]) -> list[SeedFacts]:
    return [seed_facts(seed.image) for seed in seeds]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-rw-fsck")


@pytest.fixture(scope="module", autouse=True)
def _quiet() -> Iterator[None]:
    saved = quiet_logs()
    yield
    structlog.configure(**saved)


def seed_index(seeds: list[Seed], name: str) -> int:
    return next(i for i, seed in enumerate(seeds) if seed.name == name)


def fsck(image: bytes, scratch: Path) -> tuple[int, str]:
    path = scratch / "check.img"
    path.write_bytes(image)
    done = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, errors="replace",
                          timeout=60, check=False)
    return done.returncode, done.stdout + done.stderr


_TOTAL_COUNT = re.compile(r"^Free (blocks|inodes) count wrong \(")


def problem_classes(output: str) -> set[str]:
    """e2fsck's messages with names, paths and numbers stripped (see oracle 5)."""
    classes = set()
    for line in output.splitlines():
        line = line.strip()
        if (not line or line.startswith(("Pass ", "e2fsck ", "/", "Fix? no", "Clear? no"))
                or _TOTAL_COUNT.match(line)):
            continue
        line = re.sub(r"'[^']*'|/\S*|\([^)]*\)", "X", line)
        classes.add(re.sub(r"0x[0-9a-f]+|\d+", "N", line)[:100])
    return classes


# An unlinked-but-open file whose blocks could not be freed (damaged bitmaps) stays on
# the orphan list for e2fsck, as the kernel leaves it; e2fsck -n, which does not process
# that list, reports it with these classes (the last orphan's dtime is the list's end, 0).
_LEFT_ORPHAN_CLASSES = ("Deleted inode N has zero dtime", "Inode bitmap differences:",
                        "Block bitmap differences:")


def _orphans_left(image: bytes) -> bool:
    sb = superblock_or_none(image)
    return sb is not None and int(sb.fields["last_orphan"]) != 0


def run_checked(image: bytearray, facts: SeedFacts, ops: tuple[RwOp, ...],
                scratch: Path) -> tuple[RwReport, bytes]:
    """One session under oracles 1-5; any escaping exception fails the caller."""
    tracemalloc.start()
    try:
        report, after = run_session(image, facts, ops, op_timeout=OP_TIMEOUT_S)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < memory_cap(len(image)), f"peak {peak} bytes traced for a {len(image)}-byte image"
    assert report.longest_s < OP_TIMEOUT_S, report
    note_longest(report)
    assert not report.violations, report
    if report.opened and "Corrupt" in report.errnos and after != image:
        baseline = bytes(image)
        if superblock_or_none(baseline) is not None and superblock(baseline).has_incompat(
                F.INCOMPAT_RECOVER):
            baseline = run_session(image, facts, (), op_timeout=OP_TIMEOUT_S)[1]
        _, before_text = fsck(baseline, scratch)
        if "trying backup blocks" not in before_text:
            _, after_text = fsck(after, scratch)
            new = problem_classes(after_text) - problem_classes(before_text)
            if _orphans_left(after) and not _orphans_left(baseline):
                new = {c for c in new if not c.startswith(_LEFT_ORPHAN_CLASSES)}
            assert not new, f"the session added e2fsck problems {new}\n{after_text}"
    return report, after


def superblock(image: bytes) -> Superblock:
    return Superblock.parse(image[SUPERBLOCK_OFFSET:SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE])


def superblock_or_none(image: bytes) -> Superblock | None:
    try:
        return superblock(image)
    except Ext4Error:
        return None


def test_undamaged_sessions_are_clean(seeds: list[Seed], facts: list[SeedFacts],
                                      scratch: Path) -> None:
    """The oracle's baseline: every operation kind on an undamaged seed writes only what
    it owns and leaves a filesystem e2fsck calls clean."""
    for index, seed in enumerate(seeds):
        image = materialise(seeds, Program(index, False, ()))
        report, after = run_checked(image, facts[index], FULL_SESSION, scratch)
        assert report.opened, (seed.name, report)
        assert report.ops > len(FULL_SESSION), (seed.name, report)
        assert "Corrupt" not in report.errnos, (seed.name, report)
        code, text = fsck(after, scratch)
        assert code == 0, f"{seed.name}: e2fsck -fn exit {code}\n{text}"


def _fuzz_rw(seeds: list[Seed], facts: list[SeedFacts], scratch: Path,
             names: tuple[str, ...], examples: int) -> None:
    seed_indexes(seeds, names)  # skip (with the reason) before hypothesis starts

    @settings(
        max_examples=examples,
        deadline=None,  # the per-operation timer bounds time
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(programs(seeds, names), st.lists(st.builds(
        RwOp, st.integers(0, len(KIND_NAMES) - 1), st.integers(0, 2), st.integers(0, 7),
        st.integers(0, 0xFFFF)), min_size=1, max_size=16))
    def check(program: Program, ops: list[RwOp]) -> None:
        run_checked(materialise(seeds, program), facts[program.seed % len(seeds)], tuple(ops),
                    scratch)

    check()


def test_mutated_rw_sessions(seeds: list[Seed], facts: list[SeedFacts], scratch: Path) -> None:
    _fuzz_rw(seeds, facts, scratch, BASE_SEEDS, EXAMPLES)


def test_mutated_rw_sessions_replaying_journals(seeds: list[Seed], facts: list[SeedFacts],
                                                scratch: Path) -> None:
    """Damaged journals replayed onto the device by the rw open, then operations; and the
    EA-inode seed (its xattrs cannot be rewritten yet: refused, never half done)."""
    _fuzz_rw(seeds, facts, scratch, JOURNAL_SEEDS + EA_SEEDS, JOURNAL_EXAMPLES)


# ---- fixed reproducers of what the fuzzer found ----------------------------------------


def _region(seed: Seed, kind: str, index: int | None = None, ino: int = 0) -> int:
    return next(i for i, r in enumerate(seed.regions)
                if r.kind == kind and index in (None, r.index) and (not ino or r.ino == ino))


def BAD_BLOCK_BITMAP_CSUM(seed: Seed) -> Mutation:
    """bg_block_bitmap_csum_lo of group 0 set to 0 (op 1 at +0x18), descriptor re-sealed."""
    return Mutation(_region(seed, "group_desc", index=0), 0x18, 1, 0)


def _open_rw_refused(image: bytes, why: str) -> None:
    fd = os.memfd_create("rw-regression")
    try:
        os.write(fd, image)
        with pytest.raises(Corrupt, match=why):
            open_filesystem(BlockDevice(fd, writable=True, size=len(image)), readonly=False)
        assert os.pread(fd, len(image), 0) == image, "a refused rw open wrote to the image"
    finally:
        os.close(fd)


def test_block_bitmap_on_reserved_gdt_refused(seeds: list[Seed], facts: list[SeedFacts],
                                              scratch: Path) -> None:
    """Found by the fuzzer: group 1 is BLOCK_UNINIT and its (re-sealed) descriptor puts
    the block bitmap on block 3, a primary reserved GDT block. The first inode taken
    in group 1 initialised the bitmap and wrote it over the resize inode's block."""
    index = seed_index(seeds, SEED_CSUM)
    seed = seeds[index]
    # op 7 at offset 0: bg_block_bitmap_lo = interesting_values[3] = 3
    program = Program(index, True, (Mutation(_region(seed, "group_desc", index=1), 0, 7, 3),))
    image = materialise(seeds, program)
    _open_rw_refused(bytes(image), "overlaps a superblock or GDT copy")
    run_checked(image, facts[index], (RwOp(MKDIR, 1, 1, 0),), scratch)


def test_bitmap_outside_its_group_refused(seeds: list[Seed], facts: list[SeedFacts],
                                          scratch: Path) -> None:
    """Without flex_bg a group's bitmaps lie inside the group (the kernel refuses the
    mount otherwise); the fuzzer moved group 1's block bitmap into group 0's free space,
    where the engine would have written it over whatever is allocated there later."""
    index = seed_index(seeds, SEED_EXT2)
    seed = seeds[index]
    # op 2 at offset 0: bg_block_bitmap = 1023, inside group 0 (blocks 1-1024).
    program = Program(index, False, (Mutation(_region(seed, "group_desc", index=1), 0, 2, 1023),))
    _open_rw_refused(bytes(materialise(seeds, program)), "outside the group")


def test_groups_sharing_a_bitmap_refused(seeds: list[Seed]) -> None:
    """Two groups' inode bitmaps on one block (flex_bg, descriptor re-sealed): allocating
    in either group would rewrite the other's bitmap."""
    index = seed_index(seeds, SEED_CSUM)
    seed = seeds[index]
    image = bytearray(seed.image)
    gd0 = seed.regions[_region(seed, "group_desc", index=0)]
    gd1 = seed.regions[_region(seed, "group_desc", index=1)]
    image[gd1.offset + 4:gd1.offset + 8] = image[gd0.offset + 4:gd0.offset + 8]
    reseal(image, [gd1])
    _open_rw_refused(bytes(image), "overlaps the inode bitmap of group 0")


def test_unlink_with_bad_block_bitmap_keeps_the_name(seeds: list[Seed],
                                                     facts: list[SeedFacts],
                                                     scratch: Path) -> None:
    """Found by the fuzzer (oracle 5): unlink removed the name, then freeing the file's
    block failed on group 0's block bitmap checksum, leaving an unattached inode with
    one link. Now the whole unlink is refused first and the image is not made worse."""
    index = seed_index(seeds, SEED_CSUM)
    seed = seeds[index]
    program = Program(index, True, (BAD_BLOCK_BITMAP_CSUM(seed),))
    image = materialise(seeds, program)
    report, after = run_checked(image, facts[index], (RwOp(UNLINK, 2, 2, 0),), scratch)
    assert report.errnos == {"Corrupt": 1}, report
    fd = os.memfd_create("rw-regression")
    try:
        os.write(fd, after)
        fs = open_filesystem(BlockDevice(fd, size=len(after)))
        fs.lookup(fs.lookup(2, b"many"), b"entry-with-a-longish-name-002")  # still there
    finally:
        os.close(fd)


def test_orphan_that_cannot_be_freed_does_not_stop_close(seeds: list[Seed],
                                                         facts: list[SeedFacts],
                                                         scratch: Path) -> None:
    """An unlinked-but-open file whose blocks cannot be freed (bad bitmap) stays on the
    orphan list; close still commits everything and ends the mount."""
    index = seed_index(seeds, SEED_CSUM)
    seed = seeds[index]
    program = Program(index, True, (BAD_BLOCK_BITMAP_CSUM(seed),))
    image = materialise(seeds, program)
    ops = (RwOp(CREATE, 0, 5, 0), RwOp(UNLINK, 2, 2, 1))  # still_open: orphaned
    report, after = run_checked(image, facts[index], ops, scratch)
    assert "Corrupt" not in report.errnos, report  # close did not raise
    sb = superblock(after)
    assert int(sb.fields["last_orphan"]) != 0  # left for e2fsck / the next mount
    fd = os.memfd_create("rw-regression")
    try:
        os.write(fd, after)
        fs = open_filesystem(BlockDevice(fd, size=len(after)))
        fs.lookup(2, b"new0")  # the create before it was committed at close
    finally:
        os.close(fd)


def test_directory_size_short_of_its_blocks(seeds: list[Seed], facts: list[SeedFacts],
                                            scratch: Path) -> None:
    """Found by the fuzzer: the root directory's i_size zeroed (ext2, no checksums) while
    its block stays mapped. Adding a name appended a block at logical 0 and the block-map
    writer's insert raised ValueError ("not a hole"); now the create is Corrupt."""
    index = seed_index(seeds, SEED_EXT2)
    seed = seeds[index]
    # op 1 at +4: the low 16 bits of i_size of inode 2 set to 0.
    program = Program(index, False, (Mutation(_region(seed, "inode", ino=2), 4, 1, 0),))
    report, _ = run_checked(materialise(seeds, program), facts[index],
                            (RwOp(CREATE, 0, 5, 0),), scratch)
    assert report.errnos == {"Corrupt": 1}, report


def test_bitmap_marking_a_live_inode_free_is_refused(seeds: list[Seed], facts: list[SeedFacts],
                                                     scratch: Path) -> None:
    """Found by the fuzzer (oracle 5): group 0's inode bitmap pointer moved 256 blocks
    on (no checksums) to a block marking in-use inodes free. Creating a file handed out
    inode 11 a second time and turned lost+found into a regular file; now the create
    is Corrupt ("marks inode 11 free, but it has links") and nothing is made worse."""
    index = seed_index(seeds, SEED_INLINE)
    seed = seeds[index]
    # op 0 at offset 5: byte 1 of bg_inode_bitmap_lo set to 1 (+256 blocks).
    program = Program(index, False, (Mutation(_region(seed, "group_desc", index=0), 5, 0, 1),))
    report, _ = run_checked(materialise(seeds, program), facts[index],
                            (RwOp(CREATE, 0, 5, 0), RwOp(WRITE, 0, 5, 1)), scratch)
    assert report.errnos.get("Corrupt", 0) >= 1, report


def test_replayed_directory_size_beyond_the_filesystem(seeds: list[Seed],
                                                       facts: list[SeedFacts],
                                                       scratch: Path) -> None:
    """Found by atheris (--rw): the journal's logged copy of the root inode says i_size
    ~4 GiB; after the rw replay, a create scanned the directory block by block until
    the time bound. Now the directory is Corrupt for writers as it is for readers."""
    index = seed_index(seeds, "journal-nocsum-1k")
    seed = seeds[index]
    # The root inode's second region is its logged copy (what the replay writes).
    root = [i for i, r in enumerate(seed.regions) if r.kind == "inode" and r.ino == 2][-1]
    assert seed.regions[root].offset // seed.block_size in seed.journal
    program = Program(index, False, (Mutation(root, 4, 2, 0xFFFFFC00),))  # i_size_lo
    report, _ = run_checked(materialise(seeds, program), facts[index],
                            (RwOp(CREATE, 0, 5, 0), RwOp(MKDIR, 0, 6, 0)), scratch)
    assert report.errnos == {"Corrupt": 2}, report


def test_orphan_left_with_both_bitmaps_damaged(seeds: list[Seed], facts: list[SeedFacts],
                                              scratch: Path) -> None:
    """Found by the fuzzer (oracle 5, a false alarm): both bitmap checksums of group 0
    zeroed and re-sealed; an unlinked-but-open file cannot be freed and stays on the
    orphan list, which e2fsck -n reports as a deleted inode with zero dtime and bitmap
    differences. That is the pending orphan, not damage done by the session. The
    write itself succeeds: allocation skips the group whose bitmaps fail their
    checksums (bad_groups), as the kernel does."""
    index = seed_index(seeds, SEED_CSUM)
    seed = seeds[index]
    # op 2 at offset 24: bg_block_bitmap_csum_lo and bg_inode_bitmap_csum_lo set to 0.
    program = Program(index, True, (Mutation(_region(seed, "group_desc", index=0), 24, 2, 0),))
    report, after = run_checked(materialise(seeds, program), facts[index],
                                (RwOp(WRITE, 0, 0, 2), RwOp(UNLINK, 0, 1, 1)), scratch)
    assert report.errnos == {}, report
    assert _orphans_left(after)


def test_report_longest_operation() -> None:
    """Not a check: prints the slowest operation of the fuzz tests run so far in this
    session, read and rw (run with -s to see it)."""
    from fuzz.test_fuzz_mutations import LONGEST

    print(f"\nlongest fuzzed operation so far: {LONGEST[0][0]:.3f}s ({LONGEST[0][1]})")


def test_write_to_a_directory_through_a_damaged_dot_entry(
        seeds: list[Seed], facts: list[SeedFacts], scratch: Path) -> None:
    """Found by the fuzzer (oracle 5): the root's "." entry damaged to name inode 1;
    a write op whose name resolved to a directory wrote its byte into that
    directory's block (its "." lost its inode number). The overwrite fast path
    maps through the engine's cache and never reached write_begin's checks; every
    engine write now asks the filesystem first (IsADirectory, nothing written)."""
    index = seed_index(seeds, SEED_EXT2)
    seed = seeds[index]
    # op 0 at offset 0: the low byte of the root's "." inode number set to 1.
    program = Program(index, False, (Mutation(_region(seed, "dir_block", ino=2), 0, 0, 1),))
    report, _ = run_checked(materialise(seeds, program), facts[index],
                            (RwOp(WRITE, 0, 2, 0), RwOp(WRITE, 0, 3, 0)), scratch)
    assert report.errnos.get("IsADirectory") == 1, report


@pytest.mark.parametrize("op, value", [(4, 41), (1, 63)], ids=["above-the-group", "over-live"])
def test_unused_inodes_count_beyond_the_group_is_refused(
        seeds: list[Seed], facts: list[SeedFacts], scratch: Path, op: int, value: int) -> None:
    """Found by the fuzzer (oracle 5): group 1's bg_itable_unused set to 127 in a group
    of 64 inodes (descriptor re-sealed, table never zeroed). The first inode taken in
    group 1 "zeroed the slots newly brought under the used mark" from slot 64 - 127 =
    -63 on, i.e. the tail of group 0's table, the journal inode (8) among them; e2fsck
    then found no journal. Its sibling: 63 unused of 64 while 22 slots are in use
    zeroed 21 live inodes. Now the allocation is Corrupt and nothing is zeroed."""
    index = seed_index(seeds, SEED_CSUM)
    seed = seeds[index]
    # At offset 28, bg_itable_unused_lo: op 4 sets interesting_values[41 % 31] = 127,
    # op 1 sets 63.
    program = Program(index, True,
                      (Mutation(_region(seed, "group_desc", index=1), 28, op, value),))
    image = materialise(seeds, program)
    report, after = run_checked(image, facts[index],
                                (RwOp(CREATE, 0, 5, 0), RwOp(CREATE, 1, 0, 0)), scratch)
    start, size = facts[index].inode_offsets[JOURNAL_INO]
    assert after[start:start + size] == image[start:start + size], "the journal inode changed"
    # Oracle 5 even without a Corrupt answer: the zeroing was silent on live inodes.
    new = problem_classes(fsck(after, scratch)[1]) - problem_classes(fsck(bytes(image), scratch)[1])
    assert not new, new
    assert report.errnos.get("Corrupt", 0) >= 1, report


def test_replayed_bitmap_freeing_a_file_is_not_allocated_from(seeds: list[Seed],
                                                             facts: list[SeedFacts],
                                                             scratch: Path) -> None:
    """Found by the fuzzer (oracle 4, "block 209 of bystander inode 18 written"): the
    journal's logged copy of group 0's block bitmap (no checksums) had a byte zeroed,
    marking blocks 209-216 of inode 18 free after the replay; the allocator handed them
    out and a write overwrote the file. Now a bitmap whose free count disagrees with its
    descriptor is Corrupt (as the kernel refuses the group) and allocation goes elsewhere."""
    index = seed_index(seeds, "journal-nocsum-1k")
    seed = seeds[index]
    fd = os.memfd_create("rw-regression")
    try:
        os.write(fd, seed.image)
        seed_fs = open_filesystem(BlockDevice(fd, size=len(seed.image)))
        bitmap_block = seed_fs.groups.descs[0].block_bitmap
    finally:
        os.close(fd)
    logged = next(i for i, r in enumerate(seed.regions)
                  if r.kind == "journal_logged" and r.index == bitmap_block)
    assert 209 in facts[index].bystanders[18]  # bit 208 of group 0 (first block 1)
    program = Program(index, False, (Mutation(logged, 26, 0, 0),))  # op 0: byte 26 = 0
    image = materialise(seeds, program)
    fd = os.memfd_create("rw-regression")
    try:
        os.write(fd, image)
        fs = open_filesystem(BlockDevice(fd, writable=True, size=len(image)), readonly=False)
        got = fs.blocks.alloc_block(1)  # goal: the start of group 0
        owners = [ino for ino, blocks in facts[index].bystanders.items() if got in blocks]
        assert not owners, f"block {got} of inode {owners} handed out"
        with pytest.raises(Corrupt, match="free in the bitmap"):
            fs.blocks.bitmap(0)
        fs.close()
    finally:
        os.close(fd)
    run_checked(image, facts[index], (RwOp(CREATE, 0, 5, 0), RwOp(WRITE, 0, 5, 0x3f00)),
                scratch)
