"""Structure-aware mutation fuzzing of the read side, bounded for CI.

Hypothesis picks a seed image (tests/fuzz/seeds.py), a few metadata
structures of it (located by regions.py with our own parsers), edits fields
in them, and on the metadata_csum seed either re-seals the checksums with the
engine's checksum functions (so the parsers behind the checksum gate see the
damage) or leaves them stale. driver.exercise then does what a mount and a
full walk would. Oracles: only Ext4Error subclasses escape, no operation
takes longer than OP_TIMEOUT_S, and traced memory stays under a cap tied to
the image size.

EXT4BOX_FUZZ_EXAMPLES raises the example count for a longer local run.
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.driver import OP_TIMEOUT_S, Report, exercise, quiet_logs
from fuzz.program import Program, Seed, load_seeds, materialise
from fuzz.regions import Mutation
from fuzz.seeds import build_seed_images

EXAMPLES = int(os.environ.get("EXT4BOX_FUZZ_EXAMPLES", "600"))
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
    return report


@st.composite
def programs(draw: st.DrawFn, seeds: list[Seed]) -> Program:
    seed_index = draw(st.integers(0, len(seeds) - 1))
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


def test_mutated_metadata_never_crashes_or_hangs(seeds: list[Seed]) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,  # the per-operation timer bounds time; hypothesis' deadline is noisy
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(programs(seeds))
    def check(program: Program) -> None:
        run_checked(materialise(seeds, program))

    check()
