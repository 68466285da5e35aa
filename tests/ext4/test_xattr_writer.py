"""The xattr writer against the kernel: same calls, same errors, same attributes.

Images come from mkfs.ext4 -d (attributes and ACLs copied from a source tree)
and from the kernel (three files sharing one xattr block). Our side plans each
call with set_xattr/remove_xattr, carries the block part out with
apply_block_update (blocks written with pwrite, allocated and freed with
debugfs setb/freeb) and writes the inode bytes back with a fresh checksum. The
kernel side makes the same calls through a loop mount. Afterwards e2fsck -fn
must be clean, and a kernel mount of our image must show exactly what the
kernel's own image shows.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers_debugfs import FsInfo, debugfs, fs_info, make_image, superblock_fields

from ext4box.ext4.format.checksum import inode_csum_seed
from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.format.inode import Inode, inode_checksum
from ext4box.ext4.format.xattr import parse_xattr_block
from ext4box.ext4.write.xattr_writer import (
    XATTR_CREATE,
    XATTR_REPLACE,
    BlockAction,
    XattrState,
    XattrUpdate,
    apply_block_update,
    remove_xattr,
    set_xattr,
    xattr_state,
)
from support.kernel import kernel_mount, why_no_kernel_mounts

_missing = [tool for tool in ("mkfs.ext4", "debugfs", "e2fsck") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing) or why_no_kernel_mounts() is not None,
    reason=f"missing {_missing}" if _missing else str(why_no_kernel_mounts()),
)

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
_ACL_ENTRY = struct.Struct("<HHI")
_NO_ID = 0xFFFFFFFF

# Inode field offsets written back by the harness.
_MODE = 0
_BLOCKS_LO = 28
_FILE_ACL_LO = 104
_BLOCKS_HI = 116
_FILE_ACL_HI = 118
_CSUM_LO = 0x7C
_CSUM_HI = 0x82


def acl(*entries: tuple[int, int, int]) -> bytes:
    """An ACL in the Linux xattr format (version 2, 8-byte entries)."""
    return struct.pack("<I", 2) + b"".join(_ACL_ENTRY.pack(*e) for e in entries)


ACL_NAMED = acl((1, 7, _NO_ID), (2, 5, 1000), (4, 5, _NO_ID), (0x10, 5, _NO_ID), (0x20, 4, _NO_ID))
ACL_PLAIN = acl((1, 6, _NO_ID), (4, 4, _NO_ID), (0x20, 0, _NO_ID))  # the mode says it all
ACL_GROUPS = acl(
    (1, 7, _NO_ID), (4, 0, _NO_ID), (8, 7, 2000), (8, 1, 2001), (0x10, 7, _NO_ID), (0x20, 5, _NO_ID)
)
ACL_BAD_ORDER = acl((4, 5, _NO_ID), (1, 7, _NO_ID), (0x20, 4, _NO_ID))


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def assert_fsck_clean(image: Path) -> None:
    result = run(["e2fsck", "-fn", str(image)])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- offline image editing


_IMAP = re.compile(r"Inode (\d+) is part of block group \d+\s+located at block (\d+), "
                   r"offset (0x[0-9a-f]+)")


@dataclass
class OfflineImage:
    """Reads and writes one unmounted image the way the facade will: raw inodes with
    checksums, metadata blocks, and bitmap changes (through debugfs setb/freeb)."""

    image: Path
    info: FsInfo
    blocks_per_group: int
    inodes_per_group: int
    first_data_block: int
    _where: dict[str, tuple[int, int]] = field(default_factory=dict)
    actions: set[BlockAction] = field(default_factory=set)  # what apply() was asked to do

    @classmethod
    def open(cls, image: Path) -> OfflineImage:
        fields = superblock_fields(image)
        return cls(image, fs_info(image), int(fields["Blocks per group"]),
                   int(fields["Inodes per group"]), int(fields["First block"]))

    @property
    def seed(self) -> int | None:
        return self.info.csum_seed if self.info.metadata_csum else None

    def locate(self, path: str) -> tuple[int, int]:
        """(inode number, byte offset of the inode in the image)."""
        if path not in self._where:
            match = _IMAP.search(debugfs(self.image, f"imap {path}"))
            assert match is not None, path
            offset = int(match[2]) * self.info.block_size + int(match[3], 16)
            self._where[path] = (int(match[1]), offset)
        return self._where[path]

    def inode(self, path: str) -> Inode:
        ino, offset = self.locate(path)
        with self.image.open("rb") as f:
            f.seek(offset)
            raw = f.read(self.info.inode_size)
        return Inode.parse(raw, ino, fs_csum_seed=self.seed,
                           huge_file="huge_file" in self.info.features,
                           block_size=self.info.block_size)

    def write_inode(self, path: str, raw: bytearray) -> None:
        ino, offset = self.locate(path)
        if self.seed is not None:
            generation = int.from_bytes(raw[100:104], "little")
            has_hi = len(raw) > 128 and int.from_bytes(raw[128:130], "little") >= 4
            csum = inode_checksum(bytes(raw), inode_csum_seed(self.seed, ino, generation), has_hi)
            struct.pack_into("<H", raw, _CSUM_LO, csum & 0xFFFF)
            if has_hi:
                struct.pack_into("<H", raw, _CSUM_HI, csum >> 16)
        self.pwrite(offset, bytes(raw))

    def pwrite(self, offset: int, data: bytes) -> None:
        fd = os.open(self.image, os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)

    def read_block(self, block: int) -> bytes:
        with self.image.open("rb") as f:
            f.seek(block * self.info.block_size)
            return f.read(self.info.block_size)

    def write_block(self, block: int, data: bytes) -> None:
        assert len(data) == self.info.block_size
        self.pwrite(block * self.info.block_size, data)

    def alloc_block(self, goal: int) -> int:
        found = re.search(r"Free blocks found: (\d+)", debugfs(self.image, f"ffb 1 {goal}"))
        assert found is not None
        block = int(found[1])
        self._change_block_bitmap(block, "setb", -1)
        return block

    def free_block(self, block: int) -> None:
        self._change_block_bitmap(block, "freeb", +1)

    def _change_block_bitmap(self, block: int, command: str, free_delta: int) -> None:
        """debugfs setb/freeb flip only the bit: the group and superblock free
        counts are set alongside, as the allocator will keep them."""
        group = (block - self.first_data_block) // self.blocks_per_group
        stats = debugfs(self.image, "show_super_stats")
        total = re.search(r"^Free blocks:\s+(\d+)", stats, re.M)
        in_group = re.search(rf"Group\s+{group}:.*?\n\s+(\d+) free blocks", stats)
        assert total is not None and in_group is not None
        commands = self.image.with_suffix(".debugfs")
        commands.write_text(
            f"{command} {block}\n"
            f"set_bg {group} free_blocks_count {int(in_group[1]) + free_delta}\n"
            f"ssv free_blocks_count {int(total[1]) + free_delta}\n"
        )
        result = run(["debugfs", "-w", "-f", str(commands), str(self.image)])
        assert result.returncode == 0 and "rror" not in result.stderr, result.stderr

    def goal(self, ino: int) -> int:
        return (ino - 1) // self.inodes_per_group * self.blocks_per_group + self.first_data_block

    def state(self, path: str) -> XattrState:
        inode = self.inode(path)
        return xattr_state(inode, read_meta=self.read_block, block_size=self.info.block_size,
                           csum_seed=self.seed, goal=self.goal(inode.ino))

    def apply(self, path: str, state: XattrState, update: XattrUpdate) -> None:
        """What the facade does around a planned update."""
        if not update.changed:
            return
        self.actions.add(update.block_action)
        outcome = apply_block_update(update, state, read_meta=self.read_block,
                                     write_meta=self.write_block,
                                     alloc_block=self.alloc_block, free_block=self.free_block)
        inode = self.inode(path)  # re-read: nothing above touches the inode
        raw = bytearray(inode.raw)
        if update.ibody is not None:
            raw[128 + inode.extra_isize :] = update.ibody
        if update.mode_bits is not None:
            struct.pack_into("<H", raw, _MODE, (inode.mode & ~0o777) | update.mode_bits)
        struct.pack_into("<I", raw, _FILE_ACL_LO, outcome.file_acl & 0xFFFFFFFF)
        struct.pack_into("<H", raw, _FILE_ACL_HI, outcome.file_acl >> 32)
        blocks = inode.blocks_512 + outcome.blocks_512_delta
        assert blocks >= 0
        struct.pack_into("<I", raw, _BLOCKS_LO, blocks & 0xFFFFFFFF)
        struct.pack_into("<H", raw, _BLOCKS_HI, blocks >> 32)
        self.write_inode(path, raw)

    def call(self, path: str, op: Op) -> int:
        """One setxattr/removexattr through the planner; 0 or the errno."""
        state = self.state(path)
        try:
            if op.value is None:
                update = remove_xattr(state, op.name)
            else:
                update = set_xattr(state, op.name, op.value, op.flags)
        except Ext4Error as error:
            return error.errno
        self.apply(path, state, update)
        return 0


@dataclass(frozen=True)
class Op:
    name: bytes
    value: bytes | None  # None: removexattr
    flags: int = 0


def kernel_call(path: Path, op: Op) -> int:
    try:
        if op.value is None:
            os.removexattr(path, op.name)
        else:
            os.setxattr(path, op.name, op.value, op.flags)
    except OSError as error:
        return error.errno
    return 0


def kernel_view(path: Path) -> tuple[int, dict[bytes, bytes]]:
    """(mode, every attribute) as the kernel shows them."""
    names = os.listxattr(path)
    return os.lstat(path).st_mode, {n.encode(): os.getxattr(path, n) for n in names}


# ---------------------------------------------------------------- images


FILES = ("f_small", "f_block", "f_many", "f_acl", "d")


def source_tree(root: Path) -> Path:
    """Files whose attributes mkfs.ext4 -d copies: in-inode, block, many, ACLs."""
    root.mkdir()
    for name in FILES[:-1]:
        (root / name).write_bytes(name.encode())
    (root / "d").mkdir()
    os.setxattr(root / "f_small", "user.a", b"alpha")
    os.setxattr(root / "f_small", "trusted.t", b"t" * 12)
    os.setxattr(root / "f_block", "user.big", b"B" * 300)
    os.setxattr(root / "f_block", "user.b", b"beta")
    for i in range(16):
        os.setxattr(root / "f_many", f"user.m{i:02d}", bytes([65 + i]) * i)
    os.setxattr(root / "f_acl", ACL_ACCESS, ACL_NAMED)
    os.setxattr(root / "d", ACL_DEFAULT, ACL_NAMED)
    os.setxattr(root / "d", "security.s", b"label")
    return root


# No journal on images the kernel writes: a kernel bug in a journalled write can leak
# a handle and wedge the journal (and every sync(2) on the machine) until reboot.
VARIANTS = {
    # block size, inode size, metadata_csum
    "1k-256-csum": ("-b", "1024", "-I", "256", "-O", "metadata_csum,^has_journal"),
    "4k-128-nocsum": ("-b", "4096", "-I", "128", "-O", "^metadata_csum,^has_journal"),
    "4k-256-nocsum": ("-b", "4096", "-I", "256", "-O", "^metadata_csum,^64bit,^has_journal"),
}


def random_ops(rng: random.Random, block_size: int, count: int) -> list[tuple[str, Op]]:
    names = [b"user.a", b"user.b", b"user.big", b"user.m03", b"user.c",
             b"user." + b"n" * 40, b"trusted.t", b"trusted.x", b"security.s", b"gnu.g"]
    sizes = [0, 1, 5, 12, 40, 100, 300, 700, block_size // 2, block_size - 100,
             block_size - 56, block_size - 52, block_size]
    ops: list[tuple[str, Op]] = []
    for _ in range(count):
        path = rng.choice(FILES)
        roll = rng.random()
        if roll < 0.55:
            size = rng.choice(sizes)
            value = bytes([rng.randrange(32, 127)]) * size
            flags = rng.choice([0, 0, XATTR_CREATE, XATTR_REPLACE])
            ops.append((path, Op(rng.choice(names), value, flags)))
        elif roll < 0.8:
            ops.append((path, Op(rng.choice(names), None)))
        else:
            acl_name = rng.choice([ACL_ACCESS, ACL_DEFAULT])
            value = rng.choice([ACL_NAMED, ACL_PLAIN, ACL_GROUPS, ACL_BAD_ORDER, b"", None])
            ops.append((path, Op(acl_name, value, rng.choice([0, XATTR_CREATE]))))
    return ops


FIXED_OPS: list[tuple[str, Op]] = [
    ("f_small", Op(b"user.a", b"x", XATTR_CREATE)),  # EEXIST
    ("f_small", Op(b"user.zz", b"x", XATTR_REPLACE)),  # ENODATA
    ("f_small", Op(b"user.zz", None)),  # ENODATA
    ("f_small", Op(b"user.", b"x")),  # EINVAL
    ("f_small", Op(b"foo.bar", b"x")),  # EOPNOTSUPP
    ("f_small", Op(b"system.data", b"x")),  # EOPNOTSUPP
    ("f_small", Op(b"user." + b"n" * 250, b"x")),  # ERANGE (name > 255)
    ("f_small", Op(b"user.huge", b"h" * 70000)),  # E2BIG
    ("f_small", Op(b"user.a", b"alpha")),  # same value: no change
    ("f_small", Op(b"user.a", b"A" * 200)),  # moves to the block
    ("f_small", Op(b"user.a", b"a")),  # back into the inode
    ("f_block", Op(b"user.big", None)),  # block empties or shrinks
    ("f_block", Op(b"user.b", None)),
    ("f_acl", Op(ACL_ACCESS, ACL_PLAIN)),  # folded into the mode, ACL removed
    ("f_acl", Op(ACL_ACCESS, None)),  # removing an absent ACL is fine
    ("f_acl", Op(ACL_DEFAULT, ACL_NAMED)),  # EACCES: not a directory
    ("f_acl", Op(ACL_ACCESS, ACL_GROUPS, XATTR_CREATE)),  # flags ignored for ACLs
    ("f_acl", Op(ACL_ACCESS, ACL_BAD_ORDER)),  # EINVAL
    ("d", Op(ACL_DEFAULT, b"")),  # empty value removes
    ("d", Op(ACL_DEFAULT, ACL_GROUPS)),
]


def kernel_placement(offline: OfflineImage, path: str) -> tuple[list[bytes], list[bytes]]:
    state = offline.state(path)
    return [e.name for e in state.ibody_entries], sorted(e.name for e in state.block_entries)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_calls_same_result_as_kernel(tmp_path: Path, variant: str) -> None:
    src = source_tree(tmp_path / "src")
    mkfs_args = VARIANTS[variant]
    theirs = make_image(tmp_path / "kernel.img", 8, *mkfs_args, root_dir=src)
    ours = tmp_path / "ours.img"
    shutil.copyfile(theirs, ours)
    offline = OfflineImage.open(ours)
    block_size = offline.info.block_size
    ops = FIXED_OPS + random_ops(random.Random(variant), block_size, 300)

    outcomes_kernel = []
    with kernel_mount(theirs, tmp_path / "mnt", readonly=False) as mnt:
        for path, op in ops:
            outcomes_kernel.append(kernel_call(mnt / path, op))
        expected = {path: kernel_view(mnt / path) for path in FILES}
    outcomes_ours = [offline.call("/" + path, op) for path, op in ops]

    for (path, op), theirs_rc, ours_rc in zip(ops, outcomes_kernel, outcomes_ours, strict=True):
        assert (path, op.name, ours_rc) == (path, op.name, theirs_rc), (
            f"{op.name!r} len={None if op.value is None else len(op.value)} flags={op.flags}: "
            f"ours {errno.errorcode.get(ours_rc, ours_rc)}, "
            f"kernel {errno.errorcode.get(theirs_rc, theirs_rc)}"
        )
    assert any(rc == 0 for rc in outcomes_ours) and any(rc for rc in outcomes_ours)
    assert errno.ENOSPC in outcomes_ours  # values of a whole block never fit
    assert {BlockAction.ALLOCATE, BlockAction.REWRITE, BlockAction.FREE} <= offline.actions

    assert_fsck_clean(ours)
    with kernel_mount(ours, tmp_path / "mnt2") as mnt:
        got = {path: kernel_view(mnt / path) for path in FILES}
    assert got == expected
    # Placement too: the same names in the inode (in the same order) and in the block.
    kernel_side = OfflineImage.open(theirs)
    for path in FILES:
        assert kernel_placement(offline, "/" + path) == kernel_placement(kernel_side, "/" + path)


def test_shared_block_copy_on_write(tmp_path: Path) -> None:
    image = make_image(tmp_path / "shared.img", 8, "-b", "1024", "-I", "256",
                       "-O", "^has_journal")
    big = b"S" * 300  # too big for the 96-byte in-inode area: goes to a block
    with kernel_mount(image, tmp_path / "mnt", readonly=False) as mnt:
        for name in ("f1", "f2", "f3"):
            (mnt / name).write_bytes(b"")
            os.setxattr(mnt / name, "user.shared", big)
            os.setxattr(mnt / name, "user.own", name.encode())  # in-inode
    offline = OfflineImage.open(image)
    states = {name: offline.state("/" + name) for name in ("f1", "f2", "f3")}
    shared = states["f1"].block_nr
    assert shared and all(s.block_nr == shared for s in states.values())
    assert states["f1"].block_refcount == 3
    sectors = 1024 // 512
    blocks_before = {name: offline.inode("/" + name).blocks_512 for name in states}

    # Change the shared value of f1: the block is copied, the others keep theirs.
    update = set_xattr(states["f1"], b"user.shared", b"T" * 300, 0)
    assert update.block_action is BlockAction.COPY
    offline.apply("/f1", states["f1"], update)
    f1 = offline.state("/f1")
    assert f1.block_nr not in (0, shared) and f1.block_refcount == 1
    assert offline.state("/f2").block_nr == shared
    assert parse_xattr_block(offline.read_block(shared), blkno=shared, ino=0,
                             csum_seed=offline.seed).refcount == 2
    assert offline.inode("/f1").blocks_512 == blocks_before["f1"]
    assert_fsck_clean(image)

    # f2 lets go of the shared block: refcount 1, f2 owns no block any more.
    update = remove_xattr(offline.state("/f2"), b"user.shared")
    assert update.block_action is BlockAction.DETACH
    offline.apply("/f2", offline.state("/f2"), update)
    assert offline.inode("/f2").file_acl == 0
    assert offline.inode("/f2").blocks_512 == blocks_before["f2"] - sectors
    assert offline.state("/f3").block_refcount == 1
    assert_fsck_clean(image)

    # f3 was the last user: the block is freed.
    update = remove_xattr(offline.state("/f3"), b"user.shared")
    assert update.block_action is BlockAction.FREE
    offline.apply("/f3", offline.state("/f3"), update)
    assert "marked in use" not in debugfs(image, f"testb {shared}")
    assert offline.inode("/f3").blocks_512 == blocks_before["f3"] - sectors
    assert_fsck_clean(image)

    with kernel_mount(image, tmp_path / "mnt2") as mnt:
        assert kernel_view(mnt / "f1")[1] == {b"user.shared": b"T" * 300, b"user.own": b"f1"}
        assert kernel_view(mnt / "f2")[1] == {b"user.own": b"f2"}
        assert kernel_view(mnt / "f3")[1] == {b"user.own": b"f3"}


def test_no_space_changes_nothing(tmp_path: Path) -> None:
    """ENOSPC is raised at planning time, before any byte or bitmap bit changes."""
    src = source_tree(tmp_path / "src")
    image = make_image(tmp_path / "full.img", 8, "-b", "1024", "-I", "128", root_dir=src)
    before = image.read_bytes()
    offline = OfflineImage.open(image)
    assert offline.call("/f_many", Op(b"user.too_much", b"z" * 1000)) == errno.ENOSPC
    assert image.read_bytes() == before
