"""Drive the write side in-process over one (mutated) image, the way the FUSE layer would.

`run_session(image, facts, ops)` opens the image with
`open_filesystem(dev, readonly=False)` (a refusal is a fine outcome when it
is an Ext4Error), runs a short sequence of write operations through the
facade and the iomap executor (create, mkdir, symlink, link, write, truncate
through setattr, rename, unlink, rmdir, setxattr, removexattr, commit) and
closes it. The read-side driver's oracles hold for every operation (only
`Ext4Error` escapes, each under a time bound); the caller bounds memory.

The write oracle compares the image before and after the session block by
block (so every write path counts: the metadata writer's pwrite and the
executor's pwritev alike) and reports as a violation any change
- outside the filesystem (block >= the s_blocks_count the image declared) or
  growing the image file;
- to the boot block (bytes 0-1023) or to the rest of block 0 past the
  superblock;
- to a backup superblock / GDT / reserved GDT block, or the primary reserved
  GDT blocks (the writer only ever updates the primary superblock and GDT);
- to a block that, in the undamaged seed, belongs to a "bystander" file the
  session never names (data, tree and xattr blocks), unless the session
  reached that inode anyway (a damaged name resolved to it, or the engine
  changed its inode record, e.g. freeing it as an orphan; the journal inode
  counts as reached: replay and journaled writes use it), or the damaged
  image gives that block to an
  inode the session did reach (two owners of a block is damage the engine is
  allowed to follow), or a group descriptor of the damaged image names it as
  a bitmap or inode table (on an image without checksums nothing tells such a
  descriptor from a real one).
When the image needs recovery, the rw open replays the journal onto the
device first, as e2fsck and the kernel do, and a replay writes wherever the
journal says: the blocks any descriptor tag in the (damaged) journal names
and the blocks of the (damaged) journal inode are then excused from the
boot-block, backup and bystander rules, never from the device and
s_blocks_count bounds (journal_walk.tag_targets: a superset computed without
the recovery code's scan).
Every device pwrite is also recorded and checked against the device size.
"""

from __future__ import annotations

import os
import stat
import struct
import time
from dataclasses import dataclass, field

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.format.group_desc import gdt_block_count, group_first_block
from ext4box.ext4.format.inode import Inode
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.read.filesystem import Filesystem
from ext4box.iomap.engine import IOMapEngine
from fuzz.driver import OP_TIMEOUT_S, Report, _Session, _Timer
from fuzz.journal_walk import journal_device_blocks, tag_targets
from fuzz.program import MAX_MUTATIONS, Program

ROOT_INO = 2
JOURNAL_INO = 8
MAX_OPS = 24
MAX_CLAIM_BLOCKS = 1 << 14  # per inode, when listing what a damaged inode claims
_OP = struct.Struct("<BBBH")  # kind, a, b, c

# Where the session acts: three parents, eight names in each. Everything else
# in the seed tree is a bystander the session never names.
PARENTS = (b"", b"empty-dir", b"many")
NAMES = (
    (b"hello.txt", b"tiny", b"empty-dir", b"fast-link", b"hardlink", b"new0", b"new1", b"new2"),
    tuple(b"new%d" % i for i in range(8)),
    (*(b"entry-with-a-longish-name-%03d" % i for i in range(4)),
     *(b"new%d" % i for i in range(4))),
)
BYSTANDERS = ("data/big.bin", "data/sparse.bin", "data/medium.bin", "a/b/c/d/deep.txt",
              "slow-link", "many/entry-with-a-longish-name-050")
XATTR_NAMES = (b"user.small", b"user.fuzz", b"user.big", b"trusted.t")

CREATE, MKDIR, WRITE, TRUNCATE, RENAME, UNLINK, SETXATTR, REMOVEXATTR, SYMLINK, LINK, \
    COMMIT, RMDIR = range(12)
KIND_NAMES = ("create", "mkdir", "write", "truncate", "rename", "unlink", "setxattr",
              "removexattr", "symlink", "link", "commit", "rmdir")


@dataclass(frozen=True, slots=True)
class RwOp:
    kind: int  # modulo len(KIND_NAMES)
    a: int  # parent choice
    b: int  # name choice
    c: int  # operation argument (position/size, second name, xattr choice)

    def __repr__(self) -> str:
        return f"RwOp({KIND_NAMES[self.kind % len(KIND_NAMES)]}, {self.a}, {self.b}, {self.c})"


def encode_ops(ops: tuple[RwOp, ...]) -> bytes:
    return b"".join(_OP.pack(o.kind & 0xFF, o.a & 0xFF, o.b & 0xFF, o.c & 0xFFFF) for o in ops)


def decode_ops(data: bytes) -> tuple[RwOp, ...]:
    count = min(len(data) // _OP.size, MAX_OPS)
    return tuple(RwOp(*_OP.unpack_from(data, i * _OP.size)) for i in range(count))


def encode_rw(program: Program, ops: tuple[RwOp, ...]) -> bytes:
    """A rw fuzz input: the number of edit records, the Program, then the operations."""
    return bytes([len(program.mutations)]) + program.encode() + encode_ops(ops)


def decode_rw(data: bytes) -> tuple[Program, tuple[RwOp, ...]]:
    """Any byte string is a valid rw input (see encode_rw)."""
    records = (data[0] if data else 0) % (MAX_MUTATIONS + 1)
    split = 1 + 2 + 13 * records
    return Program.decode(data[1:split]), decode_ops(data[split:])


@dataclass(frozen=True, slots=True)
class SeedFacts:
    """What the oracle needs to know about the undamaged seed."""

    block_size: int
    never_written: frozenset[int]  # backup sb/GDT, reserved GDT blocks
    bystanders: dict[int, frozenset[int]]  # inode -> blocks it owns in the seed
    inode_offsets: dict[int, tuple[int, int]]  # bystander inode -> (byte offset, size)


def _owned_blocks(fs: Filesystem, inode: Inode) -> set[int]:
    """Data, tree and xattr blocks of `inode` (bounded)."""
    blocks: set[int] = set()
    if inode.file_acl:
        blocks.add(inode.file_acl)
    if inode.has_inline_data or (inode.is_symlink and fs._is_fast_symlink(inode)):
        return blocks
    if not (inode.is_reg or inode.is_dir or inode.is_symlink):
        return blocks
    nblocks = min(-(-inode.size // fs.block_size), MAX_CLAIM_BLOCKS)
    if nblocks:
        for run in fs.map_blocks(inode, 0, nblocks):
            if run.pblk is not None:
                blocks.update(range(run.pblk, run.pblk + min(run.length, MAX_CLAIM_BLOCKS)))
    blocks.update(fs._mapper(inode).tree_blocks())  # type: ignore[union-attr]
    return blocks


def _resolve(fs: Filesystem, path: bytes) -> int:
    ino = ROOT_INO
    for part in path.split(b"/"):
        if part:
            ino = fs.lookup(ino, part)
    return ino


def seed_facts(image: bytes) -> SeedFacts:
    fd = os.memfd_create("fuzz-seed-facts")
    try:
        os.write(fd, image)
        fs = open_filesystem(BlockDevice(fd, size=len(image)))
        sb = fs.sb
        reserved = int(sb.fields["reserved_gdt_blocks"])
        meta_len = 1 + gdt_block_count(sb) + reserved
        never: set[int] = set()
        primary_rsv = sb.first_data_block + 1 + gdt_block_count(sb)
        never.update(range(primary_rsv, primary_rsv + reserved))
        for group in range(1, sb.group_count):
            if sb.group_has_super(group):
                first = group_first_block(sb, group)
                never.update(range(first, first + meta_len))
        bystanders: dict[int, frozenset[int]] = {}
        inos = [_resolve(fs, p.encode()) for p in BYSTANDERS]
        if sb.fields.get("journal_inum"):
            inos.append(int(sb.fields["journal_inum"]))
        offsets = {}
        for ino in inos:
            inode = fs.inode(ino)
            bystanders[ino] = frozenset(_owned_blocks(fs, inode))
            group, slot = divmod(ino - 1, sb.inodes_per_group)
            offsets[ino] = (fs.groups[group].inode_table * sb.block_size + slot * sb.inode_size,
                            sb.inode_size)
        fs.close()
        return SeedFacts(sb.block_size, frozenset(never), bystanders, offsets)
    finally:
        os.close(fd)


class RecordingDevice(BlockDevice):
    """A BlockDevice that records every pwrite and flags any past the device."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, writable=True, size=size)
        self.writes: list[tuple[int, int]] = []
        self.out_of_range: list[tuple[int, int]] = []

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writes.append((offset, len(data)))
        if offset < 0 or offset + len(data) > self.size:
            self.out_of_range.append((offset, len(data)))
        super().pwrite(offset, data)

    def flush(self) -> None:
        pass  # a memfd: fsync buys nothing and costs time


@dataclass(slots=True)
class RwReport(Report):
    refused: str = ""  # why the rw open failed, if it did
    reached: set[int] = field(default_factory=set)  # inodes the session operated on
    violations: list[str] = field(default_factory=list)
    pwrites: int = 0


def _claims_of_reached(image: bytes, reached: set[int]) -> set[int]:
    """Blocks the damaged image (as it was before the session) gives to the inodes the
    session reached: the engine may write them even if a bystander owns them too."""
    fd = os.memfd_create("fuzz-claims")
    claimed: set[int] = set()
    try:
        os.write(fd, image)
        try:
            fs = open_filesystem(BlockDevice(fd, size=len(image)))
        except Ext4Error:
            return claimed
        for ino in sorted(reached):
            try:
                claimed |= _owned_blocks(fs, fs.inode(ino))
            except Ext4Error:
                continue
        # What the descriptors declare as bitmaps and inode tables: without checksums a
        # descriptor moved onto a used block is indistinguishable from a real one (the
        # kernel writes there too); overlaps with fixed metadata or each other are refused.
        itable_blocks = -(-fs.sb.inodes_per_group * fs.sb.inode_size // fs.block_size)
        for desc in fs.groups.descs:
            claimed.update((desc.block_bitmap, desc.inode_bitmap))
            claimed.update(range(desc.inode_table, desc.inode_table + itable_blocks))
        fs.close()
    finally:
        os.close(fd)
    return claimed


def run_session(image: bytes | bytearray, facts: SeedFacts, ops: tuple[RwOp, ...], *,
                op_timeout: float = OP_TIMEOUT_S) -> tuple[RwReport, bytes]:
    """Open rw, run `ops`, close; returns the report (violations filled) and the image after."""
    before = bytes(image)
    fd = os.memfd_create("fuzz-rw-image")
    report = RwReport()
    try:
        os.write(fd, before)
        dev = RecordingDevice(fd, len(before))
        with _Timer(op_timeout) as timer:
            session = _Session(report, timer)
            fs = session.op("open rw", lambda: open_filesystem(dev, readonly=False))
            if fs is not None:
                report.opened = True
                _run_ops(session, fs, IOMapEngine(fs, dev), ops, report)
                session.op("close", fs.close)
            elif report.errnos:
                report.refused = next(iter(report.errnos))
        report.pwrites = len(dev.writes)
        size_after = os.fstat(fd).st_size
        after = os.pread(fd, len(before), 0)
    finally:
        os.close(fd)
    for offset, length in dev.out_of_range:
        report.violations.append(f"pwrite {offset}+{length} past the device ({len(before)})")
    if size_after != len(before):
        report.violations.append(f"image grew from {len(before)} to {size_after} bytes")
    check_writes(before, after, facts, report)
    return report, after


def _declared(image: bytes) -> tuple[int, int]:
    """s_blocks_count, and the journal inode if the image has a journal (0 if not): the
    rw open replays it when it needs recovery, and journaled writes go through it, so
    writing the journal is the session's job."""
    try:
        sb = Superblock.parse(image[SUPERBLOCK_OFFSET:SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE])
    except Ext4Error:
        return 0, 0
    journaled = sb.has_compat(F.COMPAT_HAS_JOURNAL)
    return sb.blocks_count, int(sb.fields["journal_inum"]) if journaled else 0


def _recovering(image: bytes) -> bool:
    try:
        sb = Superblock.parse(image[SUPERBLOCK_OFFSET:SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE])
    except Ext4Error:
        return False
    return sb.has_incompat(F.INCOMPAT_RECOVER)


def replay_may_write(image: bytes, block_size: int) -> set[int]:
    """Blocks a replay of this image's journal may write (none unless it needs recovery):
    every block a descriptor names, and the journal's own blocks (its superblock)."""
    if not _recovering(image):
        return set()
    journal = journal_device_blocks(image)
    return tag_targets(image, journal, block_size) | set(journal)


def check_writes(before: bytes, after: bytes, facts: SeedFacts, report: RwReport) -> None:
    """Oracle (4): fill report.violations with every change outside what the session owns."""
    if before == after:
        return
    bs = facts.block_size
    out = report.violations
    replayed = replay_may_write(before, bs)
    if before[:SUPERBLOCK_OFFSET] != after[:SUPERBLOCK_OFFSET] and 0 not in replayed:
        out.append("boot block (bytes 0-1023) written")
    sb_end = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE
    if bs > sb_end and before[sb_end:bs] != after[sb_end:bs] and 0 not in replayed:
        out.append(f"block 0 bytes {sb_end}-{bs - 1} (past the superblock) written")
    changed = [b for b in range(1, len(before) // bs)
               if before[b * bs:(b + 1) * bs] != after[b * bs:(b + 1) * bs]]
    declared, journal_ino = _declared(before)
    for pblk in changed:
        if pblk >= declared:
            out.append(f"block {pblk} written, past s_blocks_count {declared}")
        if pblk in facts.never_written and pblk not in replayed:
            out.append(f"block {pblk} (backup superblock/GDT or reserved GDT) written")
    reached = set(report.reached) | ({journal_ino} if journal_ino else set())
    spared = set(reached)
    for ino, (offset, size) in facts.inode_offsets.items():
        if before[offset:offset + size] != after[offset:offset + size]:
            spared.add(ino)  # the engine changed it: an orphan freed at mount, ...
    victims = {pblk: ino for ino, blocks in facts.bystanders.items() if ino not in spared
               for pblk in blocks}
    hits = [pblk for pblk in changed if pblk in victims and pblk not in replayed]
    if hits:
        claimed = _claims_of_reached(before, reached)
        for pblk in hits:
            if pblk not in claimed:
                out.append(f"block {pblk} of bystander inode {victims[pblk]} written")


# ---- the operations ---------------------------------------------------------------


class _Skip(Exception):
    """A name the operation needs could not be resolved (already answered as an error)."""


def _run_ops(s: _Session, fs: Filesystem, engine: IOMapEngine, ops: tuple[RwOp, ...],
             report: RwReport) -> None:
    wfs = fs  # a WritableFilesystem; typed loosely so the driver stays simple
    reached = report.reached
    reached.add(ROOT_INO)

    def parent(a: int) -> int:
        path = PARENTS[a % len(PARENTS)]
        if not path:
            return ROOT_INO
        ino = s.op(f"lookup {path!r}", lambda: fs.lookup(ROOT_INO, path))
        if ino is None:
            raise _Skip
        reached.add(ino)
        return ino

    def name(a: int, b: int) -> bytes:
        names = NAMES[a % len(PARENTS)]
        return names[b % len(names)]

    def target(a: int, b: int) -> int:
        dir_ino, leaf = parent(a), name(a, b)
        ino = s.op(f"lookup {dir_ino}/{leaf!r}", lambda: fs.lookup(dir_ino, leaf))
        if ino is None:
            raise _Skip
        reached.add(ino)
        return ino

    def note(result: object) -> object:
        if isinstance(result, Inode):
            reached.add(result.ino)
        return result

    for step, op in enumerate(ops):
        kind = op.kind % len(KIND_NAMES)
        label = f"#{step} {op!r}"
        try:
            _one(s, wfs, engine, kind, op, label, parent, name, target, note)
        except _Skip:
            continue


def _one(s, fs, engine, kind, op, label, parent, name, target, note) -> None:
    a, b, c = op.a, op.b, op.c
    if kind == CREATE:
        p = parent(a)
        note(s.op(label, lambda: fs.create(p, name(a, b), stat.S_IFREG | 0o644, 0, 0)))
    elif kind == MKDIR:
        p = parent(a)
        note(s.op(label, lambda: fs.mkdir(p, name(a, b), 0o755, 0, 0)))
    elif kind == SYMLINK:
        p = parent(a)
        link_target = (b"t" * (1 + c % 1500))
        note(s.op(label, lambda: fs.symlink(p, name(a, b), link_target, 0, 0)))
    elif kind == WRITE:
        ino = target(a, b)
        pos = (c & 0xFF) * 997
        data = bytes((i * 7 + c) & 0xFF for i in range(1 + (c >> 8) * 64))

        def write() -> object:
            engine.cache.invalidate(ino)  # the FUSE layer forgets a reused number's mapping
            return engine.write(fs.inode(ino), pos, data, now_ns=time.time_ns())

        s.op(label, write)
    elif kind == TRUNCATE:
        ino = target(a, b)
        note(s.op(label, lambda: fs.setattr(ino, size=c * 97)))
        engine.cache.invalidate(ino)
    elif kind == RENAME:
        p1, n1 = parent(a), name(a, b)
        p2, n2 = parent(c & 0xFF), name(c & 0xFF, c >> 8)
        flags = (c >> 14) & 3 if (c >> 14) & 3 != 3 else 0
        s.op(label, lambda: fs.rename(p1, n1, p2, n2, flags))
    elif kind == UNLINK:
        p = parent(a)
        note(s.op(label, lambda: fs.unlink(p, name(a, b), still_open=bool(c & 1))))
    elif kind == RMDIR:
        p = parent(a)
        s.op(label, lambda: fs.rmdir(p, name(a, b)))
    elif kind == LINK:
        ino = target(a, b)
        p2, n2 = parent(c & 0xFF), name(c & 0xFF, c >> 8)
        note(s.op(label, lambda: fs.link(ino, p2, n2)))
    elif kind == SETXATTR:
        ino = target(a, b)
        xname = XATTR_NAMES[c % len(XATTR_NAMES)]
        value = bytes([c & 0xFF]) * ((c >> 2) % 2000)
        note(s.op(label, lambda: fs.setxattr(ino, xname, value)))
    elif kind == REMOVEXATTR:
        ino = target(a, b)
        note(s.op(label, lambda: fs.removexattr(ino, XATTR_NAMES[c % len(XATTR_NAMES)])))
    elif kind == COMMIT:
        s.op(label, fs.commit)
