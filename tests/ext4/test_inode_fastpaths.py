"""The inode shortcuts taken for speed give what the long way gives.

`inode_as_stored` stands in for parsing the bytes `encode_inode` just built
(InodeTable.write), and `replace_inode` for `dataclasses.replace`. Both are
checked against the long way on generated inodes, including the values where
encoding changes them (clamped and second-only times, huge_file units, short
extra parts), where the shortcut must decline.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext4box.ext4.format.inode import (
    FL_EXTENTS,
    FL_HUGE_FILE,
    Inode,
    blank_inode,
    encode_inode,
    inode_as_stored,
    replace_inode,
)

NS = 1_000_000_000
# Around every boundary of the time encoding: signed 32-bit seconds, the two
# epoch bits of the extra word, and beyond both.
_TIMES = st.one_of(
    st.integers(min_value=-(1 << 31) * NS - 5 * NS, max_value=((1 << 31) + (3 << 32) + 5) * NS),
    st.sampled_from([0, -1, (1 << 31) * NS - 1, (1 << 31) * NS, -(1 << 31) * NS,
                     -(1 << 31) * NS - 1, ((1 << 31) + (3 << 32)) * NS - 1,
                     ((1 << 31) + (3 << 32)) * NS]),
)


@st.composite
def inodes(draw: st.DrawFn) -> tuple[Inode, bool, int | None]:
    inode_size = draw(st.sampled_from([128, 256, 160, 144]))
    extra = draw(st.sampled_from([0, 4, 16, 24, 28, 32]))
    seed = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=0xFFFFFFFF)))
    ino = draw(st.integers(min_value=1, max_value=0xFFFFFFFF))
    base = blank_inode(ino, inode_size, fs_csum_seed=seed,
                       generation=draw(st.integers(0, 0xFFFFFFFF)), extra_isize=extra)
    huge_file = draw(st.booleans())
    flags = draw(st.sampled_from([0, FL_EXTENTS, FL_EXTENTS | FL_HUGE_FILE, 0x10]))
    blocks = draw(st.one_of(st.integers(0, 1 << 20), st.integers((1 << 32) - 2, 1 << 40)))
    if not huge_file:
        blocks %= 1 << 32
    inode = dataclasses.replace(
        base,
        mode=draw(st.integers(0, 0xFFFF)),
        uid=draw(st.integers(0, 0xFFFFFFFF)),
        gid=draw(st.integers(0, 0xFFFFFFFF)),
        size=draw(st.integers(0, (1 << 63) - 1)),
        links_count=draw(st.integers(0, 0xFFFF)),
        atime_ns=draw(_TIMES),
        mtime_ns=draw(_TIMES),
        ctime_ns=draw(_TIMES),
        crtime_ns=draw(_TIMES),
        dtime=draw(st.integers(0, 0xFFFFFFFF)),
        blocks_512=blocks,
        flags=flags,
        file_acl=draw(st.integers(0, (1 << 48) - 1)),
        i_block=draw(st.binary(min_size=60, max_size=60)),
        projid=draw(st.integers(0, 0xFFFFFFFF)),
        # A different generation than the blank's: the stored seed must follow it.
        generation=draw(st.integers(0, 0xFFFFFFFF)),
    )
    return inode, huge_file, seed


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inodes())
def test_inode_as_stored_is_what_parse_returns(case: tuple[Inode, bool, int | None]) -> None:
    inode, huge_file, seed = case
    try:
        raw = encode_inode(inode, fs_csum_seed=seed, huge_file=huge_file, block_size=4096)
    except ValueError:
        return  # e.g. sectors that need huge_file: nothing is stored
    parsed = Inode.parse(raw, inode.ino, fs_csum_seed=seed, huge_file=huge_file,
                         block_size=4096)
    shortcut = inode_as_stored(inode, raw, fs_csum_seed=seed)
    if shortcut is not None:
        assert shortcut == parsed
        assert type(shortcut.raw) is bytes and type(shortcut.i_block) is bytes


def test_inode_as_stored_declines_where_encoding_changes_values() -> None:
    base = blank_inode(12, 256, fs_csum_seed=7, generation=3, extra_isize=32)
    too_late = ((1 << 31) + (3 << 32) + 1) * NS
    for changed in (
        dataclasses.replace(base, mtime_ns=too_late),
        dataclasses.replace(base, flags=FL_HUGE_FILE),
        dataclasses.replace(base, blocks_512=1 << 33),
        blank_inode(12, 256, fs_csum_seed=7, generation=3, extra_isize=16),
        blank_inode(12, 128, fs_csum_seed=7, generation=3),
    ):
        raw = encode_inode(changed, fs_csum_seed=7, huge_file=True, block_size=4096)
        assert inode_as_stored(changed, raw, fs_csum_seed=7) is None
    # And takes the usual case.
    raw = encode_inode(base, fs_csum_seed=7, huge_file=True, block_size=4096)
    assert inode_as_stored(base, raw, fs_csum_seed=7) is not None


@settings(max_examples=200, deadline=None)
@given(inodes(), st.dictionaries(
    st.sampled_from(["mode", "size", "links_count", "mtime_ns", "ctime_ns", "flags", "raw",
                     "i_block", "file_acl", "csum_seed"]),
    st.integers(0, 1000), max_size=4))
def test_replace_inode_is_dataclasses_replace(
    case: tuple[Inode, bool, int | None], changes: dict[str, int]
) -> None:
    inode = case[0]
    assert replace_inode(inode, **changes) == dataclasses.replace(inode, **changes)


def test_replace_inode_refuses_unknown_fields() -> None:
    inode = blank_inode(12, 256, fs_csum_seed=None, generation=1)
    with pytest.raises(TypeError):
        replace_inode(inode, no_such_field=1)
