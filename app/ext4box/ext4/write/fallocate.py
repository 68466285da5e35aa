"""fallocate(2) on a regular file: which blocks each mode allocates, unmaps, zeroes or moves.

The answers are the kernel's ext4 (Linux 6.18, checked on loop mounts):

- default mode / FALLOC_FL_KEEP_SIZE: every hole of the blocks the byte range
  touches gets unwritten extents (allocated, reading as zeros); written and
  unwritten blocks stay as they are. Without KEEP_SIZE, i_size grows to
  offset + length (exactly, not rounded to a block).
- PUNCH_HOLE (always with KEEP_SIZE): the blocks wholly inside the range are
  unmapped and freed, the written parts of the blocks at its edges zeroed. A
  range starting at or past EOF does nothing; a range reaching past EOF stops
  at the end of the memory page holding EOF, so blocks preallocated further
  out stay (the kernel's ext4_punch_hole).
- ZERO_RANGE (with or without KEEP_SIZE): holes of the touched blocks become
  unwritten extents, written blocks wholly inside become unwritten, and the
  written parts of the edge blocks are zeroed (they stay written). Without
  KEEP_SIZE, i_size grows to offset + length.
- COLLAPSE_RANGE: block-aligned offset and length, the range ending before
  EOF (else EINVAL); the blocks are freed and everything after moves down,
  i_size shrinks by length.
- INSERT_RANGE: block-aligned, offset before EOF (else EINVAL); everything
  from offset moves up by length, leaving a hole; i_size grows by length.
- Files mapped by indirect blocks (ext2/ext3 layout) have no unwritten
  state: only PUNCH_HOLE works there, every other mode is EOPNOTSUPP. An
  inline-data file is first moved into a block, as the kernel does.
- Every other flag combination is EOPNOTSUPP, a negative offset or a length
  <= 0 EINVAL, a directory EISDIR, another non-regular file ENODEV, an
  offset + length past s_maxbytes (ext4/format/limits.py) EFBIG (the kernel's
  vfs_fallocate checks, so the caller may rely on them here too); an insert
  that would take i_size past s_maxbytes is EFBIG too.
- mtime and ctime become now on every successful call (file_modified()).

Deviations, on purpose: the kernel allocates chunk by chunk and keeps what it
got when it runs out of space, and an INSERT_RANGE that fails because blocks
preallocated past EOF would move past the last logical block (EINVAL) has
already grown i_size by the length; here every failure (ENOSPC, EINVAL, ...)
leaves the file exactly as it was, blocks and size alike.

Callers above the ext4 layer go through `WritableFilesystem.fallocate`, or
`IOMapEngine.fallocate`, which also forgets the engine's cached mapping.
"""

from __future__ import annotations

import errno
import mmap
from typing import TYPE_CHECKING

from ext4box.ext4.format import features as F
from ext4box.ext4.format import limits
from ext4box.ext4.format.errors import Ext4Error, FileTooBig, IsADirectory, Unsupported, inode_where
from ext4box.ext4.format.inode import FL_APPEND, FL_IMMUTABLE, Inode, replace_inode
from ext4box.ext4.write import file_data
from ext4box.ext4.write.extent_writer import ExtentTreeWriter

if TYPE_CHECKING:
    from ext4box.ext4.write.context import WriteContext

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

# The mode values (KEEP_SIZE aside) the kernel's ext4 accepts, one operation each.
_MODES = {
    0: "allocate",
    FALLOC_FL_PUNCH_HOLE: "punch",
    FALLOC_FL_ZERO_RANGE: "zero",
    FALLOC_FL_COLLAPSE_RANGE: "collapse",
    FALLOC_FL_INSERT_RANGE: "insert",
}

# The kernel's punch clips a range reaching past EOF at the end of the page
# holding EOF: the page size of the machine the mount lives on (this one).
PAGE_SIZE = mmap.PAGESIZE


class InvalidArgument(Ext4Error):
    errno = errno.EINVAL


class NotPermitted(Ext4Error):
    """An append-only or immutable inode (the kernel answers EPERM)."""

    errno = errno.EPERM


class NoSuchDevice(Ext4Error):
    """fallocate of a special file (not a regular file or directory)."""

    errno = errno.ENODEV


def check_request(mode: int, offset: int, length: int) -> str:
    """The operation `mode` asks for, or the error vfs_fallocate answers for it."""
    if offset < 0 or length <= 0:
        raise InvalidArgument(f"fallocate offset {offset} length {length}")
    keep = mode & FALLOC_FL_KEEP_SIZE
    operation = _MODES.get(mode & ~FALLOC_FL_KEEP_SIZE)
    if operation is None:
        raise Unsupported("fallocate mode", detail=f"{mode:#x}")
    if operation == "punch" and not keep:
        raise Unsupported("fallocate mode", detail="PUNCH_HOLE without KEEP_SIZE")
    if operation in ("collapse", "insert") and keep:
        raise Unsupported("fallocate mode", detail=f"{operation} with KEEP_SIZE")
    return operation


def fallocate(fs: WriteContext, ino: int, mode: int, offset: int, length: int, *,
              now_ns: int | None = None) -> Inode:
    """Apply fallocate(2) `mode` to bytes [offset, offset + length) of inode `ino`.

    Returns the stored inode (size, i_blocks, times). All or nothing.
    """
    operation = check_request(mode, offset, length)
    inode = fs.inode(ino)
    if inode.flags & FL_IMMUTABLE or (inode.flags & FL_APPEND and operation != "allocate"):
        raise NotPermitted(f"inode {ino} is immutable or append-only")
    if inode.is_dir:
        raise IsADirectory(f"inode {ino} is a directory")
    if not inode.is_reg:
        raise NoSuchDevice(f"fallocate of non-regular inode {ino}")
    max_bytes = _max_bytes(fs)
    if offset + length > max_bytes:
        raise FileTooBig(f"fallocate to byte {offset + length}, past the limit {max_bytes}")
    inode = file_data.check_file_write(fs, ino)
    if operation in ("collapse", "insert"):
        _check_shift(fs, inode, operation, offset, length)
    if inode.has_inline_data:
        # As the kernel does; only an error found later (ENOSPC) leaves the
        # (invisible) conversion behind.
        inode = file_data.convert_inline(fs, inode)
    if not inode.uses_extents and operation != "punch":
        raise Unsupported("fallocate mode", inode_where(ino), "indirect block maps")
    keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
    if operation == "allocate":
        inode = _allocate(fs, inode, offset, length, keep_size=keep_size)
    elif operation == "punch":
        inode = _punch(fs, inode, offset, length)
    elif operation == "zero":
        inode = _zero(fs, inode, offset, length, keep_size=keep_size)
    elif operation == "collapse":
        inode = _collapse(fs, inode, offset, length)
    else:
        inode = _insert(fs, inode, offset, length)
    now = fs.now_ns() if now_ns is None else now_ns
    return fs.store(replace_inode(inode, mtime_ns=now, ctime_ns=now))


# ---- the operations -------------------------------------------------------------------


def _blocks_touched(fs: WriteContext, offset: int, length: int) -> tuple[int, int]:
    """[first, end) of the blocks holding any byte of the range."""
    bs = fs.block_size
    return offset // bs, -(-(offset + length) // bs)


def _allocate(fs: WriteContext, inode: Inode, offset: int, length: int, *,
              keep_size: bool) -> Inode:
    first, end = _blocks_touched(fs, offset, length)
    inode = _preallocate(fs, inode, first, end)
    return _grow(fs, inode, offset + length, keep_size=keep_size)


def _zero(fs: WriteContext, inode: Inode, offset: int, length: int, *,
          keep_size: bool) -> Inode:
    bs = fs.block_size
    first, end = _blocks_touched(fs, offset, length)
    # Whole blocks inside the range: written ones become unwritten.
    inner_first, inner_end = -(-offset // bs), (offset + length) // bs
    inode = _preallocate(fs, inode, first, end, unwrite=(inner_first, inner_end))
    _zero_edges(fs, inode, offset, offset + length)
    return _grow(fs, inode, offset + length, keep_size=keep_size)


def _punch(fs: WriteContext, inode: Inode, offset: int, length: int) -> Inode:
    size = inode.size
    if offset >= size:
        return inode
    end = offset + length
    if end > size:
        end = -(-size // PAGE_SIZE) * PAGE_SIZE
    bs = fs.block_size
    inner_first, inner_end = -(-offset // bs), end // bs
    _zero_edges(fs, inode, offset, end)
    if inner_end <= inner_first:  # no whole block inside
        return inode
    tree = fs.tree_writer(inode)
    freed = tree.punch(inner_first, inner_end - inner_first)
    return fs.store(fs.with_tree(inode, tree, -_free_data(fs, freed)))


def _check_shift(fs: WriteContext, inode: Inode, operation: str, offset: int,
                 length: int) -> None:
    """The argument checks of COLLAPSE_RANGE and INSERT_RANGE, before anything changes."""
    if (offset | length) % fs.block_size:
        raise InvalidArgument(f"{operation} range {offset}+{length} not block aligned")
    if operation == "collapse" and offset + length >= inode.size:
        raise InvalidArgument(f"collapse range {offset}+{length} reaches EOF {inode.size}")
    if operation == "insert":
        if offset >= inode.size:
            raise InvalidArgument(f"insert range at {offset} not before EOF {inode.size}")
        if inode.size + length > _max_bytes(fs):
            raise FileTooBig(f"insert range would make the size {inode.size + length}, "
                             "past the limit")


def _collapse(fs: WriteContext, inode: Inode, offset: int, length: int) -> Inode:
    bs = fs.block_size
    tree = _extent_tree(fs, inode)
    freed = tree.collapse(offset // bs, length // bs)
    inode = fs.store(fs.with_tree(inode, tree, -_free_data(fs, freed)))
    return replace_inode(inode, size=inode.size - length)


def _insert(fs: WriteContext, inode: Inode, offset: int, length: int) -> Inode:
    bs = fs.block_size
    new_size = inode.size + length
    tree = _extent_tree(fs, inode)
    try:
        tree.insert_gap(offset // bs, length // bs)
    except ValueError as err:  # blocks preallocated past EOF would leave the block space
        raise InvalidArgument(str(err)) from None
    inode = fs.store(fs.with_tree(inode, tree))
    file_data.note_large_file(fs, new_size)
    return replace_inode(inode, size=new_size)


# ---- shared steps ------------------------------------------------------------------


def _preallocate(fs: WriteContext, inode: Inode, first: int, end: int, *,
                 unwrite: tuple[int, int] | None = None) -> Inode:
    """Unwritten extents over every hole of blocks [first, end), and (ZERO_RANGE) the
    written blocks of `unwrite` made unwritten; stored, all or nothing."""
    runs = fs.mapper_for(inode).map(first, end - first)
    pieces = file_data.allocate_holes(fs, inode, first, runs)
    convert = unwrite is not None and unwrite[1] > unwrite[0] and any(
        r.pblk is not None and not r.unwritten and r.lblk < unwrite[1] and r.end > unwrite[0]
        for r in runs)
    if not pieces and not convert:
        return inode
    tree = _extent_tree(fs, inode)
    done: list[tuple[int, int, int]] = []
    try:
        for at, pblk, got in pieces:
            tree.insert(at, pblk, got, unwritten=True)
            done.append((at, pblk, got))
        if convert:
            assert unwrite is not None
            tree.mark_unwritten(unwrite[0], unwrite[1] - unwrite[0])
    except BaseException:
        kept = file_data.undo_mapping(fs, tree, done, pieces, [])
        fs.store(fs.with_tree(inode, tree, kept))
        raise
    return fs.store(fs.with_tree(inode, tree, sum(got for _, _, got in pieces)))


def _grow(fs: WriteContext, inode: Inode, end: int, *, keep_size: bool) -> Inode:
    """i_size up to `end` unless KEEP_SIZE; the old last block's bytes past the old
    EOF are zeroed first, as for a truncate up."""
    if keep_size or end <= inode.size:
        return inode
    file_data.zero_tail(fs, inode, inode.size)
    file_data.note_large_file(fs, end)
    return replace_inode(inode, size=end)


def _zero_edges(fs: WriteContext, inode: Inode, start: int, end: int) -> None:
    """Zero the bytes of [start, end) in the blocks it covers only in part."""
    bs = fs.block_size
    head_end = min(end, -(-start // bs) * bs)
    if start % bs:
        _zero_written(fs, inode, start, head_end)
    tail_start = max(head_end, end // bs * bs)
    if end % bs and tail_start < end:
        _zero_written(fs, inode, tail_start, end)


def _zero_written(fs: WriteContext, inode: Inode, start: int, stop: int) -> None:
    """Zero bytes [start, stop) (inside one block) where that block is written data;
    holes and unwritten blocks read as zeros already."""
    if stop <= start:
        return
    bs = fs.block_size
    (run,) = fs.mapper_for(inode).map(start // bs, 1)
    if run.pblk is None or run.unwritten:
        return
    fs.dev.pwrite(run.pblk * bs + start % bs, bytes(stop - start))


def _max_bytes(fs: WriteContext) -> int:
    """The filesystem's s_maxbytes, which vfs_fallocate and the insert-range check
    compare with (the extent-file limit, for every inode: only punch reaches a
    block-map file, and it never goes past EOF)."""
    return limits.extent_max_bytes(fs.block_size, fs.sb.has_ro_compat(F.RO_COMPAT_HUGE_FILE))


def _extent_tree(fs: WriteContext, inode: Inode) -> ExtentTreeWriter:
    tree = fs.tree_writer(inode)
    if not isinstance(tree, ExtentTreeWriter):
        raise Unsupported("fallocate mode", inode_where(inode.ino), "indirect block maps")
    return tree


def _free_data(fs: WriteContext, freed: list[tuple[int, int]]) -> int:
    count = 0
    for pblk, length in freed:
        fs.blocks.free(pblk, length)
        count += length
    return count
