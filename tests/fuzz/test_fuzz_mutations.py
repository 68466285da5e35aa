"""Structure-aware mutation fuzzing of the read side, bounded for CI.

Hypothesis picks a seed image (tests/fuzz/seeds.py), a few metadata
structures of it (located by regions.py with our own parsers), edits fields
in them, and on the metadata_csum seed either re-seals the checksums with the
engine's checksum functions (so the parsers behind the checksum gate see the
damage) or leaves them stale. driver.exercise then does what a mount and a
full walk would. Oracles: only Ext4Error subclasses escape, no operation
takes longer than OP_TIMEOUT_S, and traced memory stays under a cap tied to
the image size.

The journal seeds (a log needing recovery, with and without journal
checksums) and the EA-inode seed have tests of their own, so the base
seeds keep their share of examples: mutations there reach recovery (the
read-only overlay) and EA-inode values.

EXT4BOX_FUZZ_EXAMPLES (base seeds, default 600), EXT4BOX_FUZZ_JOURNAL_EXAMPLES
(default 400) and EXT4BOX_FUZZ_EA_EXAMPLES (default 200) raise the example
counts for a longer local run.
"""

from __future__ import annotations

import os
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
from ext4box.ext4.journal.overlay import OverlayDevice
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.read.filesystem import Filesystem
from fuzz.driver import OP_TIMEOUT_S, Report, exercise, quiet_logs
from fuzz.program import Program, Seed, load_seeds, materialise
from fuzz.regions import JOURNAL_KINDS, Mutation
from fuzz.seed_ea_inode import EA_VALUES, ea_value
from fuzz.seeds import (
    EA_INODE_SEED_SPECS,
    JOURNAL_SEED_SPECS,
    SEED_SPECS,
    UNAVAILABLE,
    build_seed_images,
)

EXAMPLES = int(os.environ.get("EXT4BOX_FUZZ_EXAMPLES", "600"))
JOURNAL_EXAMPLES = int(os.environ.get("EXT4BOX_FUZZ_JOURNAL_EXAMPLES", "400"))
EA_EXAMPLES = int(os.environ.get("EXT4BOX_FUZZ_EA_EXAMPLES", "200"))
BASE_SEEDS = tuple(spec.name for spec in SEED_SPECS)
JOURNAL_SEEDS = tuple(spec.name for spec in JOURNAL_SEED_SPECS)
EA_SEEDS = tuple(spec.name for spec in EA_INODE_SEED_SPECS)
MEMORY_CAP_BASE = 64 << 20  # bytes of Python allocations beyond the image itself


def memory_cap(image_size: int) -> int:
    return MEMORY_CAP_BASE + 4 * image_size


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    missing = [t for t in ("mkfs.ext4", "e2fsck") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    return load_seeds(build_seed_images(tmp_path_factory.mktemp("fuzz-seeds")))


@pytest.fixture(scope="module", autouse=True)
def _quiet() -> Iterator[None]:
    saved = quiet_logs()
    yield
    structlog.configure(**saved)


def run_checked(image: bytearray) -> Report:
    """exercise() under the memory oracle; any escaping exception fails the caller."""
    tracemalloc.start()
    try:
        report = exercise(image, op_timeout=OP_TIMEOUT_S)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < memory_cap(len(image)), f"peak {peak} bytes traced for a {len(image)}-byte image"
    assert report.longest_s < OP_TIMEOUT_S, report
    note_longest(report)
    return report


LONGEST: list[tuple[float, str]] = [(0.0, "")]  # the slowest operation seen, for the report


def note_longest(report: Report) -> None:
    LONGEST[0] = max(LONGEST[0], (report.longest_s, report.longest_op))


def seed_indexes(seeds: list[Seed], names: tuple[str, ...]) -> list[int]:
    """Indexes of the named seeds that this machine could build (skips if none)."""
    found = [i for i, seed in enumerate(seeds) if seed.name in names]
    if not found:
        reasons = "; ".join(f"{n}: {UNAVAILABLE.get(n, 'not built')}" for n in names)
        pytest.skip(f"no seed image available ({reasons})")
    return found


@st.composite
def programs(draw: st.DrawFn, seeds: list[Seed], names: tuple[str, ...] = BASE_SEEDS
             ) -> Program:
    seed_index = draw(st.sampled_from(seed_indexes(seeds, names)))
    seed = seeds[seed_index]
    # Choose the kind of structure first: inodes outnumber everything else.
    by_kind: dict[str, list[int]] = {}
    for index, region in enumerate(seed.regions):
        by_kind.setdefault(region.kind, []).append(index)
    kinds = sorted(by_kind)
    mutations = []
    for _ in range(draw(st.integers(1, 6))):
        indexes = by_kind[draw(st.sampled_from(kinds))]
        mutations.append(Mutation(
            region=draw(st.sampled_from(indexes)),
            offset=draw(st.integers(0, 0xFFFF)),
            op=draw(st.integers(0, 8)),
            value=draw(st.one_of(st.integers(0, 64), st.integers(0, (1 << 64) - 1))),
        ))
    return Program(seed_index, draw(st.booleans()), tuple(mutations))


def test_seed_images_are_walked_cleanly(seeds: list[Seed]) -> None:
    """The driver reaches everything on an undamaged image, and nothing fails."""
    for index, seed in enumerate(seeds):
        report = run_checked(materialise(seeds, Program(index, False, ())))
        assert report.opened, seed.name
        assert report.ops > 400, (seed.name, report)
        # Only the ACL probes (NoData) and the deliberate missing name (NotFound) fail.
        assert set(report.errnos) <= {"NoData", "NotFound"}, (seed.name, report)


def _fuzz(seeds: list[Seed], names: tuple[str, ...], examples: int) -> None:
    seed_indexes(seeds, names)  # skip (with the reason) before hypothesis starts

    @settings(
        max_examples=examples,
        deadline=None,  # the per-operation timer bounds time; hypothesis' deadline is noisy
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(programs(seeds, names))
    def check(program: Program) -> None:
        run_checked(materialise(seeds, program))

    check()


def test_mutated_metadata_never_crashes_or_hangs(seeds: list[Seed]) -> None:
    _fuzz(seeds, BASE_SEEDS, EXAMPLES)


def test_mutated_journals_never_crash_or_hang(seeds: list[Seed]) -> None:
    """Edits of the journal superblock, descriptor/commit/revoke blocks, logged copies
    and the structures recovery serves from them, through the read-only overlay."""
    _fuzz(seeds, JOURNAL_SEEDS, JOURNAL_EXAMPLES)


def test_mutated_ea_inodes_never_crash_or_hang(seeds: list[Seed]) -> None:
    _fuzz(seeds, EA_SEEDS, EA_EXAMPLES)


# ---- the new seeds are what they claim to be -------------------------------------------


def _opened(image: bytes) -> tuple[int, Filesystem]:
    fd = os.memfd_create("fuzz-seed-check")
    os.write(fd, image)
    return fd, open_filesystem(BlockDevice(fd, size=len(image)))


def test_journal_seeds_need_recovery_and_replay_as_e2fsck_does(
    seeds: list[Seed], tmp_path: Path
) -> None:
    """The journal seeds need recovery, every journal region kind is there, and the
    read-only overlay shows what e2fsck's replay writes (outside the two superblocks)."""
    for index in seed_indexes(seeds, JOURNAL_SEEDS):
        seed = seeds[index]
        assert {r.kind for r in seed.regions} >= set(JOURNAL_KINDS), seed.name
        copy = tmp_path / f"{seed.name}.img"
        copy.write_bytes(seed.image)
        done = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(copy)],
                              capture_output=True, text=True, check=False)
        assert done.returncode in (0, 1), done.stdout
        reference = copy.read_bytes()
        fd, fs = _opened(seed.image)
        try:
            assert isinstance(fs.dev, OverlayDevice), f"{seed.name}: nothing to recover"
            seen = fs.dev.pread(0, len(seed.image))
            fs.lookup(fs.lookup(2, b"journaled"), b"new.bin")  # only in the journal
        finally:
            os.close(fd)
        bs = seed.block_size
        differing = {b for b in range(len(reference) // bs)
                     if seen[b * bs:(b + 1) * bs] != reference[b * bs:(b + 1) * bs]}
        assert differing <= {1024 // bs, seed.journal[0]}, (seed.name, differing)


def test_ea_inode_seed_serves_the_kernel_values(seeds: list[Seed]) -> None:
    for index in seed_indexes(seeds, EA_SEEDS):
        seed = seeds[index]
        assert sum(r.kind == "ea_inode" for r in seed.regions) == len(EA_VALUES) - 1  # one shared
        fd, fs = _opened(seed.image)
        try:
            for rel, name, size in EA_VALUES:
                ino = 2
                for part in rel.split("/"):
                    ino = fs.lookup(ino, part.encode())
                assert fs.getxattr(ino, name.encode()) == ea_value(name, size), (rel, name)
        finally:
            os.close(fd)


def test_report_longest_operation() -> None:
    """Not a check: prints the slowest operation of this module (run with -s to see it)."""
    print(f"\nlongest fuzzed read operation: {LONGEST[0][0]:.3f}s ({LONGEST[0][1]})")
