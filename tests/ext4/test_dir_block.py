"""Linear directory blocks against debugfs `ls -p`, with and without checksum tails."""

from __future__ import annotations

import random
import stat
import struct
from pathlib import Path

import pytest
from dirs_support import debugfs_ls_modes, kernel_dirs_image, mkfs, need_tools, open_directory

from ext4box.ext4.format.dir_block import (
    DIR_TAIL_SIZE,
    DirRecord,
    ParsedBlockCache,
    build_dir_block,
    dir_block_csum,
    dir_rec_len,
    parse_dir_block,
    parse_dir_records,
    splice_dir_block,
)
from ext4box.ext4.format.errors import Corrupt
from ext4box.ext4.write.dir_htree_writer import find_slot, insert_record
from ext4box.ext4.write.dir_writer import _delete

_MODE_TO_FT = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}


@pytest.fixture(scope="module", params=["csum", "nocsum"])
def small_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("dirblock")
    image = kernel_dirs_image(base, csum=request.param == "csum", big=200)
    reader = open_directory(image, "small", base)
    return image, reader


def _parse(reader, block: bytes, **kw):  # type: ignore[no-untyped-def]
    args = dict(ino=reader.ino, lblk=0, has_filetype=True, csum_seed=reader.csum_seed)
    args.update(kw)
    return parse_dir_block(block, **args)


def test_entries_and_types_match_debugfs(small_dir) -> None:  # type: ignore[no-untyped-def]
    image, reader = small_dir
    assert not reader.indexed and reader.nblocks == 1
    block = reader._read_lblk(0)
    got = _parse(reader, block, max_ino=reader.max_ino)
    want = debugfs_ls_modes(image, "small")
    assert [(e.inode, e.name) for _, e in got] == [(ino, name) for ino, _, name in want]
    assert [e.file_type for _, e in got] == [_MODE_TO_FT[stat.S_IFMT(m)] for _, m, _ in want]
    assert {e.file_type for _, e in got} == set(range(1, 8))
    offsets = [off for off, _ in got]
    assert offsets[:2] == [0, 12] and offsets == sorted(offsets)


def test_checksum_tail(small_dir) -> None:  # type: ignore[no-untyped-def]
    _, reader = small_dir
    block = reader._read_lblk(0)
    if reader.csum_seed is None:
        # No tail: the last record runs to the end of the block.
        records = parse_dir_records(
            block, ino=reader.ino, lblk=0, has_filetype=True, csum_seed=None
        )
        assert records[-1].offset + records[-1].rec_len == len(block)
        assert block[-DIR_TAIL_SIZE:][7] != 0xDE or records[-1].inode == 0
        return
    stored = struct.unpack_from("<I", block, len(block) - 4)[0]
    assert stored == dir_block_csum(reader.csum_seed, block)
    assert block[-12:-4] == b"\0\0\0\0\x0c\x00\x00\xde"
    bad = bytearray(block)
    bad[-1] ^= 1
    with pytest.raises(Corrupt, match="checksum"):
        _parse(reader, bytes(bad))
    wrong_seed = reader.csum_seed ^ 1
    with pytest.raises(Corrupt, match="checksum"):
        _parse(reader, block, csum_seed=wrong_seed)


def test_round_trip_mkfs_made_blocks(tmp_path: Path) -> None:
    need_tools()
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(30):
        (src / "d" / f"name-{i}-{'y' * (i % 9)}").write_bytes(b"")
    for csum in (True, False):
        image = mkfs(
            tmp_path / f"rt-{csum}.img",
            8,
            source=src,
            features="metadata_csum" if csum else "^metadata_csum",
        )
        reader = open_directory(image, "d", tmp_path)
        for lblk in range(reader.nblocks):
            block = reader._read_lblk(lblk)
            records = parse_dir_records(
                block, ino=reader.ino, lblk=lblk, has_filetype=True, csum_seed=reader.csum_seed
            )
            rebuilt = build_dir_block(records, block_size=len(block), csum_seed=reader.csum_seed)
            assert rebuilt == block


# ---- corruption: each damage applied to a real block, the tail re-sealed -------


def _reseal(reader, block: bytearray) -> bytes:  # type: ignore[no-untyped-def]
    if reader.csum_seed is not None:
        struct.pack_into("<I", block, len(block) - 4, dir_block_csum(reader.csum_seed, block))
    return bytes(block)


def _damage(reader, offset_of_record: int, field: str, value: int) -> bytes:  # type: ignore[no-untyped-def]
    block = bytearray(reader._read_lblk(0))
    if field == "rec_len":
        struct.pack_into("<H", block, offset_of_record + 4, value)
    elif field == "name_len":
        block[offset_of_record + 6] = value
    elif field == "inode":
        struct.pack_into("<I", block, offset_of_record, value)
    return _reseal(reader, block)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("rec_len", 0, "below minimum"),
        ("rec_len", 8, "below minimum"),
        ("rec_len", 26, "multiple of 4"),
        ("rec_len", 4000, "overruns"),
        ("name_len", 200, "too small for name_len"),
        ("inode", 0x7FFFFFFF, "beyond inode count"),
    ],
)
def test_damaged_records_are_corrupt(small_dir, field: str, value: int, why: str) -> None:  # type: ignore[no-untyped-def]
    _, reader = small_dir
    records = parse_dir_records(
        reader._read_lblk(0), ino=reader.ino, lblk=0, has_filetype=True, csum_seed=reader.csum_seed
    )
    target = records[2]  # the first entry after "." and ".."
    damaged = _damage(reader, target.offset, field, value)
    with pytest.raises(Corrupt, match=why) as err:
        _parse(reader, damaged, max_ino=reader.max_ino)
    assert f"inode {reader.ino}" in err.value.where and "block 0" in err.value.where


def test_live_entry_with_empty_name_is_corrupt(small_dir) -> None:  # type: ignore[no-untyped-def]
    _, reader = small_dir
    damaged = _damage(reader, 12, "name_len", 0)  # ".." loses its name
    with pytest.raises(Corrupt, match="empty name"):
        _parse(reader, damaged)


def test_missing_tail_is_corrupt(small_dir) -> None:  # type: ignore[no-untyped-def]
    _, reader = small_dir
    if reader.csum_seed is None:
        pytest.skip("tails exist only with metadata_csum")
    block = bytearray(reader._read_lblk(0))
    block[-5] = 0  # the tail's 0xDE marker
    with pytest.raises(Corrupt, match="no checksum tail"):
        _parse(reader, bytes(block))


@pytest.mark.parametrize(("block_size", "csum_seed"), [(4096, 77), (1024, None), (65536, 5)])
def test_cache_and_splice_agree_with_a_full_parse_and_build(block_size: int,
                                                            csum_seed: int | None) -> None:
    """After every first-fit insert and merge-delete (the writer's edits): the splice
    of the changed records gives the bytes of a full build, the records a writer
    remembers are exactly what parsing those bytes gives, and a parse through the
    cache answers the same as parse_dir_records."""
    rng = random.Random(block_size)
    area = block_size - (DIR_TAIL_SIZE if csum_seed is not None else 0)
    records = [DirRecord(0, 2, 12, b".", 2), DirRecord(12, 2, area - 12, b"..", 2)]
    cache = ParsedBlockCache(4, has_filetype=True, max_ino=1 << 20, block_size=block_size)
    cache.remember(build_dir_block(records, block_size=block_size, csum_seed=csum_seed),
                   records, ino=9, lblk=0, csum_seed=csum_seed)
    names: list[bytes] = []
    spliced = 0
    for _ in range(1500):
        if names and (rng.random() < 0.4 or len(names) > 120):
            name = names.pop(rng.randrange(len(names)))
            at = next(i for i, r in enumerate(records) if r.inode and r.name == name)
            changed = _delete(records, at)
        else:
            name = bytes(rng.choice(b"abcdefgh") for _ in range(rng.randint(1, 40)))
            new = DirRecord(0, rng.randrange(11, 1 << 20), dir_rec_len(len(name)), name, 1)
            at = find_slot(records, new.rec_len)
            if name in names or at is None:
                continue
            changed = insert_record(records, at, new)
            names.append(name)
        old = cache.peek(9, 0, csum_seed)
        assert old is not None and old.canonical
        full = build_dir_block(changed, block_size=block_size, csum_seed=csum_seed)
        fast = splice_dir_block(old, changed, block_size=block_size, csum_seed=csum_seed)
        spliced += fast is not None
        assert fast in (None, full)
        parsed = parse_dir_records(full, ino=9, lblk=0, has_filetype=True, csum_seed=csum_seed,
                                   max_ino=1 << 20, block_size=block_size)
        assert parsed == changed
        cache.remember(full, changed, ino=9, lblk=0, csum_seed=csum_seed)
        copy = bytes(bytearray(full))  # equal bytes, another object: a hit all the same
        assert list(cache.parse(copy, ino=9, lblk=0, csum_seed=csum_seed).records) == parsed
        records = changed
    assert spliced > 1000
    # Other bytes under the same key are parsed afresh, never answered from the entry.
    other = build_dir_block([*records[:1], records[1]._replace(rec_len=area - 12, inode=3)],
                            block_size=block_size, csum_seed=csum_seed)
    assert cache.parse(other, ino=9, lblk=0, csum_seed=csum_seed).records[1].inode == 3


def test_parsed_block_find_answers_the_first_live_record_of_a_name() -> None:
    """find() is what a front-to-back scan answers, also in a (corrupt) block naming
    one entry twice: deleted records are skipped, the first live one wins."""
    from ext4box.ext4.format.dir_block import ParsedBlock

    records = (DirRecord(0, 2, 12, b".", 2), DirRecord(12, 0, 16, b"twin", 1),
               DirRecord(28, 30, 16, b"twin", 1), DirRecord(44, 31, 16, b"other", 1),
               DirRecord(60, 32, 16, b"twin", 1))  # fmt: skip
    parsed = ParsedBlock(b"", records)
    scan = {name: next(i for i, r in enumerate(records) if r.inode and r.name == name)
            for name in (b".", b"twin", b"other")}  # fmt: skip
    assert {name: parsed.find(name) for name in scan} == scan
    assert parsed.find(b"missing") is None


@pytest.mark.parametrize(("block_size", "csum_seed"), [(4096, 77), (1024, None)])
def test_inherited_index_and_rooms_match_a_fresh_scan(block_size: int,
                                                      csum_seed: int | None) -> None:
    """Through the writer's edits (first-fit insert, merge-delete, retarget), the name
    index and room summary a remembered block inherits from the one it was spliced
    from answer find() and first_fit() exactly as a scan of its records does."""
    from ext4box.ext4.format.dir_block import splice_dir_block_span

    rng = random.Random(block_size + 1)
    area = block_size - (DIR_TAIL_SIZE if csum_seed is not None else 0)
    records = [DirRecord(0, 2, 12, b".", 2), DirRecord(12, 2, area - 12, b"..", 2)]
    cache = ParsedBlockCache(4, has_filetype=True, max_ino=1 << 20, block_size=block_size)
    cache.remember(build_dir_block(records, block_size=block_size, csum_seed=csum_seed),
                   records, ino=9, lblk=0, csum_seed=csum_seed)
    names: list[bytes] = []
    gone: list[bytes] = []  # removed names: the index must forget them
    inherited = 0
    for step in range(1500):
        old = cache.peek(9, 0, csum_seed)
        assert old is not None
        if step % 3 == 0:  # build the summaries on the entry, so that the next one inherits
            old.find(b"x")
            old.first_fit(12)
        roll = rng.random()
        if names and roll < 0.1:
            name = rng.choice(names)
            at = next(i for i, r in enumerate(records) if r.inode and r.name == name)
            changed = list(records)
            changed[at] = records[at]._replace(inode=rng.randrange(11, 1 << 20))
        elif names and (roll < 0.45 or len(names) > 120):
            name = names.pop(rng.randrange(len(names)))
            changed = _delete(records, old.find(name))
            gone.append(name)
        else:
            name = bytes(rng.choice(b"abcdefgh") for _ in range(rng.randint(1, 40)))
            new = DirRecord(0, rng.randrange(11, 1 << 20), dir_rec_len(len(name)), name, 1)
            at = old.first_fit(new.rec_len)
            assert at == find_slot(records, new.rec_len)
            if name in names or at is None:
                continue
            changed = insert_record(records, at, new)
            names.append(name)
        spliced = splice_dir_block_span(old, changed, block_size=block_size,
                                        csum_seed=csum_seed)  # fmt: skip
        assert spliced is not None
        data, head, tail = spliced
        assert data == build_dir_block(changed, block_size=block_size, csum_seed=csum_seed)
        inherited += old._names is not None
        cache.remember(data, changed, ino=9, lblk=0, csum_seed=csum_seed,
                       spliced_from=(old, head, tail))  # fmt: skip
        records = changed
        entry = cache.peek(9, 0, csum_seed)
        assert entry is not None
        probe = [*names, *gone[-5:], *(rng.choice(names) + b"!" for _ in range(3) if names),
                 b".."]  # fmt: skip
        for name in probe:
            scan = next((i for i, r in enumerate(records) if r.inode and r.name == name), None)
            assert entry.find(name) == scan, name
        for need in (12, 16, 24, 52, 264, area):
            assert entry.first_fit(need) == find_slot(records, need), need
    assert inherited > 300


def test_inheriting_a_duplicate_name_leaves_the_index_to_a_scan() -> None:
    """An edit that makes a live name appear twice (a corrupt block's own duplicate
    kept by a rewrite) must not leave an index answering the second record."""
    from ext4box.ext4.format.dir_block import ParsedBlock

    old = ParsedBlock(b"", (DirRecord(0, 2, 12, b".", 2), DirRecord(12, 30, 16, b"twin", 1),
                            DirRecord(28, 0, 996, b"", 0)), canonical=True)  # fmt: skip
    assert old.find(b"twin") == 1
    new = ParsedBlock(b"", (*old.records[:2], DirRecord(28, 31, 16, b"twin", 1),
                            DirRecord(44, 0, 980, b"", 0)))  # fmt: skip
    new.inherit(old, 2, 0)
    assert new.find(b"twin") == 1
    assert new.first_fit(980) == 3
    assert new.first_fit(981) is None
