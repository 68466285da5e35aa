"""The mapping cache's per-inode runs: forgetting a range keeps exactly the rest.

A model holds one entry per logical block (physical block, hole, unwritten);
the cache's answers for every block are compared with it after any sequence
of inserts and forgets.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ext4box.ext4.format.blockrun import BlockRun
from ext4box.iomap.cache import InodeRuns, MappingCache

_SPAN = 64


@st.composite
def _layouts(draw: st.DrawFn) -> list[BlockRun]:
    """Runs tiling [0, _SPAN) with gaps left out (as a walk would produce them)."""
    runs: list[BlockRun] = []
    cursor = 0
    while cursor < _SPAN:
        length = draw(st.integers(1, 9))
        length = min(length, _SPAN - cursor)
        kind = draw(st.sampled_from(["data", "hole", "unwritten", "gap"]))
        if kind != "gap":
            pblk = None if kind == "hole" else 1000 + 17 * cursor
            runs.append(BlockRun(cursor, length, pblk, kind == "unwritten"))
        cursor += length
    return runs


def _per_block(runs: list[BlockRun]) -> dict[int, tuple[int | None, bool]]:
    out = {}
    for run in runs:
        for i in range(run.length):
            out[run.lblk + i] = (None if run.pblk is None else run.pblk + i, run.unwritten)
    return out


@settings(max_examples=300, deadline=None)
@given(layout=_layouts(), forgets=st.lists(st.tuples(st.integers(0, _SPAN), st.integers(0, 20)),
                                          max_size=5))
def test_forget_keeps_exactly_what_lies_outside(layout: list[BlockRun],
                                               forgets: list[tuple[int, int]]) -> None:
    entry = InodeRuns()
    entry.insert(layout)
    model = _per_block(layout)
    for start, length in forgets:
        entry.forget(start, start + length)
        for lblk in range(start, start + length):
            model.pop(lblk, None)
    assert entry.starts == sorted(entry.starts) == [r.lblk for r in entry.runs]
    assert all(a.end <= b.lblk for a, b in zip(entry.runs, entry.runs[1:], strict=False))
    found, gaps = entry.covering(0, _SPAN)
    assert _per_block(found) == model
    assert {b for start, end in gaps for b in range(start, end)} == set(range(_SPAN)) - set(model)


def test_invalidate_range_of_an_unknown_inode_is_nothing() -> None:
    cache = MappingCache()
    cache.invalidate_range(7, 0, 10)
    with cache.lock:
        assert cache.runs_for(7).covering(0, 10) == ([], [(0, 10)])
