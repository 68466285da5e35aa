"""dx_root / dx_node parsing and leaf selection, checked against debugfs htree_dump."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from dirs_support import (
    debugfs,
    extent_map,
    inode_info,
    kernel_dirs_image,
    open_directory,
    super_info,
)

from ext4box.ext4.format import checksum
from ext4box.ext4.format.dir_hash import dx_hash
from ext4box.ext4.format.errors import Corrupt
from ext4box.ext4.format.htree import (
    DX_COUNT_LIMIT,
    DX_ENTRY,
    DX_ENTRY_SIZE,
    DX_ROOT_ENTRIES_OFFSET,
    DX_TAIL,
    HtreeIndex,
    build_dx_node,
    build_dx_root,
    dx_csum,
    parse_dx_node,
    parse_dx_root,
)


@dataclass
class DumpNode:
    block: int
    count: int
    limit: int
    checksum: int | None
    entries: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class HtreeDump:
    hash_version: int
    indirect_levels: int
    nodes: list[DumpNode]  # nodes[0] is the root
    leaves: dict[int, list[tuple[int, int, int, bytes]]]  # block -> (ino, major, minor, name)


def parse_htree_dump(text: bytes) -> HtreeDump:
    lines = text.split(b"\n")
    hash_version = int(re.search(rb"Hash Version: (\d+)", text)[1])  # type: ignore[index]
    levels = int(re.search(rb"Indirect levels: (\d+)", text)[1])  # type: ignore[index]
    nodes: list[DumpNode] = []
    leaves: dict[int, list[tuple[int, int, int, bytes]]] = {}
    current_leaf: list[tuple[int, int, int, bytes]] | None = None
    pending_block = 0
    entry_re = re.compile(rb"^Entry #(\d+): Hash (0x[0-9a-f]+), block (\d+)")
    # Leaf entries are printed several to a line, separated by blanks (names have none here).
    leaf_re = re.compile(rb"(\d+) 0x([0-9a-f]+)-([0-9a-f]+) \((\d+)\) (\S*)")
    for line in lines:
        if line.startswith(b"Number of entries (count):"):
            nodes.append(DumpNode(pending_block, int(line.split(b":")[1]), 0, None))
            current_leaf = None
        elif line.startswith(b"Number of entries (limit):"):
            nodes[-1].limit = int(line.split(b":")[1])
        elif line.startswith(b"Checksum:") and current_leaf is None:
            nodes[-1].checksum = int(line.split(b":")[1], 16)
        elif m := entry_re.match(line):
            if nodes and len(nodes[-1].entries) < nodes[-1].count and current_leaf is None:
                nodes[-1].entries.append((int(m[2], 16), int(m[3])))
            else:
                pending_block = int(m[3])  # the parent entry printed before a node dump
        elif line.startswith(b"Reading directory block"):
            block = int(re.search(rb"block (\d+),", line)[1])  # type: ignore[index]
            current_leaf = leaves.setdefault(block, [])
        elif current_leaf is not None:
            for m in leaf_re.finditer(line):
                current_leaf.append((int(m[1]), int(m[2], 16), int(m[3], 16), m[5]))
    return HtreeDump(hash_version, levels, nodes, leaves)


@pytest.fixture(scope="module", params=["csum", "nocsum"])
def big_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    csum = request.param == "csum"
    base = tmp_path_factory.mktemp("htree")
    image = kernel_dirs_image(base, csum=csum, big=20000 if csum else 6000)
    reader = open_directory(image, "big", base)
    dump = parse_htree_dump(debugfs(image, "htree_dump big"))
    return image, reader, dump


def _index(reader) -> HtreeIndex:  # type: ignore[no-untyped-def]
    return HtreeIndex(
        ino=reader.ino,
        block_size=reader.block_size,
        nblocks=reader.nblocks,
        read_lblk=reader._read_lblk,
        csum_seed=reader.csum_seed,
        hash_seed=reader.hash_seed,
        unsigned_hash=reader.unsigned_hash,
        large_dir=reader.large_dir,
    )


def test_dx_root_and_nodes_match_htree_dump(big_dir) -> None:  # type: ignore[no-untyped-def]
    _, reader, dump = big_dir
    index = _index(reader)
    root = index.root
    assert dump.indirect_levels == root.indirect_levels == 1  # a two-level tree
    assert root.hash_version == dump.hash_version
    want_root = dump.nodes[0]
    assert (len(root.entries), root.limit) == (want_root.count, want_root.limit)
    assert [(e.hash, e.block) for e in root.entries] == want_root.entries
    assert len(dump.nodes) == 1 + len(root.entries)
    for want in dump.nodes[1:]:
        node = index.read_node(want.block, [0])
        assert (len(node.entries), node.limit) == (want.count, want.limit)
        assert [(e.hash, e.block) for e in node.entries] == want.entries
        if reader.csum_seed is not None:
            raw = reader._read_lblk(want.block)
            tail_at = 8 + node.limit * DX_ENTRY_SIZE
            assert DX_TAIL.unpack_from(raw, tail_at)[1] == want.checksum
    walked = [(lvl, blk, e) for lvl, blk, e in index.walk()]
    assert len(walked) == sum(n.count for n in dump.nodes)


def test_every_name_hashes_to_its_leaf(big_dir) -> None:  # type: ignore[no-untyped-def]
    _, reader, dump = big_dir
    index = _index(reader)
    seen = 0
    for block, entries in dump.leaves.items():
        for ino, major, minor, name in entries:
            if ino == 0:
                continue
            assert index.hash_name(name) == (major, minor)
            assert block in list(index.leaf_blocks(name))
            seen += 1
    live = sum(1 for e, _ in reader.iterate() if e.name not in (b".", b".."))
    assert seen == live


def test_dx_blocks_round_trip(big_dir) -> None:  # type: ignore[no-untyped-def]
    _, reader, dump = big_dir
    bs, seed = reader.block_size, reader.csum_seed
    raw_root = reader._read_lblk(0)
    root = parse_dx_root(raw_root, ino=reader.ino, block_size=bs, csum_seed=seed)
    parent = int.from_bytes(raw_root[12:16], "little")
    built = build_dx_root(root, ino=reader.ino, parent_ino=parent, block_size=bs, csum_seed=seed)
    used = DX_ROOT_ENTRIES_OFFSET + len(root.entries) * DX_ENTRY_SIZE
    # Slots past `count` may hold stale entries the kernel never clears.
    assert built[:used] == raw_root[:used]
    assert built[-8:] == raw_root[-8:] or seed is None
    for want in dump.nodes[1:4]:
        raw = reader._read_lblk(want.block)
        node = parse_dx_node(raw, ino=reader.ino, lblk=want.block, block_size=bs, csum_seed=seed)
        built = build_dx_node(node, block_size=bs, csum_seed=seed)
        used = 8 + len(node.entries) * DX_ENTRY_SIZE
        assert built[:used] == raw[:used]
        if seed is not None:
            tail_at = 8 + node.limit * DX_ENTRY_SIZE
            assert built[tail_at : tail_at + 8] == raw[tail_at : tail_at + 8]


# ---- corruption -----------------------------------------------------------------


def _reseal(block: bytearray, entries_offset: int, seed: int | None) -> bytes:
    """Recompute the dx_tail so only the structural damage under test remains."""
    if seed is not None:
        limit, count = DX_COUNT_LIMIT.unpack_from(block, entries_offset)
        tail_at = entries_offset + limit * DX_ENTRY_SIZE
        if tail_at + 8 <= len(block):
            reserved = DX_TAIL.unpack_from(block, tail_at)[0]
            csum = dx_csum(seed, bytes(block), entries_offset, count, limit)
            DX_TAIL.pack_into(block, tail_at, reserved, csum)
    return bytes(block)


def _damaged_reader(reader, damage: dict[int, bytes]):  # type: ignore[no-untyped-def]
    original = reader._read_lblk

    def read(lblk: int) -> bytes | None:
        return damage.get(lblk, original(lblk))

    reader_copy = object.__new__(type(reader))
    reader_copy.__dict__.update(reader.__dict__)
    reader_copy._read_lblk = read
    return reader_copy


def _root_damage(reader, mutate) -> bytes:  # type: ignore[no-untyped-def]
    block = bytearray(reader._read_lblk(0))
    mutate(block)
    return _reseal(block, DX_ROOT_ENTRIES_OFFSET, reader.csum_seed)


@pytest.mark.parametrize(
    ("case", "mutate"),
    [
        ("indirect_levels", lambda b: b.__setitem__(30, 2)),
        ("info_length", lambda b: b.__setitem__(29, 12)),
        ("hash_version", lambda b: b.__setitem__(28, 9)),
        ("unused_flags", lambda b: b.__setitem__(31, 1)),
        ("count_over_limit", lambda b: DX_COUNT_LIMIT.pack_into(b, 32, 123, 124)),
        ("count_zero", lambda b: DX_COUNT_LIMIT.pack_into(b, 32, 123, 0)),
        ("limit", lambda b: DX_COUNT_LIMIT.pack_into(b, 32, 100, 5)),
        ("unsorted", lambda b: DX_ENTRY.pack_into(b, 40, 0xFFFFFFF0, 1)),
        ("dotdot_rec_len", lambda b: b.__setitem__(slice(16, 18), (12).to_bytes(2, "little"))),
    ],
)
def test_broken_root_is_corrupt_and_lookup_falls_back(big_dir, case, mutate) -> None:  # type: ignore[no-untyped-def]
    _, reader, dump = big_dir
    damaged = _damaged_reader(reader, {0: _root_damage(reader, mutate)})
    names = [e[3] for entries in list(dump.leaves.values())[:40] for e in entries if e[0]]
    with pytest.raises(Corrupt):
        _index(damaged)
    if case == "dotdot_rec_len":
        # Block 0 is then no sane linear block either: nothing to fall back on.
        with pytest.raises(Corrupt):
            damaged.lookup(names[0])
        return
    # The leaves are intact, so a lookup still answers, via the linear scan.
    wanted = {e[3]: e[0] for entries in dump.leaves.values() for e in entries if e[0]}
    for name in names[:25]:
        entry = damaged.lookup(name)
        assert entry is not None and entry.inode == wanted[name]
    assert damaged.lookup(b"no-such-name") is None


def _route(index: HtreeIndex, name: bytes) -> int:
    major, _ = index.hash_name(name)
    at = 0
    for i, e in enumerate(index.root.entries):
        if e.hash <= major:
            at = i
    return at


def test_root_entry_pointing_at_root_is_a_cycle(big_dir) -> None:  # type: ignore[no-untyped-def]
    _, reader, dump = big_dir
    block = bytearray(reader._read_lblk(0))
    hash_, _ = DX_ENTRY.unpack_from(block, 32 + 8 * 2)
    DX_ENTRY.pack_into(block, 32 + 8 * 2, hash_, 0)
    damaged = _damaged_reader(reader, {0: _reseal(block, 32, reader.csum_seed)})
    index = _index(damaged)
    name = next(
        e[3]
        for entries in dump.leaves.values()
        for e in entries
        if e[0] and _route(index, e[3]) == 2
    )
    with pytest.raises(Corrupt, match="back into its own path"):
        list(index.leaf_blocks(name))
    assert damaged.lookup(name) is not None


def test_node_pointing_to_itself_is_corrupt(big_dir) -> None:  # type: ignore[no-untyped-def]
    _, reader, dump = big_dir
    node = dump.nodes[1]
    block = bytearray(reader._read_lblk(node.block))
    for i in range(node.count):  # every leaf pointer of this node now names the node
        struct_hash = DX_ENTRY.unpack_from(block, 8 + i * 8)[0]
        DX_ENTRY.pack_into(block, 8 + i * 8, struct_hash, node.block)
    DX_COUNT_LIMIT.pack_into(block, 8, node.limit, node.count)
    damaged = _damaged_reader(reader, {node.block: _reseal(block, 8, reader.csum_seed)})
    index = _index(damaged)
    name = next(e[3] for e in dump.leaves[node.entries[0][1]] if e[0])
    with pytest.raises(Corrupt):
        list(index.leaf_blocks(name))
    entry = damaged.lookup(name)
    assert entry is not None


def test_bad_dx_checksum_is_corrupt(big_dir) -> None:  # type: ignore[no-untyped-def]
    _, reader, _ = big_dir
    if reader.csum_seed is None:
        pytest.skip("no metadata_csum on this image")
    block = bytearray(reader._read_lblk(0))
    block[DX_ROOT_ENTRIES_OFFSET + 12] ^= 0x40  # a hash byte of entry 1; tail left alone
    with pytest.raises(Corrupt, match="checksum"):
        parse_dx_root(bytes(block), ino=reader.ino, block_size=1024, csum_seed=reader.csum_seed)


def test_depth_three_needs_large_dir(big_dir) -> None:  # type: ignore[no-untyped-def]
    _, reader, _ = big_dir
    block = bytearray(reader._read_lblk(0))
    block[30] = 2
    raw = _reseal(block, 32, reader.csum_seed)
    with pytest.raises(Corrupt, match="indirect_levels"):
        parse_dx_root(raw, ino=reader.ino, block_size=1024, csum_seed=reader.csum_seed)
    root = parse_dx_root(
        raw, ino=reader.ino, block_size=1024, csum_seed=reader.csum_seed, large_dir=True
    )
    assert root.indirect_levels == 2
    block[30] = 3
    raw = _reseal(block, 32, reader.csum_seed)
    with pytest.raises(Corrupt, match="indirect_levels"):
        parse_dx_root(
            raw, ino=reader.ino, block_size=1024, csum_seed=reader.csum_seed, large_dir=True
        )


# ---- other hash setups ---------------------------------------------------------


@pytest.mark.parametrize("setup", ["tea", "unsigned"])
def test_lookup_through_index_with_other_hashes(
    tmp_path_factory: pytest.TempPathFactory, setup: str
) -> None:
    base = tmp_path_factory.mktemp(setup)
    if setup == "tea":
        image = kernel_dirs_image(base, big=3000, hash_alg="tea")
    else:
        image = kernel_dirs_image(base, big=3000, unsigned=True)
    sb = super_info(image)
    assert sb.unsigned_hash == (setup == "unsigned")
    for spec in ("big", "high"):
        reader = open_directory(image, spec, base)
        index = _index(reader)
        assert index.root.hash_version == (2 if setup == "tea" else 1)
        dump = parse_htree_dump(debugfs(image, f"htree_dump {spec}"))
        for block, entries in dump.leaves.items():
            for ino, major, minor, name in entries:
                if ino == 0:
                    continue
                assert dx_hash(name, index.root.hash_version, sb.hash_seed, sb.unsigned_hash) == (
                    major,
                    minor,
                )
                assert block in list(index.leaf_blocks(name))
                entry = reader.lookup(name)
                assert entry is not None and entry.inode == ino


def test_reader_inputs_come_from_debugfs(big_dir) -> None:  # type: ignore[no-untyped-def]
    image, reader, _ = big_dir
    info = inode_info(image, "big")
    sb = super_info(image)
    assert len(extent_map(image, info.ino)) == reader.nblocks
    if sb.metadata_csum:
        assert reader.csum_seed == checksum.inode_csum_seed(
            sb.fs_csum_seed, info.ino, info.generation
        )


def test_memoized_root_is_never_answered_for_other_bytes(big_dir) -> None:  # type: ignore[no-untyped-def]
    """A root parsed once (and memoized) does not answer for a damaged copy of its
    block: the copy is checked afresh and raises Corrupt, every time."""
    _, reader, _ = big_dir
    good = bytes(reader._read_lblk(0))
    args = {"ino": reader.ino, "block_size": 1024, "csum_seed": reader.csum_seed}
    first = parse_dx_root(good, **args)
    assert parse_dx_root(bytes(bytearray(good)), **args) == first
    block = bytearray(good)
    block[DX_ROOT_ENTRIES_OFFSET + 2] = 0  # count 0
    for _ in range(2):
        with pytest.raises(Corrupt, match="count 0"):
            parse_dx_root(bytes(block), **args)
    assert parse_dx_root(good, **args) == first
