"""Crash consistency of `ext4box serve -o rw`: kill -9 mid-workload, replay, check.

Hundreds of seeded iterations (crash_support.run_iteration): a random write
workload, SIGKILL at a random moment, then replays by ext4box, e2fsck and the
kernel, each followed by `e2fsck -fn` and the model checks (fsynced files
intact, no file showing another file's or stale data). Where the crashed
image has a journal to replay, every check must pass; without one (or before
the server journals its writes) the repairs e2fsck would need are recorded
(`record_property`, and printed) rather than failed.

EXT4BOX_CRASH_ITERATIONS scales the per-variant counts (a factor, default 1),
EXT4BOX_CRASH_SEED fixes the first seed (default: random, printed). A failing
iteration prints a --repro string for bench/soak_crash.py.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from crash_content import UNIT, UnitId, parse_unit, units_bytes
from crash_model import Model
from crash_support import (
    REPLAYERS,
    VARIANTS,
    IterationResult,
    Plan,
    crash,
    crash_after,
    fast_scratch,
    fsck,
    image_flags,
    make_base_image,
    plan_for,
    read_file,
    replayed_copy,
    run_iteration,
)
from crash_verify import check, read_image
from journal_support import fsync_path

from support.kernel import kernel_mount, why_no_kernel_mounts

pytestmark = pytest.mark.usefixtures("need_fuse")

# Iterations per variant in CI: 208 kills in all, measured at 140 s on tmpfs (2 cores).
CI_ITERATIONS = {"4k-csum": 64, "4k-nocsum": 48, "1k-csum": 64, "4k-nojournal": 32}
KERNEL_EVERY = 4  # the kernel replay costs a loop mount: every 4th iteration
_MAX_DELAY_S = 0.7
_MAX_OPS = 250
_REPORTED_FAILURES = 4

# Iterations that once failed, kept as regressions (plans are reproducible; "ops" kills
# land at the same op every time).
KNOWN_PLANS = [
    # Metadata blocks (an extent leaf; a directory block over an fsynced file) freed
    # in the commit that logged them, reused as file data, and written back over the
    # data by every replay: the journal logged them without a revoke (63e9963).
    "4k-csum:1004715421:ops:322:ext4box,e2fsck,kernel",
    "1k-csum:31024:ops:220:ext4box,e2fsck,kernel",
]


def _first_seed() -> int:
    value = os.environ.get("EXT4BOX_CRASH_SEED")
    return int(value) if value else random.randrange(1 << 31)


def _scale() -> float:
    return float(os.environ.get("EXT4BOX_CRASH_ITERATIONS", "1"))


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("detaching a killed server's mount (umount -l) needs root")
    for tool in ("mkfs.ext4", "e2fsck", "debugfs", "dumpe2fs"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    path = Path(tempfile.mkdtemp(prefix="crash-consistency-", dir=fast_scratch()))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def bases(scratch: Path) -> dict[str, Path]:
    return {name: make_base_image(variant, scratch / f"base-{name}.img")
            for name, variant in VARIANTS.items()}


def _run(plans: list[Plan], bases: dict[str, Path], work: Path) -> list[IterationResult]:
    return [run_iteration(plan, bases[plan.variant], work) for plan in plans]


def _summarise(results: list[IterationResult], record_property) -> str:
    journal = sum(r.journal_case for r in results)
    before = Counter(r.before.verdict for r in results if r.before is not None)
    after = Counter(f"{o.replayer} {o.fsck.verdict}" for r in results for o in r.replays
                    if o.fsck is not None)
    notes = Counter(n.split(":")[0] for r in results for n in r.notes)
    seconds = sum(r.seconds for r in results)
    text = (f"{len(results)} iterations in {seconds:.0f} s, {sum(r.ops for r in results)} ops, "
            f"{sum(r.survivors for r in results)} must-survive files, {journal} with a "
            f"journal to replay; e2fsck -fn before replay {dict(before)}, after "
            f"{dict(sorted(after.items()))}; notes {dict(notes)}")
    record_property("crash_summary", text)
    print(text)
    return text


def _assert_no_failures(results: list[IterationResult], seed_note: str) -> None:
    failed = [r for r in results if r.failures]
    if failed:
        reports = "\n".join(r.report() for r in failed[:_REPORTED_FAILURES])
        raise AssertionError(f"{len(failed)} of {len(results)} crash iterations failed "
                             f"({seed_note}):\n{reports}")


@pytest.mark.parametrize("variant", sorted(CI_ITERATIONS))
def test_kill_9_at_random_points(variant: str, bases: dict[str, Path], scratch: Path,
                                 record_property) -> None:
    first = _first_seed()
    count = max(1, round(CI_ITERATIONS[variant] * _scale()))
    seed_note = f"EXT4BOX_CRASH_SEED={first}"
    print(f"{variant}: {count} iterations, {seed_note}")
    record_property("crash_first_seed", first)
    plans = [plan_for(variant, first + i, max_delay_s=_MAX_DELAY_S, max_ops=_MAX_OPS,
                      kernel=i % KERNEL_EVERY == 0) for i in range(count)]
    results = _run(plans, bases, scratch / variant)
    _summarise(results, record_property)
    _assert_no_failures(results, seed_note)


@pytest.mark.parametrize("variant", ["4k-csum", "1k-csum"])
def test_kill_9_after_a_timer_commit(variant: str, bases: dict[str, Path], scratch: Path,
                                     record_property) -> None:
    """Killed between 5.5 and 6.5 s in: the 5 s commit timer has run once, with no
    fsync to force it."""
    first = _first_seed()
    rng = random.Random(first)
    plan = Plan(variant, first, "delay", round(rng.uniform(5.5, 6.5), 3), REPLAYERS)
    results = _run([plan], bases, scratch / f"timer-{variant}")
    _summarise(results, record_property)
    _assert_no_failures(results, f"EXT4BOX_CRASH_SEED={first}")


@pytest.mark.parametrize("repro", KNOWN_PLANS)
def test_known_crash_plans(repro: str, bases: dict[str, Path], scratch: Path) -> None:
    results = _run([Plan.parse(repro)], bases, scratch / "known")
    _assert_no_failures(results, repro)


# ---- directed: freed metadata blocks reused as data ------------------------------

_FILL_ID = 7


def _free_an_extent_leaf(root: Path, block_size: int, *, commit_between: bool) -> None:
    """A file of 40 separate extents (the inode holds 4: a leaf block), deleted; with
    `commit_between`, the file is committed first, else both happen in one commit."""
    fd = os.open(root / "fragmented", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for i in range(0, 80, 2):
            os.pwrite(fd, b"x" * block_size, i * block_size)
        if commit_between:
            os.fsync(fd)
    finally:
        os.close(fd)
    if commit_between:
        fsync_path(root)
    os.unlink(root / "fragmented")
    fsync_path(root)


def _free_directory_blocks(root: Path, block_size: int, *, commit_between: bool) -> None:
    """A directory of several blocks, emptied and removed (committed in between, or not)."""
    directory = root / "dir"
    directory.mkdir()
    names = [f"{i:04d}-" + "n" * 100 for i in range(block_size // 110 * 6)]
    for name in names:
        (directory / name).touch()
    if commit_between:
        fsync_path(directory)
        fsync_path(root)
    for name in names:
        (directory / name).unlink()
    directory.rmdir()
    fsync_path(root)


def _fill(root: Path) -> int:
    """One file over nearly all free space (so it takes the freed blocks), committed."""
    st = os.statvfs(root)
    units = st.f_bavail * st.f_frsize * 9 // 10 // UNIT
    fd = os.open(root / "fill", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for first in range(0, units, 2048):
            count = min(2048, units - first)
            os.pwrite(fd, units_bytes(_FILL_ID, 1, first, count), first * UNIT)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(root)
    return units


@pytest.mark.parametrize("variant", ["4k-csum", "1k-csum", "4k-nocsum"])
@pytest.mark.parametrize("freed", ["extent-leaf", "directory"])
@pytest.mark.parametrize("when", ["same-commit", "later-commit"])
def test_freed_metadata_reused_as_data_survives_replay(
        variant: str, freed: str, when: str, bases: dict[str, Path], scratch: Path) -> None:
    """A metadata block freed (in the commit that wrote it, or in a later one) and
    then written as file data keeps the data through every replay: the journal
    must revoke it, or never log it, once it is freed."""
    work = scratch / f"directed-{variant}-{freed}-{when}"
    work.mkdir(parents=True, exist_ok=True)
    image = work / "crashed.img"
    shutil.copyfile(bases[variant], image)
    block_size = VARIANTS[variant].block_size
    free = _free_an_extent_leaf if freed == "extent-leaf" else _free_directory_blocks
    units = 0

    def steps(root: Path) -> None:
        nonlocal units
        free(root, block_size, commit_between=when == "later-commit")
        units = _fill(root)

    crash_after(image, work, steps)
    has_journal, needs_recovery = image_flags(image)
    problems = []
    for replayer in REPLAYERS:
        if replayer == "kernel" and why_no_kernel_mounts() is not None:
            continue
        copy, error = replayed_copy(replayer, image, work)
        if error:
            problems.append(f"{replayer}: replay failed: {error}")
        result = fsck(copy)
        if not result.clean and has_journal and needs_recovery:
            problems.append(f"{replayer}: e2fsck -fn exit {result.returncode}: "
                            f"{result.problems[:5]}")
        data = read_file(copy, "fill", work)
        copy.unlink()
        if data is None or len(data) != units * UNIT:
            problems.append(f"{replayer}: fsynced fill file has "
                            f"{None if data is None else len(data)} bytes, not {units * UNIT}")
            continue
        bad = [(i, parse_unit(data[i * UNIT : (i + 1) * UNIT])) for i in range(units)
               if data[i * UNIT : (i + 1) * UNIT] != units_bytes(_FILL_ID, 1, i, 1)]
        if bad:
            problems.append(f"{replayer}: {len(bad)} units of the fsynced fill file "
                            f"overwritten, first: unit {bad[0][0]} = {bad[0][1]}")
    shutil.rmtree(work, ignore_errors=True)
    assert not problems, (f"journal={has_journal} needs_recovery={needs_recovery}:\n"
                          + "\n".join(problems))


# ---- the checker itself ------------------------------------------------------------


def _crashed_and_replayed(bases: dict[str, Path], work: Path, *, seed: int,
                          ops: int) -> tuple[Path, Model, Path]:
    """A 4k-nojournal crash after `ops` ops, replayed by e2fsck: (work, model, image)."""
    work.mkdir(parents=True, exist_ok=True)
    image = work / "crashed.img"
    shutil.copyfile(bases["4k-nojournal"], image)
    plan = Plan("4k-nojournal", seed, "ops", ops, ())
    model = crash(plan, image, work, IterationResult(plan))
    copy, error = replayed_copy("e2fsck", image, work)
    assert error is None
    return work, model, copy


def test_checker_reports_injected_damage(bases: dict[str, Path], scratch: Path) -> None:
    """Damage injected into what debugfs read back from a crashed image is reported
    as the kind it is: another file's unit (foreign), a unit from another offset
    (stale), zeros over fsynced data and a changed must-survive file (lost)."""
    work, model, copy = _crashed_and_replayed(bases, scratch / "checker", seed=99, ops=400)
    tree = read_image(copy, work)
    baseline = {str(f) for f in check(model, tree)}
    survivor = max(model.survive.values(), key=lambda r: sum(1 for g in r.gens if g),
                   default=None)
    assert survivor is not None, "the workload left no must-survive file"
    data = tree.files[survivor.path]
    written = [i for i, g in enumerate(survivor.gens) if g]
    assert len(written) >= 2, "the survivor has too little data to damage"
    first, second = written[0], written[1]
    foreign_unit = next(
        d[i * UNIT : (i + 1) * UNIT] for _, d in sorted(tree.files.items())
        for i in range(len(d) // UNIT)
        if isinstance(u := parse_unit(d[i * UNIT : (i + 1) * UNIT]), UnitId)
        and u.file_id != survivor.fid)

    def kinds(unit: bytes) -> set[str]:
        """The kinds of the new findings when unit `first` of the survivor is `unit`."""
        tree.files[survivor.path] = data[: first * UNIT] + unit + data[(first + 1) * UNIT :]
        found = [f for f in check(model, tree) if str(f) not in baseline]
        tree.files[survivor.path] = data
        return {f.kind for f in found if f.path == survivor.path}

    assert {"foreign", "lost"} <= kinds(foreign_unit)
    assert {"stale", "lost"} <= kinds(data[second * UNIT : (second + 1) * UNIT])
    assert "lost" in kinds(bytes(UNIT))
    shutil.rmtree(work, ignore_errors=True)


def test_checker_reads_an_image_whose_bitmap_fails_its_checksum(
        bases: dict[str, Path], scratch: Path) -> None:
    """A crash without a journal can leave a block bitmap written and its group
    descriptor (which holds the bitmap's checksum) not yet: debugfs then refuses a
    normal open, which once read as every file lost. The checker must read such an
    image all the same, and find exactly what it found before the damage."""
    work, model, copy = _crashed_and_replayed(bases, scratch / "bitmap-csum", seed=7, ops=120)
    before = read_image(copy, work)
    assert before.files, "the workload left no file to read"
    groups = subprocess.run(["dumpe2fs", str(copy)], capture_output=True, text=True,
                            check=True).stdout
    bitmap_block = int(re.search(r"Block bitmap at (\d+)", groups)[1])
    with copy.open("r+b") as f:  # one free block of group 0 marked in use
        offset = bitmap_block * 4096 + 4095
        f.seek(offset)
        last = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([last ^ 0x80]))
    assert any("does not match checksum" in line for line in fsck(copy).problems)
    after = read_image(copy, work)
    assert (after.dirs, after.files) == (before.dirs, before.files)
    assert {str(f) for f in check(model, after)} == {str(f) for f in check(model, before)}
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.usefixtures("need_kernel_mounts")
@pytest.mark.parametrize("freed", ["extent-leaf", "directory"])
def test_freed_metadata_scenario_on_the_kernel(freed: str, bases: dict[str, Path],
                                               scratch: Path) -> None:
    """The reference for the test above: the kernel's ext4, crashed at the same point
    (the image copied while still mounted), keeps the fill file through replay."""
    work = scratch / f"kernel-{freed}"
    work.mkdir(parents=True, exist_ok=True)
    image = work / "live.img"
    shutil.copyfile(bases["4k-csum"], image)
    free = _free_an_extent_leaf if freed == "extent-leaf" else _free_directory_blocks
    with kernel_mount(image, work / "mnt", readonly=False, options="commit=600") as root:
        free(root, VARIANTS["4k-csum"].block_size, commit_between=False)
        units = _fill(root)
        shutil.copyfile(image, work / "crashed.img")
    assert image_flags(work / "crashed.img") == (True, True)
    copy, error = replayed_copy("e2fsck", work / "crashed.img", work)
    assert error is None
    assert fsck(copy).clean
    assert read_file(copy, "fill", work) == units_bytes(_FILL_ID, 1, 0, units)
    shutil.rmtree(work, ignore_errors=True)
