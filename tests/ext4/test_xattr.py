"""Extended attributes against the kernel (getfattr on a loop mount) and debugfs.

Images come from mkfs.ext4 -d (attributes copied from a tree made with
setfattr/setfacl) and from the kernel itself (attributes set through a loop
mount: shared blocks, 128-byte inodes, EA inodes). Raw inode bytes come from
debugfs inode_dump, the xattr block number from debugfs stat, the block from
the image file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext4box.ext4.format.acl import acl_disk_to_xattr
from ext4box.ext4.format.checksum import ext4_csum_seed
from ext4box.ext4.format.errors import Corrupt
from ext4box.ext4.format.xattr import (
    XattrBlock,
    XattrEntry,
    XattrNoSpace,
    build_ibody_xattrs,
    build_xattr_block,
    parse_ibody_xattrs,
    parse_xattr_block,
    xattr_block_checksum,
)
from support.kernel import kernel_mount, why_no_kernel_mounts

_missing = [tool for tool in ("mkfs.ext4", "debugfs", "setfattr", "getfattr", "setfacl")
            if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing) or why_no_kernel_mounts() is not None,
    reason=f"missing {_missing}" if _missing else str(why_no_kernel_mounts()),
)

ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
BIG = b"x" * 300  # too big for a 256-byte inode: goes to the block


# ---------------------------------------------------------------- oracles


def run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{argv!r} failed: {result.stderr.strip()}")
    return result.stdout


def debugfs(image: Path, request: str) -> str:
    return run(["debugfs", "-R", request, str(image)])


def make_image(path: Path, *mkfs_args: str, root: Path | None = None, size_mb: int = 8) -> Path:
    with path.open("wb") as image:
        image.truncate(size_mb << 20)
    extra = ["-d", str(root)] if root is not None else []
    run(["mkfs.ext4", "-q", "-F", "-b", "1024", *mkfs_args, *extra, str(path)])
    return path


@dataclass(frozen=True)
class FsFacts:
    inode_size: int
    block_size: int
    seed: int | None  # None without metadata_csum
    ea_seed: int


def fs_facts(image: Path) -> FsFacts:
    fields = {}
    for line in run(["dumpe2fs", "-h", str(image)]).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    if "Checksum seed" in fields:
        seed = int(fields["Checksum seed"], 0)
    else:
        seed = ext4_csum_seed(uuid.UUID(fields["Filesystem UUID"]).bytes)
    csum = "metadata_csum" in fields["Filesystem features"].split()
    return FsFacts(int(fields["Inode size"]), int(fields["Block size"]),
                   seed if csum else None, seed)


def inode_dump(image: Path, path: str, inode_size: int) -> bytes:
    """debugfs inode_dump parsed: octal offsets, 16 bytes a line, "*" for repeats."""
    out = bytearray()
    repeating = False
    last = b""
    for line in debugfs(image, f"inode_dump {path}").splitlines():
        if line.strip() == "*":
            repeating = True
            continue
        match = re.match(r"^([0-7]{4})  ((?:[0-9a-f]{4} ?){1,8})", line)
        if match is None:
            continue
        offset = int(match[1], 8)
        while repeating and len(out) < offset:
            out += last
        repeating = False
        assert len(out) == offset, line
        last = bytes.fromhex(match[2].replace(" ", ""))
        out += last
    while repeating and len(out) < inode_size:
        out += last
    assert len(out) == inode_size
    return bytes(out)


def stat_numbers(image: Path, path: str) -> tuple[int, int]:
    """(inode number, File ACL block) from debugfs stat."""
    text = debugfs(image, f"stat {path}")
    ino = re.search(r"Inode: (\d+)", text)
    file_acl = re.search(r"File ACL: (\d+)", text)
    assert ino and file_acl, text
    return int(ino[1]), int(file_acl[1])


def ea_list(image: Path, path: str) -> dict[bytes, int]:
    """Names and value sizes from debugfs ea_list (ACLs in the disk format)."""
    sizes = {}
    for line in debugfs(image, f"ea_list {path}").splitlines():
        # Names with unprintable bytes come as hex pairs, then two spaces.
        if match := re.match(r"^  ((?:[0-9a-f]{2} )+) \((\d+)\)", line):
            sizes[bytes.fromhex(match[1])] = int(match[2])
        elif match := re.match(r"^  (\S+) \((\d+)\)", line):
            sizes[match[1].encode()] = int(match[2])
    return sizes


def kernel_xattrs(path: Path) -> dict[bytes, bytes]:
    """Every attribute the kernel shows (getfattr -d -m - -e hex)."""
    values = {}
    out = run(["getfattr", "-d", "-m", "-", "-e", "hex", "--absolute-names", str(path)])
    for line in out.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        raw = bytes.fromhex(value[2:]) if value.startswith("0x") else b""
        values[name.encode("utf-8", "surrogateescape")] = raw
    return values


def reader_of(image: Path):  # -> Callable[[int, int], bytes]
    def read(inum: int, size: int) -> bytes:
        result = subprocess.run(["debugfs", "-R", f"cat <{inum}>", str(image)],
                                capture_output=True, check=True)
        return result.stdout[:size] if len(result.stdout) >= size else result.stdout
    return read


# ---------------------------------------------------------------- our view of one file


@dataclass(frozen=True)
class OnDisk:
    ino: int
    ibody: bytes
    ibody_entries: list[XattrEntry]
    blkno: int
    block: bytes | None
    parsed_block: XattrBlock | None

    @property
    def entries(self) -> list[XattrEntry]:
        block_entries = self.parsed_block.entries if self.parsed_block else []
        return self.ibody_entries + block_entries


def on_disk(image: Path, path: str, facts: FsFacts) -> OnDisk:
    ino, blkno = stat_numbers(image, path)
    raw = inode_dump(image, path, facts.inode_size)
    ibody = b""
    if facts.inode_size > 128:
        extra_isize = int.from_bytes(raw[128:130], "little")
        ibody = raw[128 + extra_isize :]
    reader = reader_of(image)
    ibody_entries = parse_ibody_xattrs(ibody, ino=ino, read_ea_inode=reader)
    block = parsed = None
    if blkno:
        with image.open("rb") as f:
            f.seek(blkno * facts.block_size)
            block = f.read(facts.block_size)
        parsed = parse_xattr_block(block, blkno=blkno, ino=ino, csum_seed=facts.seed,
                                   read_ea_inode=reader)
    return OnDisk(ino, ibody, ibody_entries, blkno, block, parsed)


def visible(entries: list[XattrEntry], where: str) -> dict[bytes, bytes]:
    """What the kernel's listxattr/getxattr show: no system.* but the ACLs, ACLs converted."""
    shown = {}
    for entry in entries:
        if entry.name in ACL_NAMES:
            shown[entry.name] = acl_disk_to_xattr(entry.value, where=where)
        elif not entry.name.startswith(b"system."):
            shown[entry.name] = entry.value
    return shown


def rebuild(disk: OnDisk, facts: FsFacts) -> tuple[bytes, bytes | None]:
    ibody = build_ibody_xattrs(disk.ibody_entries, len(disk.ibody), ea_inode_seed=facts.ea_seed)
    block = None
    if disk.parsed_block is not None:
        block = build_xattr_block(disk.parsed_block.entries, blkno=disk.blkno,
                                  block_size=facts.block_size,
                                  refcount=disk.parsed_block.refcount, csum_seed=facts.seed,
                                  ea_inode_seed=facts.ea_seed)
    return ibody, block


def entry_table(area: bytes, table_start: int) -> list[tuple[int, int]]:
    """(offset, e_value_size) of each entry: the test's own walk, to aim corruptions."""
    found = []
    pos = table_start
    while pos + 16 <= len(area) and area[pos : pos + 4] != bytes(4):
        found.append((pos, int.from_bytes(area[pos + 8 : pos + 12], "little")))
        pos += (16 + area[pos] + 3) & ~3
    return found


def without_e2fsprogs_quirks(area: bytes, table_start: int, *, block: bool) -> bytes:
    """What mkfs.ext4 -d (e2fsprogs 1.47.0) writes differently from the kernel, zeroed:
    e_value_offs of empty values (it points them at the value area's current end, the
    kernel writes 0) and, in a block, h_hash (it leaves 0) with h_checksum covering it."""
    out = bytearray(area)
    if block:
        out[12:20] = bytes(8)
    for pos, value_size in entry_table(area, table_start):
        if value_size == 0:
            out[pos + 2 : pos + 4] = bytes(2)
    return bytes(out)


def check_file(
    image: Path, mnt: Path, path: str, facts: FsFacts, *, layout: str = "kernel"
) -> OnDisk:
    """Parse one file and compare with the kernel and debugfs; rebuild and compare bytes.

    layout "kernel": the area must come back byte for byte. "mkfs": the same but
    for e2fsprogs' quirks (without_e2fsprogs_quirks). "any": the kernel stacked
    values in the order they were set, not in entry order (it keeps block entries
    sorted), which no builder can know; the rebuilt area must parse the same.
    """
    disk = on_disk(image, path, facts)
    names = [entry.name for entry in disk.entries]
    assert len(names) == len(set(names)), names
    assert visible(disk.entries, path) == kernel_xattrs(mnt / path.lstrip("/"))
    assert {e.name: len(e.value) for e in disk.entries} == ea_list(image, path)
    ibody, block = rebuild(disk, facts)
    reader = reader_of(image)
    assert parse_ibody_xattrs(ibody, ino=disk.ino, read_ea_inode=reader) == disk.ibody_entries
    if block is not None:  # our block passes our checks, checksum included
        reparsed = parse_xattr_block(block, blkno=disk.blkno, ino=disk.ino,
                                     csum_seed=facts.seed, read_ea_inode=reader)
        assert disk.parsed_block is not None and reparsed.refcount == disk.parsed_block.refcount
        assert sorted(reparsed.entries, key=repr) == sorted(disk.parsed_block.entries, key=repr)
    # An area with the magic but no entries (mkfs writes those) or none at all may
    # hold stale bytes; the builder writes zeros there, as the kernel does.
    compare_ibody = bool(disk.ibody_entries)
    if layout == "kernel":
        if compare_ibody:
            assert ibody == disk.ibody, path
        assert block == disk.block, path
    elif layout == "mkfs":
        if compare_ibody:
            assert without_e2fsprogs_quirks(ibody, 4, block=False) == without_e2fsprogs_quirks(
                disk.ibody, 4, block=False), path
        if block is not None and disk.block is not None:
            assert disk.block[12:16] == bytes(4)  # e2fsprogs leaves h_hash 0
            assert without_e2fsprogs_quirks(block, 32, block=True) == without_e2fsprogs_quirks(
                disk.block, 32, block=True), path
        assert (block is None) == (disk.block is None)
    return disk


# ---------------------------------------------------------------- images


def setfattr(path: Path, name: str, value: bytes) -> None:
    os.setxattr(path, name, value)


def populate_mixed(root: Path) -> list[str]:
    """Files exercising each namespace, in-inode and block, empty and binary values."""
    (root / "mixed").write_text("m")
    for name, value in [("user.zeta", b"hello"), ("user.alpha", b"\x01\x02\x03\x04\x05"),
                        ("trusted.t", b"T"), ("security.selinux", b"system_u:object_r:f_t:s0"),
                        ("user.big", BIG)]:
        setfattr(root / "mixed", name, value)
    (root / "small").write_text("s")
    setfattr(root / "small", "user.one", b"1")
    (root / "empty").write_text("e")
    setfattr(root / "empty", "user.empty", b"")
    (root / "plain").write_text("p")
    (root / "many").write_text("n")
    for i in range(24):
        setfattr(root / "many", f"user.attr{i:02d}", bytes([i]) * (i + 1))
    (root / "highbyte").write_text("h")
    setfattr(root / "highbyte", "user.caf\u00e9", BIG)
    (root / "acl_file").write_text("a")
    run(["setfacl", "-m", "u:1000:rw,u:1001:r,g:100:r,g:101:w", str(root / "acl_file")])
    (root / "acl_dir").mkdir()
    run(["setfacl", "-m", "u:1002:r", str(root / "acl_dir")])
    run(["setfacl", "-d", "-m", "u:1001:rwx,g:102:rx", str(root / "acl_dir")])
    return ["/mixed", "/small", "/empty", "/plain", "/many", "/highbyte", "/acl_file",
            "/acl_dir"]


@dataclass(frozen=True)
class MkfsImages:
    paths: list[str]  # the files populate_mixed made
    images: dict[str, Path]

    def __getitem__(self, variant: str) -> Path:
        return self.images[variant]


@pytest.fixture(scope="module")
def mkfs_images(tmp_path_factory: pytest.TempPathFactory) -> MkfsImages:
    base = tmp_path_factory.mktemp("xattr-mkfs")
    tree = base / "tree"
    tree.mkdir()
    paths = populate_mixed(tree)
    (tree / "tiny").write_text("hi\n")  # inline data: system.data with an empty value
    (tree / "inline100").write_bytes(b"i" * 100)  # 60 bytes in i_block, 40 in system.data
    images = {
        "i256": make_image(base / "i256.img", "-I", "256", "-O", "inline_data", root=tree),
        "i128": make_image(base / "i128.img", "-I", "128", root=tree),
        "nocsum": make_image(base / "nocsum.img", "-O", "^metadata_csum", root=tree),
    }
    return MkfsImages(paths, images)


@pytest.mark.parametrize("variant", ["i256", "i128", "nocsum"])
def test_mkfs_images_match_kernel_and_round_trip(mkfs_images, variant, tmp_path):
    image = mkfs_images[variant]
    facts = fs_facts(image)
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        for path in mkfs_images.paths:
            disk = check_file(image, mnt, path, facts, layout="mkfs")
            if variant == "i128":
                assert disk.ibody_entries == []
    mixed = on_disk(image, "/mixed", facts)
    assert mixed.parsed_block is not None and mixed.parsed_block.refcount == 1
    if variant != "i128":  # both places used: small values in the inode, the rest in the block
        assert mixed.ibody_entries and mixed.parsed_block.entries


def test_inline_data_entry_is_returned(mkfs_images):
    image = mkfs_images["i256"]
    facts = fs_facts(image)
    tiny = on_disk(image, "/tiny", facts)
    assert XattrEntry(b"system.data", b"") in tiny.ibody_entries
    body = on_disk(image, "/inline100", facts)
    data = {e.name: e.value for e in body.ibody_entries}[b"system.data"]
    assert data == b"i" * 40
    for path, disk in (("/tiny", tiny), ("/inline100", body)):
        assert {e.name: len(e.value) for e in disk.entries} == ea_list(image, path)
        built = build_ibody_xattrs(disk.ibody_entries, len(disk.ibody))
        quirkless = without_e2fsprogs_quirks(disk.ibody, 4, block=False)
        assert without_e2fsprogs_quirks(built, 4, block=False) == quirkless


@pytest.fixture(scope="module")
def kernel_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Attributes written by the kernel through a loop mount."""
    base = tmp_path_factory.mktemp("xattr-kernel")
    images = {}
    for variant, args in {"i256": ["-I", "256", "-O", "inline_data"],
                          "i128": ["-I", "128"]}.items():
        image = make_image(base / f"{variant}.img", *args)
        with kernel_mount(image, base / f"mnt-{variant}", readonly=False) as mnt:
            for i in range(3):  # identical block contents: one block, h_refcount 3
                (mnt / f"shared{i}").write_text("s")
                setfattr(mnt / f"shared{i}", "user.shared", b"S" * 400)
            populate_mixed(mnt)
            (mnt / "removed").write_text("r")  # a value removed from the middle
            for name in ("user.a", "user.b", "user.c"):
                setfattr(mnt / "removed", name, name.encode() * 30)
            os.removexattr(mnt / "removed", "user.b")
            (mnt / "tiny").write_text("hi\n")
        images[variant] = image
    yield images


# Attributes set in an order other than the kernel's block order (security.* before
# user.big): the value stack differs from the entry order, see check_file.
UNSORTED_KERNEL_PATHS = {"/mixed"}
KERNEL_PATHS = ["/shared0", "/shared1", "/shared2", "/removed", "/mixed", "/small", "/empty",
                "/plain", "/many", "/highbyte", "/acl_file", "/acl_dir"]


@pytest.mark.parametrize("variant", ["i256", "i128"])
def test_kernel_written_match_kernel_and_round_trip(kernel_images, variant, tmp_path):
    image = kernel_images[variant]
    facts = fs_facts(image)
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        for path in KERNEL_PATHS:
            check_file(image, mnt, path, facts,
                       layout="any" if path in UNSORTED_KERNEL_PATHS else "kernel")
    shared = [on_disk(image, f"/shared{i}", facts) for i in range(3)]
    assert len({disk.blkno for disk in shared}) == 1
    assert shared[0].parsed_block is not None and shared[0].parsed_block.refcount == 3
    assert shared[0].parsed_block.hash != 0


def test_rebuilt_blocks_satisfy_kernel_and_e2fsck(kernel_images, tmp_path):
    """Write our rebuilt xattr blocks (values stacked in entry order, unlike the kernel's
    /mixed) over the kernel's: e2fsck calls the image clean, the kernel sees the same."""
    image = tmp_path / "rebuilt.img"
    shutil.copyfile(kernel_images["i128"], image)
    facts = fs_facts(image)
    before = {path: on_disk(image, path, facts) for path in KERNEL_PATHS}
    with image.open("r+b") as f:
        for disk in before.values():
            _, block = rebuild(disk, facts)
            if block is not None:
                f.seek(disk.blkno * facts.block_size)
                f.write(block)
    assert on_disk(image, "/mixed", facts).block != before["/mixed"].block
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        for path, disk in before.items():
            assert visible(disk.entries, path) == kernel_xattrs(mnt / path.lstrip("/"))


def test_kernel_inline_data_entry(kernel_images):
    image = kernel_images["i256"]
    facts = fs_facts(image)
    tiny = on_disk(image, "/tiny", facts)
    assert any(e.name == b"system.data" for e in tiny.ibody_entries)
    assert build_ibody_xattrs(tiny.ibody_entries, len(tiny.ibody)) == tiny.ibody


def test_ea_inode_values(tmp_path):
    image = make_image(tmp_path / "ea.img", "-I", "256", "-O", "ea_inode")
    huge = bytes(range(256)) * 12  # 3072 bytes: bigger than a 1 KiB block
    with kernel_mount(image, tmp_path / "mnt", readonly=False) as mnt:
        (mnt / "f").write_text("f")
        setfattr(mnt / "f", "user.small", b"s")
        setfattr(mnt / "f", "user.huge", huge)
        setfattr(mnt / "f", "user.medium", BIG)
    facts = fs_facts(image)
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        disk = check_file(image, mnt, "/f", facts)
    by_name = {e.name: e for e in disk.entries}
    assert by_name[b"user.huge"].value == huge and by_name[b"user.huge"].value_inum != 0
    flags = re.search(r"Flags: (0x[0-9a-f]+)",
                      debugfs(image, f"stat <{by_name[b'user.huge'].value_inum}>"))
    assert flags and int(flags[1], 16) & 0x200000  # EXT4_EA_INODE_FL


# ---------------------------------------------------------------- corruption


@pytest.fixture(scope="module")
def real_block(mkfs_images) -> tuple[bytes, int, int, FsFacts]:
    image = mkfs_images["i256"]
    facts = fs_facts(image)
    disk = on_disk(image, "/mixed", facts)
    assert disk.block is not None
    return disk.block, disk.blkno, disk.ino, facts


def reseal(block: bytearray, blkno: int, seed: int) -> bytes:
    """Recompute h_checksum so that a test reaches the check after the checksum."""
    block[16:20] = xattr_block_checksum(bytes(block), blkno, seed).to_bytes(4, "little")
    return bytes(block)


def parse_block(block: bytes, blkno: int, ino: int, facts: FsFacts) -> XattrBlock:
    return parse_xattr_block(block, blkno=blkno, ino=ino, csum_seed=facts.seed)


def test_corrupt_block_magic_blocks_checksum(real_block):
    block, blkno, ino, facts = real_block
    assert facts.seed is not None
    bad = bytearray(block)
    bad[0] ^= 1
    with pytest.raises(Corrupt, match="magic") as info:
        parse_block(bytes(bad), blkno, ino, facts)
    assert f"block {blkno}" in info.value.where and f"inode {ino}" in info.value.where
    bad = bytearray(block)
    bad[8] = 2
    with pytest.raises(Corrupt, match="h_blocks"):
        parse_block(reseal(bad, blkno, facts.seed), blkno, ino, facts)
    bad = bytearray(block)
    bad[-1] ^= 0xFF  # inside the last value
    with pytest.raises(Corrupt, match="checksum"):
        parse_block(bytes(bad), blkno, ino, facts)
    with pytest.raises(Corrupt, match="checksum"):  # the block number is in the checksum
        parse_block(block, blkno + 1, ino, facts)


def test_corrupt_block_value_offsets(real_block):
    block, blkno, ino, facts = real_block
    assert facts.seed is not None
    first = 32  # the first entry; its e_value_offs is at +2
    past = bytearray(block)
    past[first + 2 : first + 4] = (len(block) - 4).to_bytes(2, "little")
    with pytest.raises(Corrupt, match="past the end"):
        parse_block(reseal(past, blkno, facts.seed), blkno, ino, facts)
    overlap = bytearray(block)
    overlap[first + 2 : first + 4] = (first + 8).to_bytes(2, "little")
    with pytest.raises(Corrupt, match="overlaps the entry table"):
        parse_block(reseal(overlap, blkno, facts.seed), blkno, ino, facts)
    huge = bytearray(block)
    huge[first + 8 : first + 12] = (1 << 30).to_bytes(4, "little")
    with pytest.raises(Corrupt, match="too large"):
        parse_block(reseal(huge, blkno, facts.seed), blkno, ino, facts)


def test_corrupt_block_runaway_entries_and_names(real_block):
    block, blkno, ino, facts = real_block
    assert facts.seed is not None
    # Entries that never end: every 20 bytes a plausible entry with a 4-byte name.
    runaway = bytearray(block)
    for pos in range(32, len(block) - 20, 20):
        runaway[pos : pos + 20] = bytes([4, 1]) + bytes(14) + b"abcd"
    runaway[len(block) - 20 :] = b"\xff" * 20
    with pytest.raises(Corrupt, match=r"past the end|crosses the end"):
        parse_block(reseal(runaway, blkno, facts.seed), blkno, ino, facts)
    nul = bytearray(block)
    nul[32 + 16] = 0
    with pytest.raises(Corrupt, match="NUL"):
        parse_block(reseal(nul, blkno, facts.seed), blkno, ino, facts)


def test_unknown_name_index_is_hidden_like_the_kernel(mkfs_images, tmp_path):
    """Change the index of the block's first entry to 9 (no handler): the kernel and we
    both hide it and still show the rest."""
    source = mkfs_images["i256"]
    facts = fs_facts(source)
    assert facts.seed is not None
    image = tmp_path / "unknown.img"
    shutil.copyfile(source, image)
    disk = on_disk(image, "/mixed", facts)
    assert disk.block is not None
    block = bytearray(disk.block)
    last, _ = entry_table(disk.block, 32)[-1]  # index 9 there keeps the table sorted
    hidden_suffix = bytes(block[last + 16 : last + 16 + block[last]])
    block[last + 1] = 9
    sealed = reseal(block, disk.blkno, facts.seed)
    with image.open("r+b") as f:
        f.seek(disk.blkno * facts.block_size)
        f.write(sealed)
    ours = on_disk(image, "/mixed", facts)
    assert all(not e.name.endswith(b"." + hidden_suffix) for e in ours.entries)
    assert len(ours.entries) == len(disk.entries) - 1
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        assert visible(ours.entries, "/mixed") == kernel_xattrs(mnt / "mixed")


def test_corrupt_ibody(mkfs_images):
    image = mkfs_images["i256"]
    facts = fs_facts(image)
    disk = on_disk(image, "/mixed", facts)
    ibody = disk.ibody
    assert parse_ibody_xattrs(b"\0" * len(ibody), ino=disk.ino) == []  # no magic: none
    assert parse_ibody_xattrs(ibody[:2], ino=disk.ino) == []
    first = next(pos for pos, size in entry_table(ibody, 4) if size)  # an entry with a value
    past = bytearray(ibody)
    past[first + 2 : first + 4] = (len(ibody) - 4).to_bytes(2, "little")
    with pytest.raises(Corrupt, match="past the end") as info:
        parse_ibody_xattrs(bytes(past), ino=disk.ino)
    assert info.value.where == f"inode {disk.ino}"
    overlap = bytearray(ibody)
    overlap[first + 2 : first + 4] = (0).to_bytes(2, "little")
    with pytest.raises(Corrupt, match="overlaps the entry table"):
        parse_ibody_xattrs(bytes(overlap), ino=disk.ino)
    runaway = bytearray(ibody[:4]) + b"\x01\x01" + b"\xee" * (len(ibody) - 6)
    with pytest.raises(Corrupt):
        parse_ibody_xattrs(bytes(runaway), ino=disk.ino)
    ea_value = bytearray(ibody)
    ea_value[first + 4 : first + 8] = (12345).to_bytes(4, "little")  # e_value_inum without ea_inode
    with pytest.raises(Corrupt, match="ea_inode"):
        parse_ibody_xattrs(bytes(ea_value), ino=disk.ino)


def test_builders_refuse_what_does_not_fit(mkfs_images):
    image = mkfs_images["i256"]
    facts = fs_facts(image)
    disk = on_disk(image, "/mixed", facts)
    with pytest.raises(XattrNoSpace):
        build_ibody_xattrs([*disk.ibody_entries, XattrEntry(b"user.big", BIG)], len(disk.ibody))
    assert disk.parsed_block is not None
    too_many = [replace(entry, name=entry.name + b"2") for entry in disk.parsed_block.entries]
    with pytest.raises(XattrNoSpace):
        build_xattr_block([*disk.parsed_block.entries, *too_many, XattrEntry(b"user.b3", BIG)],
                          blkno=disk.blkno, block_size=facts.block_size, refcount=1,
                          csum_seed=facts.seed)


# ---------------------------------------------------------------- fuzzing real areas


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 1023), st.integers(1, 255)), max_size=8))
def test_damaged_real_block_fails_only_with_corrupt(real_block, flips):
    block, blkno, ino, _facts = real_block
    damaged = bytearray(block)
    for offset, mask in flips:
        damaged[offset % len(damaged)] ^= mask
    try:  # without the checksum, so that the damage reaches the entry checks
        parsed = parse_xattr_block(bytes(damaged), blkno=blkno, ino=ino, csum_seed=None)
    except Corrupt:
        return
    for entry in parsed.entries:
        assert len(entry.value) <= len(block)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 255)), max_size=8))
def test_damaged_real_ibody_fails_only_with_corrupt(mkfs_images, flips):
    image = mkfs_images["i256"]
    ibody = on_disk(image, "/mixed", fs_facts(image)).ibody
    damaged = bytearray(ibody)
    for offset, mask in flips:
        damaged[offset % len(damaged)] ^= mask
    with contextlib.suppress(Corrupt):
        parse_ibody_xattrs(bytes(damaged), ino=12)
