"""File contents, write side: map and allocate for the iomap executor, set i_size,
write inline files, truncate.

The executor's protocol (docs/design.md): `write_begin` maps a block range,
allocating the holes (runs flagged `new`); the executor writes the data, new
blocks whole (zero-filling what the request does not cover); `write_end`
raises i_size and the times; `commit` later makes the mapping durable. So
data always reaches the device before the metadata that points at it, and a
new block never shows another file's old bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ext4box.ext4.format import features as F
from ext4box.ext4.format import limits
from ext4box.ext4.format.blockrun import BlockRun
from ext4box.ext4.format.errors import (
    Corrupt,
    Ext4Error,
    FileTooBig,
    IsADirectory,
    NoSpace,
    Unsupported,
    inode_where,
)
from ext4box.ext4.format.extents import LBLK_LIMIT
from ext4box.ext4.format.inode import FL_EXTENTS, FL_INLINE_DATA, Inode, replace_inode
from ext4box.ext4.format.xattr import parse_ibody_xattrs
from ext4box.ext4.write import flag_guards
from ext4box.ext4.write.extent_writer import ExtentTreeWriter
from ext4box.ext4.write.inline_writer import (
    InlineLayout,
    InlineState,
    NeedsConversion,
    conversion,
    truncate_inline,
)
from ext4box.ext4.write.inline_writer import write_inline as plan_inline_write

if TYPE_CHECKING:
    from ext4box.ext4.write.context import TreeWriter, WriteContext

# Files above 2 GiB need the large_file feature (the kernel sets it on demand).
_LARGE_FILE_SIZE = 1 << 31
# Indirect blocks one new run of a block map may need (single, double, triple).
_BLOCKMAP_SLACK = 3


@dataclass(frozen=True, slots=True)
class WriteRun:
    lblk: int
    length: int
    pblk: int
    new: bool  # just allocated (or was unwritten): the executor writes it whole
    converted: bool = False  # was unwritten: write_abort makes it unwritten again


def check_file_write(fs: WriteContext, ino: int) -> Inode:
    """The inode, if file data may be written to it; else what the kernel answers."""
    inode = fs.inode(ino)
    if inode.is_dir:
        raise IsADirectory(f"inode {ino} is a directory")
    if not inode.is_reg:
        raise Corrupt("inode", inode_where(ino), "file data write to a non-regular inode")
    if inode.is_encrypted or inode.is_verity:
        raise Unsupported("encrypted or verity inode", inode_where(ino), "writing")
    flag_guards.check_data_write(inode)
    return inode


def _goal(fs: WriteContext, inode: Inode, lblk: int) -> int:
    """Just after the block mapped before `lblk`, or the inode's group."""
    if lblk > 0:
        (run,) = fs.mapper_for(inode).map(lblk - 1, 1)
        if run.pblk is not None:
            return run.pblk + 1
    return fs.group_goal(inode.ino)


def write_begin(fs: WriteContext, ino: int, lblk: int, count: int) -> list[WriteRun]:
    """Map [lblk, lblk + count), allocating holes; all or nothing (NoSpace maps nothing)."""
    if count <= 0 or lblk < 0 or lblk + count > LBLK_LIMIT:
        raise ValueError(f"bad block range {lblk}+{count}")
    inode = check_file_write(fs, ino)
    if inode.has_inline_data:
        inode = convert_inline(fs, inode)
    if not inode.uses_extents and lblk + count > _blockmap_limit(fs):
        raise FileTooBig(f"block {lblk + count - 1} beyond what a block map addresses")
    if lblk + count > -(-limits.max_file_size(fs.sb, inode) // fs.block_size):
        raise FileTooBig(f"block {lblk + count - 1} beyond the file size limit")
    runs = fs.mapper_for(inode).map(lblk, count)
    holes = sum(r.length for r in runs if r.pblk is None)
    if not holes and not any(r.unwritten for r in runs):
        return [WriteRun(r.lblk, r.length, r.pblk, False) for r in runs]  # type: ignore[arg-type]
    pieces = allocate_holes(fs, inode, lblk, runs)
    tree = fs.tree_writer(inode)
    done: list[tuple[int, int, int]] = []
    marked: list[BlockRun] = []
    try:
        for at, pblk, got in pieces:
            tree.insert(at, pblk, got)
            done.append((at, pblk, got))
        for run in runs:
            if run.pblk is not None and run.unwritten:
                tree.mark_written(run.lblk, run.length)
                marked.append(run)
    except BaseException:
        kept = undo_mapping(fs, tree, done, pieces, marked)
        fs.store(fs.with_tree(inode, tree, kept))
        raise
    fs.store(fs.with_tree(inode, tree, sum(got for _, _, got in pieces)))
    return _write_runs(runs, pieces)


def allocate_holes(fs: WriteContext, inode: Inode, lblk: int,
                   runs: list[BlockRun]) -> list[tuple[int, int, int]]:
    """Allocate data blocks for every hole among `runs` (a mapping of `inode` from
    `lblk`), before anything touches the tree: (lblk, pblk, length) pieces, placed
    after the blocks mapped before them. All or nothing: NoSpace (checked first,
    with room for the tree blocks the inserts may need) allocates nothing."""
    holes = sum(r.length for r in runs if r.pblk is None)
    if not holes:
        return []
    # The kernel reserves quota for the data blocks at write (and fallocate) time;
    # tree blocks are charged as they are allocated, without a check.
    fs.check_quota(inode, blocks=holes)
    need = holes + _tree_slack(inode) * sum(1 for r in runs if r.pblk is None)
    available = fs.blocks.available()
    if available < need:
        raise NoSpace(f"{available} blocks available, up to {need} needed")
    pieces: list[tuple[int, int, int]] = []  # (lblk, pblk, length) newly allocated
    try:
        goal = _goal(fs, inode, lblk)
        for run in runs:
            if run.pblk is not None:
                goal = run.pblk + run.length
                continue
            at, left = run.lblk, run.length
            while left:
                pblk, got = fs.blocks.alloc(goal, left)
                pieces.append((at, pblk, got))
                at, left, goal = at + got, left - got, pblk + got
    except BaseException:
        for _, pblk, got in pieces:
            fs.blocks.free(pblk, got)
        raise
    return pieces


def undo_mapping(fs: WriteContext, tree: TreeWriter, done: list[tuple[int, int, int]],
                 pieces: list[tuple[int, int, int]], marked: list[BlockRun]) -> int:
    """Unmap what a failed write_begin mapped and free the blocks it allocated; returns
    how many stay mapped (a punch that fails, only on a damaged tree, keeps them zeroed)."""
    bs = fs.block_size
    for run in marked:  # now read as data: make them read as the zeros they were
        assert run.pblk is not None
        fs.dev.pwrite(run.pblk * bs, bytes(run.length * bs))
    kept: set[int] = set()
    for at, pblk, got in done:
        try:
            tree.punch(at, got)
        except Ext4Error:
            fs.dev.pwrite(pblk * bs, bytes(got * bs))
            kept.add(pblk)
    for _, pblk, got in pieces:
        if pblk not in kept:
            fs.blocks.free(pblk, got)
    return sum(got for _, pblk, got in pieces if pblk in kept)


def write_abort(fs: WriteContext, ino: int, ranges: Sequence[tuple[int, int]],
                converted: Sequence[tuple[int, int]] = ()) -> None:
    """The data for the (lblk, length) ranges write_begin reported new could not be
    written. `ranges` were holes: unmap and free their blocks, which hold whatever
    an earlier owner left there (the kernel's ext4 likewise truncates the blocks
    a failed write allocated). `converted` were unwritten extents: they become
    unwritten again, still allocated, as the kernel's ext4 leaves an unwritten
    extent whose I/O failed; if the tree has no room for that, their blocks are
    zeroed on the device instead (the kernel's zero-out fallback)."""
    if not ranges and not converted:
        return
    inode = fs.inode(ino)
    tree = fs.tree_writer(inode)
    freed = 0
    for lblk, length in ranges:
        for pblk, count in tree.punch(lblk, length):
            fs.blocks.free(pblk, count)
            freed += count
    for lblk, length in converted:
        try:
            if not isinstance(tree, ExtentTreeWriter):
                raise NoSpace("a block map has no unwritten state")
            tree.mark_unwritten(lblk, length)
        except NoSpace:
            bs = fs.block_size
            for run in fs.mapper_for(fs.with_tree(inode, tree)).map(lblk, length):
                if run.pblk is not None:
                    fs.dev.pwrite(run.pblk * bs, bytes(run.length * bs))
    fs.store(fs.with_tree(inode, tree, -freed))


def _write_runs(runs: list[BlockRun], pieces: list[tuple[int, int, int]]) -> list[WriteRun]:
    out: list[WriteRun] = []
    new_by_lblk = {at: (pblk, got) for at, pblk, got in pieces}
    for run in runs:
        if run.pblk is not None:
            out.append(WriteRun(run.lblk, run.length, run.pblk, run.unwritten, run.unwritten))
            continue
        at = run.lblk
        while at < run.end:
            pblk, got = new_by_lblk[at]
            out.append(WriteRun(at, got, pblk, True))
            at += got
    return out


def _tree_slack(inode: Inode) -> int:
    """Tree blocks inserting one run may allocate at most: a split at every level of
    the extent tree plus a new root level (checked before allocating any data)."""
    if not inode.uses_extents:
        return _BLOCKMAP_SLACK
    depth = int.from_bytes(inode.i_block[6:8], "little")
    return min(depth, 5) + 2


def _blockmap_limit(fs: WriteContext) -> int:
    per = fs.block_size // 4
    return min(12 + per + per * per + per * per * per, LBLK_LIMIT)


def writable_length(fs: WriteContext, ino: int, pos: int, length: int) -> int:
    """How many of `length` bytes at `pos` a write may put in `ino` (limits.py)."""
    return limits.writable_length(fs.sb, check_file_write(fs, ino), pos, length)


def write_end(fs: WriteContext, ino: int, end_pos: int, *, now_ns: int | None) -> Inode:
    """After the executor wrote up to byte `end_pos`: i_size = max(i_size, end_pos), times."""
    inode = check_file_write(fs, ino)
    now = fs.now_ns() if now_ns is None else now_ns
    size = max(inode.size, end_pos)
    note_large_file(fs, size)
    return fs.store(replace_inode(inode, size=size, mtime_ns=now, ctime_ns=now))


def note_large_file(fs: WriteContext, size: int) -> None:
    if size >= _LARGE_FILE_SIZE and not fs.writer.superblock().has_ro_compat(
            F.RO_COMPAT_LARGE_FILE):
        current = int(fs.writer.superblock().fields["feature_ro_compat"])
        fs.writer.update_superblock(feature_ro_compat=current | F.RO_COMPAT_LARGE_FILE)


# ---- inline data -------------------------------------------------------------------


def _inline_state(inode: Inode) -> InlineState:
    area = inode.ibody_xattr_area
    entries = tuple(parse_ibody_xattrs(area, ino=inode.ino)) if area else ()
    return InlineState(ino=inode.ino, i_block=inode.i_block, size=inode.size,
                       ibody_entries=entries, ibody_size=len(area))


def _apply_layout(inode: Inode, layout: InlineLayout) -> Inode:
    raw = bytearray(inode.raw)
    area = inode.ibody_xattr_area
    raw[len(raw) - len(area):] = layout.ibody
    return replace_inode(inode, raw=bytes(raw), i_block=layout.i_block, size=layout.size)


def write_inline(fs: WriteContext, ino: int, pos: int, data: bytes) -> bool:
    """Write into an inline file: True when done inline; False after converting it to
    blocks (or when a blockless empty file cannot take the data inline)."""
    inode = check_file_write(fs, ino)
    now = fs.now_ns()
    if not inode.has_inline_data:
        empty = inode.size == 0 and inode.blocks_512 == 0 and not inode.file_acl
        if not (empty and fs.sb.has_incompat(F.INCOMPAT_INLINE_DATA) and inode.ibody_xattr_area):
            return False
        if inode.uses_extents and fs.mapper_for(inode).map(0, 1)[0].pblk is not None:
            return False
        plan = plan_inline_write(_inline_state(inode), pos, data)
        if isinstance(plan, NeedsConversion):
            return False
        inode = replace_inode(inode, flags=(inode.flags & ~FL_EXTENTS) | FL_INLINE_DATA)
    else:
        plan = plan_inline_write(_inline_state(inode), pos, data)
        if isinstance(plan, NeedsConversion):
            convert_inline(fs, inode)
            return False
    inode = _apply_layout(inode, plan)
    fs.store(replace_inode(inode, mtime_ns=now, ctime_ns=now))
    return True


def convert_inline(fs: WriteContext, inode: Inode) -> Inode:
    """Move an inline file's body into one block (ext4_convert_inline_data_to_extent)."""
    plan = conversion(_inline_state(inode), extents=fs.has_extents)
    flags = inode.flags & ~FL_INLINE_DATA
    if fs.has_extents:
        flags |= FL_EXTENTS
    raw = bytearray(inode.raw)
    area = inode.ibody_xattr_area
    raw[len(raw) - len(area):] = plan.ibody
    converted = replace_inode(inode, raw=bytes(raw), i_block=plan.i_block, flags=flags)
    if plan.body:
        pblk, _ = fs.blocks.alloc(fs.group_goal(inode.ino), 1)
        tree = fs.tree_writer(converted)
        try:
            tree.insert(0, pblk, 1)
        except BaseException:
            fs.blocks.free(pblk, 1)
            raise
        fs.dev.pwrite(pblk * fs.block_size, plan.body.ljust(fs.block_size, b"\0"))
        converted = fs.with_tree(converted, tree, 1)
    return fs.store(converted)


# ---- truncate ----------------------------------------------------------------------


def zero_tail(fs: WriteContext, inode: Inode, size: int) -> None:
    """Zero the bytes of the block holding `size` from `size` to its end (data write)."""
    bs = fs.block_size
    offset = size % bs
    if not offset:
        return
    (run,) = fs.mapper_for(inode).map(size // bs, 1)
    if run.pblk is None or run.unwritten:
        return
    fs.dev.pwrite(run.pblk * bs + offset, bytes(bs - offset))


def truncate(fs: WriteContext, inode: Inode, size: int, now: int) -> Inode:
    """Set i_size of a regular file: free whole blocks past the end, zero the tail of
    the last partial block (so growing later never uncovers old bytes); not stored."""
    if size < 0:
        raise ValueError(f"negative size {size}")
    if inode.is_dir:
        raise IsADirectory(f"inode {inode.ino} is a directory")
    if not inode.is_reg:
        raise Corrupt("inode", inode_where(inode.ino), "truncate of a non-regular inode")
    # On the inode as it is: an inline-data inode has the block-map limit, as in the kernel.
    limits.check_size(fs.sb, inode, size)
    if inode.has_inline_data:
        plan = truncate_inline(_inline_state(inode), size)
        if isinstance(plan, InlineLayout):
            return replace_inode(_apply_layout(inode, plan), mtime_ns=now, ctime_ns=now)
        inode = convert_inline(fs, inode)
    if size < inode.size:
        zero_tail(fs, inode, size)
        inode = fs.truncate_blocks(inode, -(-size // fs.block_size))
    elif size > inode.size:
        zero_tail(fs, inode, inode.size)
    note_large_file(fs, size)
    return replace_inode(inode, size=size, mtime_ns=now, ctime_ns=now)
