"""DirectoryWriter against real images: e2fsck -fn must call the result clean, and the
kernel must list exactly the names we expect and look each one up.

Harness: mkfs.ext4 -d builds an image with `pool/` (empty files whose inodes
we link elsewhere), an empty `target/` and a small tree for moves. The writer
reads and writes directory blocks in the image file through debugfs's extent
map; `append_block` is debugfs `expand_dir` (e2fsprogs allocates, maps and
grows i_size), inline directories are stored with debugfs `sif`/`ea_set`.
Link counts are kept right with debugfs `sif links_count`, the INDEX flag
with `sif flags`, so e2fsck's pass 4 checks our bookkeeping too.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dirs_support import (
    EXT4_INDEX_FL,
    EXT4_INLINE_DATA_FL,
    debugfs,
    debugfs_ls,
    extent_map,
    inline_body,
    inode_info,
    need_kernel,
    need_tools,
    run,
    set_unsigned_hash,
    super_info,
)

from ext4box.ext4.format import checksum
from ext4box.ext4.format.dir_block import (
    EXT4_FT_DIR,
    EXT4_FT_REG_FILE,
    ParsedBlockCache,
    parse_dir_records,
)
from ext4box.ext4.format.dir_hash import dx_hash
from ext4box.ext4.format.errors import Corrupt, Exists, NameTooLong, NotFound
from ext4box.ext4.format.htree import parse_dx_root
from ext4box.ext4.write.dir_writer import (
    DirectoryWriter,
    InvalidName,
    new_dir_block,
    new_inline_dir_body,
    validate_name,
)
from support.kernel import kernel_mount

pytestmark = pytest.mark.kernel


@dataclass
class Image:
    path: Path
    tmp: Path
    pool: dict[bytes, int]  # name in pool/ -> inode
    links: dict[int, int] = field(default_factory=dict)  # inode -> links_count we set

    def debugfs_write(self, requests: list[str]) -> None:
        script = self.tmp / "requests.debugfs"
        script.write_text("\n".join(requests) + "\n")
        run(["debugfs", "-w", "-f", script, self.path])

    def fix_links(self) -> None:
        self.debugfs_write([f"sif <{ino}> links_count {n}" for ino, n in self.links.items()])


def build_image(
    tmp: Path,
    *,
    block_size: int,
    features: str = "",
    pool: int = 0,
    hash_alg: str | None = None,
    unsigned: bool = False,
    size_mb: int = 16,
) -> Image:
    need_tools()
    need_kernel()
    src = tmp / "src"
    (src / "pool").mkdir(parents=True)
    for i in range(pool):
        (src / "pool" / f"p{i:05d}").touch()
    (src / "target").mkdir()
    (src / "a" / "sub").mkdir(parents=True)
    (src / "b").mkdir()
    image = tmp / "dirs.img"
    with image.open("wb") as f:
        f.truncate(size_mb << 20)
    argv: list[str | Path] = ["mkfs.ext4", "-q", "-F", "-b", str(block_size), "-I", "256"]
    argv += ["-N", str(pool + 256)]
    if features:
        argv += ["-O", features]
    run([*argv, "-d", src, image])
    if hash_alg is not None:
        run(["tune2fs", "-E", f"hash_alg={hash_alg}", image])
    if unsigned:
        set_unsigned_hash(image)
    names = {name: ino for ino, name in debugfs_ls(image, "/pool") if name not in (b".", b"..")}
    return Image(image, tmp, names)


class DirHandle:
    """A DirectoryWriter wired to an image file through debugfs."""

    def __init__(self, image: Image, path: str, *, inline_max_body: int = 128) -> None:
        self.image = image
        sb = super_info(image.path)
        info = inode_info(image.path, path)
        self.ino = info.ino
        self.flags = info.flags
        self.block_size = sb.block_size
        self.inline_max_body = inline_max_body
        self.mapping = {} if info.flags & EXT4_INLINE_DATA_FL else extent_map(image.path, self.ino)
        csum_seed = None
        if sb.metadata_csum:
            csum_seed = checksum.inode_csum_seed(sb.fs_csum_seed, self.ino, info.generation)
        self.writer = DirectoryWriter(
            ino=self.ino,
            size=info.size,
            block_size=sb.block_size,
            read_lblk=self.read_lblk,
            write_lblk=self.write_lblk,
            append_block=self.append_block,
            indexed=bool(info.flags & EXT4_INDEX_FL),
            has_filetype="filetype" in sb.features,
            csum_seed=csum_seed,
            hash_seed=sb.hash_seed,
            default_hash_version=sb.default_hash,
            unsigned_hash=sb.unsigned_hash,
            max_ino=sb.inodes_count,
            large_dir="large_dir" in sb.features,
            dir_index_enabled="dir_index" in sb.features,
            metadata_csum=sb.metadata_csum,
            inline=self if info.flags & EXT4_INLINE_DATA_FL else None,
        )

    # block callbacks
    def read_lblk(self, lblk: int) -> bytes | None:
        pblk = self.mapping.get(lblk)
        if pblk is None:
            return None
        with self.image.path.open("rb") as f:
            return os.pread(f.fileno(), self.block_size, pblk * self.block_size)

    def write_lblk(self, lblk: int, data: bytes) -> None:
        assert len(data) == self.block_size
        with self.image.path.open("r+b") as f:
            os.pwrite(f.fileno(), data, self.mapping[lblk] * self.block_size)

    def append_block(self) -> int:
        lblk = len(self.mapping)
        debugfs(self.image.path, f"expand_dir <{self.ino}>", writable=True)
        self.mapping = extent_map(self.image.path, self.ino)
        assert lblk in self.mapping and len(self.mapping) == lblk + 1
        return lblk

    # InlineDirStore
    def read_body(self) -> bytes:
        return inline_body(self.image.path, self.ino, self.image.tmp)

    def write_body(self, body: bytes) -> None:
        words = [int.from_bytes(body[i : i + 4], "little") for i in range(0, 60, 4)]
        value = self.image.tmp / "system-data.bin"
        value.write_bytes(body[60:])
        # debugfs names i_block's last three words after their indirect-map roles.
        slots = [str(i) for i in range(12)] + ["IND", "DIND", "TIND"]
        requests = [f"sif <{self.ino}> block[{slot}] {word:#x}"
                    for slot, word in zip(slots, words, strict=True)]
        requests += [f"ea_set -f {value} <{self.ino}> system.data",
                     f"sif <{self.ino}> size {len(body)}"]
        self.image.debugfs_write(requests)

    def max_body_size(self) -> int:
        return self.inline_max_body

    def convert_to_blocks(self, first_block: bytes) -> None:
        # e2fsprogs converts the inode to one mapped block; we then lay our block over it.
        debugfs(self.image.path, f"expand_dir <{self.ino}>", writable=True)
        self.mapping = extent_map(self.image.path, self.ino)
        assert list(self.mapping) == [0]
        self.write_lblk(0, first_block)

    def sync_flags(self) -> None:
        """Copy the writer's index flag into the inode, as the facade will."""
        flags = self.flags | EXT4_INDEX_FL if self.writer.indexed else self.flags & ~EXT4_INDEX_FL
        info = inode_info(self.image.path, f"<{self.ino}>")
        assert info.size == self.writer.size
        flags = (info.flags & ~EXT4_INDEX_FL) | (flags & EXT4_INDEX_FL)
        if flags != info.flags:
            debugfs(self.image.path, f"sif <{self.ino}> flags {flags:#x}", writable=True)
        self.flags = flags


def fsck_clean(image: Path) -> None:
    result = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def kernel_check(image: Image, expected: dict[str, dict[bytes, int]]) -> None:
    """The kernel lists exactly these names (with these inodes) in each directory."""
    mnt = image.tmp / "mnt"
    with kernel_mount(image.path, mnt, readonly=True):
        for rel, names in expected.items():
            d = os.fsencode(mnt / rel)
            listed = {e.name: e.inode() for e in os.scandir(d)}
            assert listed == names, f"{rel}: {set(listed) ^ set(names)}"
            for name, ino in list(names.items())[:: max(1, len(names) // 50)]:
                assert os.lstat(os.path.join(d, name)).st_ino == ino


def dx_levels(handle: DirHandle) -> int:
    block0 = handle.read_lblk(0)
    assert block0 is not None
    seed = handle.writer._tail_seed
    root = parse_dx_root(block0, ino=handle.ino, block_size=handle.block_size, csum_seed=seed)
    return root.indirect_levels


def link_into(image: Image, handle: DirHandle, names: list[bytes], pool_names: list[bytes],
              expected: dict[bytes, int]) -> None:
    for name, pool_name in zip(names, pool_names, strict=True):
        ino = image.pool[pool_name]
        handle.writer.add(name, ino, EXT4_FT_REG_FILE)
        image.links[ino] = image.links.get(ino, 1) + 1
        expected[name] = ino


def long_names(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [f"n{i:05d}-".encode() + b"L" * rng.randint(0, 240) for i in range(count)]


VARIANTS = [
    pytest.param(1024, "metadata_csum", None, False, id="1k-csum"),
    pytest.param(4096, "^metadata_csum", None, False, id="4k-nocsum"),
    pytest.param(1024, "^metadata_csum", "tea", False, id="1k-tea"),
    pytest.param(4096, "metadata_csum", None, True, id="4k-csum-unsigned"),
]


@pytest.mark.parametrize(("block_size", "features", "hash_alg", "unsigned"), VARIANTS)
def test_grow_convert_split_remove(tmp_path: Path, block_size: int, features: str,
                                   hash_alg: str | None, unsigned: bool) -> None:
    count = 300 if block_size == 1024 else 500
    image = build_image(tmp_path, block_size=block_size, features=features, pool=count,
                        hash_alg=hash_alg, unsigned=unsigned)
    target = DirHandle(image, "/target")
    assert not target.writer.indexed and target.writer.size == block_size
    pool_names = sorted(image.pool)
    rng = random.Random(block_size)
    # Names with bytes >= 0x80 hash differently signed and unsigned.
    names = [f"f{i:04d}".encode() + bytes([0x80 + rng.randrange(128)]) * rng.randint(0, 30)
             for i in range(count)]
    expected: dict[bytes, int] = {}
    converted_at = None
    for i, (name, pool_name) in enumerate(zip(names, pool_names, strict=True)):
        link_into(image, target, [name], [pool_name], expected)
        if converted_at is None and target.writer.indexed:
            converted_at = i
            # Converted with exactly root + two leaves, as make_indexed_dir does.
            assert target.writer.size == 3 * block_size
    assert converted_at is not None and target.writer.nblocks > 3
    with pytest.raises(Exists):
        target.writer.add(names[0], image.pool[pool_names[0]], EXT4_FT_REG_FILE)
    # Remove a third, scattered; free records merge into their predecessors.
    for name in names[::3]:
        entry = target.writer.remove(name)
        assert entry.inode == expected.pop(name)
        image.links[entry.inode] -= 1
    with pytest.raises(NotFound):
        target.writer.remove(names[0])
    assert target.writer.lookup(names[1]) is not None and target.writer.lookup(names[0]) is None
    target.sync_flags()
    image.fix_links()
    fsck_clean(image.path)
    kernel_check(image, {"target": expected})


def test_second_index_level_1k(tmp_path: Path) -> None:
    """Long names on 1k blocks: >123 leaves, so the root's entries move to a dx_node."""
    image = build_image(tmp_path, block_size=1024, features="metadata_csum", pool=800)
    target = DirHandle(image, "/target")
    names = long_names(800, seed=7)
    expected: dict[bytes, int] = {}
    link_into(image, target, names, sorted(image.pool), expected)
    assert target.writer.indexed and dx_levels(target) == 1
    # Names landing in one leaf's hash range keep splitting that region.
    for name in names[1::2]:
        entry = target.writer.remove(name)
        image.links[entry.inode] -= 1
        del expected[name]
    target.sync_flags()
    image.fix_links()
    fsck_clean(image.path)
    kernel_check(image, {"target": expected})


def test_same_leaf_inserts(tmp_path: Path) -> None:
    """Many names chosen to hash into one narrow range: repeated splits of one leaf."""
    image = build_image(tmp_path, block_size=1024, features="metadata_csum", pool=700)
    target = DirHandle(image, "/target")
    sb = super_info(image.path)
    pool_names = sorted(image.pool)
    expected: dict[bytes, int] = {}
    link_into(image, target, [f"seed{i}".encode() for i in range(100)], pool_names[:100],
              expected)
    assert target.writer.indexed
    narrow = []
    i = 0
    while len(narrow) < 600:
        name = f"x{i}-".encode() + b"y" * 20
        major, _ = dx_hash(name, sb.default_hash, sb.hash_seed, sb.unsigned_hash)
        if major < 0x08000000:  # 1/32 of the hash space
            narrow.append(name)
        i += 1
    link_into(image, target, narrow, pool_names[100:], expected)
    target.sync_flags()
    image.fix_links()
    fsck_clean(image.path)
    kernel_check(image, {"target": expected})


def test_linear_without_dir_index(tmp_path: Path) -> None:
    """Without dir_index a full directory just grows; removes include first records."""
    image = build_image(tmp_path, block_size=1024, features="^dir_index,^metadata_csum",
                        pool=200)
    target = DirHandle(image, "/target")
    expected: dict[bytes, int] = {}
    names = long_names(200, seed=3)
    link_into(image, target, names, sorted(image.pool), expected)
    assert not target.writer.indexed and target.writer.nblocks > 5
    # The first live record of every block after block 0, then some others.
    firsts = []
    for lblk in range(1, target.writer.nblocks):
        block = target.read_lblk(lblk)
        assert block is not None
        recs = parse_dir_records(block, ino=target.ino, lblk=lblk, has_filetype=True,
                                 csum_seed=None)
        firsts.append(recs[0].name)
    for name in firsts + names[5:40]:
        if name in expected:
            entry = target.writer.remove(name)
            image.links[entry.inode] -= 1
            del expected[name]
    # A freed first record is reused first fit.
    link_into(image, target, [b"again"], [sorted(image.pool)[0]], expected)
    image.fix_links()
    fsck_clean(image.path)
    kernel_check(image, {"target": expected})


@pytest.mark.parametrize("indexed", [False, True], ids=["linear", "htree"])
def test_retarget_and_move_directory(tmp_path: Path, indexed: bool) -> None:
    image = build_image(tmp_path, block_size=1024, features="metadata_csum", pool=300)
    pool_names = sorted(image.pool)
    sub = DirHandle(image, "/a/sub")
    expected_sub: dict[bytes, int] = {}
    count = 200 if indexed else 5
    link_into(image, sub, [f"s{i:03d}".encode() + b"z" * 30 for i in range(count)],
              pool_names[:count], expected_sub)
    assert sub.writer.indexed == indexed
    sub.sync_flags()
    # Swap what two names point at (a rename over an existing name, twice).
    first, second = sorted(expected_sub)[:2]
    old = sub.writer.retarget(first, expected_sub[second], EXT4_FT_REG_FILE)
    assert old.inode == expected_sub[first]
    sub.writer.retarget(second, old.inode, EXT4_FT_REG_FILE)
    expected_sub[first], expected_sub[second] = expected_sub[second], expected_sub[first]
    # Move a/sub to b/moved: new name in b, old name out of a, ".." to b.
    a, b = DirHandle(image, "/a"), DirHandle(image, "/b")
    entry = a.writer.remove(b"sub")
    assert entry.inode == sub.ino and entry.file_type == EXT4_FT_DIR
    b.writer.add(b"moved", sub.ino, EXT4_FT_DIR)
    old_parent = sub.writer.retarget(b"..", b.ino, EXT4_FT_DIR)
    assert old_parent.inode == a.ino
    assert sub.writer.lookup(b"..").inode == b.ino  # type: ignore[union-attr]
    assert a.writer.is_empty() and not b.writer.is_empty()
    image.links[a.ino] = 2
    image.links[b.ino] = 3
    image.fix_links()
    fsck_clean(image.path)
    kernel_check(image, {"b": {b"moved": sub.ino}, "a": {}, "b/moved": expected_sub})
    mnt = tmp_path / "mnt2"
    with kernel_mount(image.path, mnt, readonly=True):
        assert os.stat(mnt / "b" / "moved" / "..").st_ino == b.ino


def test_inline_directory_add_remove_convert(tmp_path: Path) -> None:
    image = build_image(tmp_path, block_size=4096, features="inline_data,metadata_csum",
                        pool=120)
    target = DirHandle(image, "/target")
    assert target.writer.is_inline and target.writer.is_empty()
    pool_names = sorted(image.pool)
    expected: dict[bytes, int] = {}
    link_into(image, target, [b"one", b"two"], pool_names[:2], expected)
    assert target.writer.is_inline
    # Fill i_block, then system.data (grown to the most the inode holds).
    link_into(image, target, [b"three-" + b"t" * 20, b"four-" + b"f" * 10], pool_names[2:4],
              expected)
    assert target.writer.is_inline and target.writer.size > 60
    entry = target.writer.remove(b"one")
    image.links[entry.inode] -= 1
    del expected[b"one"]
    image.fix_links()
    fsck_clean(image.path)
    kernel_check(image, {"target": expected})
    # Past the inline capacity: converted to one block, then grown into an htree.
    names = [f"later-{i:03d}".encode() + b"q" * 40 for i in range(116)]
    link_into(image, target, names, pool_names[4:], expected)
    assert not target.writer.is_inline and target.writer.indexed
    target.sync_flags()
    image.fix_links()
    fsck_clean(image.path)
    kernel_check(image, {"target": expected})


def test_new_directory_blocks_match_mkfs(tmp_path: Path) -> None:
    """Our first block / inline body of a new directory equal what mkfs -d wrote."""
    for features, block_size in (("metadata_csum", 1024), ("^metadata_csum", 4096)):
        image = build_image(tmp_path / features, block_size=block_size, features=features)
        handle = DirHandle(image, "/b")
        seed = handle.writer._tail_seed
        root = inode_info(image.path, "/")
        built = new_dir_block(ino=handle.ino, parent_ino=root.ino, block_size=block_size,
                              has_filetype=True, csum_seed=seed)
        assert built == handle.read_lblk(0)
    image = build_image(tmp_path / "inline", block_size=4096, features="inline_data")
    handle = DirHandle(image, "/b")
    assert new_inline_dir_body(2) == handle.read_body()[:60]


def test_name_validation() -> None:
    validate_name(b"x" * 255)
    with pytest.raises(NameTooLong):
        validate_name(b"x" * 256)
    for bad in (b"", b"a/b", b"a\0b"):
        with pytest.raises(InvalidName):
            validate_name(bad)


def _legacy_state(data: bytes, state: tuple[int, int]) -> tuple[int, int]:
    """The legacy dx hash mixer's (prev, cur) after `data` (ASCII only: no sign issues).
    Only a search aid: dx_hash cross-checks the names it finds, e2fsck the result."""
    prev, cur = state
    for c in data:
        mixed = (prev + (cur ^ ((c * 7152373) & 0xFFFFFFFF))) & 0xFFFFFFFF
        if mixed & 0x80000000:
            mixed = (mixed - 0x7FFFFFFF) & 0xFFFFFFFF
        prev, cur = cur, mixed
    return prev, cur


def test_colliding_hashes_continue_across_leaves(tmp_path: Path) -> None:
    """Two long names with one legacy hash, split apart: the index entry gets the
    "continued" bit and both names stay reachable (e2fsck and kernel lookups)."""
    image = build_image(tmp_path, block_size=1024, features="metadata_csum", pool=8,
                        hash_alg="legacy")
    sb = super_info(image.path)
    prefix = b"c" * 240
    start = _legacy_state(prefix, (0x37ABE8F9, 0x12A3FE2D))
    seen: dict[int, bytes] = {}
    pair: tuple[bytes, bytes] | None = None
    for i in range(1 << 22):
        suffix = f"{i:08x}".encode()
        major = (_legacy_state(suffix, start)[1] << 1) & 0xFFFFFFFF
        if major in seen and major > 1 << 30:
            pair = (prefix + seen[major], prefix + suffix)
            break
        seen[major] = suffix
    assert pair is not None
    hashes = {dx_hash(n, 0, sb.hash_seed, sb.unsigned_hash)[0] for n in pair}
    assert len(hashes) == 1
    (shared,) = hashes
    below = next(prefix + s for h, s in seen.items() if h < shared)
    target = DirHandle(image, "/target")
    expected: dict[bytes, int] = {}
    # Block order C, A, B fills the 1k block; the 4th name converts it, and the
    # split lands between A and B.
    pool_names = sorted(image.pool)
    link_into(image, target, [below, *pair, b"d" * 248], pool_names[:4], expected)
    assert target.writer.indexed
    block0 = target.read_lblk(0)
    assert block0 is not None
    root = parse_dx_root(block0, ino=target.ino, block_size=1024,
                         csum_seed=target.writer._tail_seed)
    assert shared | 1 in {e.hash for e in root.entries}
    for name in pair:
        assert target.writer.lookup(name) is not None
    target.sync_flags()
    image.fix_links()
    fsck_clean(image.path)
    kernel_check(image, {"target": expected})


def test_parsed_block_cache_matches_the_blocks(tmp_path: Path) -> None:
    """With a shared ParsedBlockCache the writer gives the same results, and every
    parse it remembered after a write is exactly what parsing the written block gives."""
    count = 500
    image = build_image(tmp_path, block_size=4096, features="metadata_csum", pool=count)
    target = DirHandle(image, "/target")
    sb = super_info(image.path)
    cache = ParsedBlockCache(64, has_filetype="filetype" in sb.features,
                             max_ino=sb.inodes_count, block_size=sb.block_size)
    target.writer = DirectoryWriter(
        ino=target.ino, size=target.writer.size, block_size=sb.block_size,
        read_lblk=target.read_lblk, write_lblk=target.write_lblk,
        append_block=target.append_block, indexed=False, has_filetype="filetype" in sb.features,
        csum_seed=checksum.inode_csum_seed(sb.fs_csum_seed, target.ino,
                                           inode_info(image.path, "/target").generation),
        hash_seed=sb.hash_seed, default_hash_version=sb.default_hash,
        unsigned_hash=sb.unsigned_hash, max_ino=sb.inodes_count,
        large_dir="large_dir" in sb.features, dir_index_enabled=True, metadata_csum=True,
        parsed=cache)
    pool_names = sorted(image.pool)
    names = [f"name-{i:05d}".encode() for i in range(count)]
    expected: dict[bytes, int] = {}
    link_into(image, target, names, pool_names, expected)
    assert target.writer.indexed
    for name in names[::4]:
        entry = target.writer.remove(name)
        assert entry.inode == expected.pop(name)
        image.links[entry.inode] -= 1
    for name in names:
        entry = target.writer.lookup(name)
        assert (entry.inode if entry else None) == expected.get(name)
    seed = checksum.inode_csum_seed(sb.fs_csum_seed, target.ino,
                                    inode_info(image.path, "/target").generation)
    misses = 0
    for lblk in range(target.writer.nblocks):
        block = target.read_lblk(lblk)
        assert block is not None
        try:
            fresh = parse_dir_records(block, ino=target.ino, lblk=lblk, has_filetype=True,
                                      csum_seed=seed, max_ino=sb.inodes_count,
                                      block_size=sb.block_size)
        except Corrupt:
            continue  # the dx_root and dx nodes are not record blocks
        # A miss stores this very bytes object; a hit returns the one parsed or written before.
        misses += cache.parse(block, ino=target.ino, lblk=lblk, csum_seed=seed).block is block
        assert list(cache.parse(block, ino=target.ino, lblk=lblk, csum_seed=seed).records) == fresh
    assert misses == 0
    target.sync_flags()
    image.fix_links()
    fsck_clean(image.path)
    kernel_check(image, {"target": expected})
