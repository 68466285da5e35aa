"""How a WRITE is stored under the writeback cache (FUSE_WRITEBACK_CACHE).

The kernel then sends dirty pages at writeback, fsync and close (with
FUSE_WRITE_CACHE), and a few writes straight through (a write that must clear
set-user-ID, O_DIRECT). Two things differ from writes without the cache:

- Times. The kernel owns mtime and ctime of regular files (kernel_times.py):
  it stamps them at each write(2) or mmap store (O_DIRECT and clearing
  writes included) and sends them by SETATTR. A WRITE that reached us after
  that SETATTR, or one for which no SETATTR follows because the kernel's
  coarse clock had not moved, must not stamp our own time on the image. So
  the inode keeps the times it had before the request.
- Granularity (page-cache writebacks only). The kernel tracks dirt per page,
  so on a filesystem whose blocks are smaller than a page a writeback carries
  whole pages: a 4-byte write into a hole comes back as 4 KiB, mostly zeros
  the application never wrote. ext4 allocates only the blocks written to;
  storing the zeros would allocate the rest too (more st_blocks, SEEK_DATA
  finding data where ext4 has a hole), or turn fallocated (unwritten) blocks
  into written ones that ext4 leaves unwritten. Blocks that are all zeros and
  lie over a hole or an unwritten extent are therefore left as they are: they
  read as zeros either way. The price:
  zeros an application did write into a hole of such a filesystem stay a hole,
  where ext4 would allocate them (the same bytes, fewer st_blocks). With
  blocks of a page or more, every block of a dirty page was written to, and
  all of it is stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ext4box.fuse.kernel_times import keep_times
from ext4box.iomap.types import IOMapKind

if TYPE_CHECKING:
    from ext4box.ext4.format.inode import Inode
    from ext4box.ext4.write.writable import WritableFilesystem
    from ext4box.iomap.engine import IOMapEngine

PAGE_SIZE = 4096
# Mappings whose blocks read as zeros without being written.
_READS_AS_ZEROS = (IOMapKind.HOLE, IOMapKind.UNWRITTEN)


def store(engine: IOMapEngine, fs: WritableFilesystem, node: Inode, pos: int,
          data: bytes | memoryview, *, times: tuple[int, int], page_granular: bool) -> int:
    """Store `data` at `pos` of inode `node`; bytes taken.

    `times`: (mtime, ctime) in ns the inode keeps. `page_granular`: a
    page-cache writeback, whose zero blocks over holes stay holes. Fewer
    bytes than given only when the file's size limit cuts the write short,
    as for any write.
    """
    view = memoryview(data).cast("B")
    end = pos + len(view)
    mtime_ns = times[0]
    pieces = _pieces(engine, node, pos, view) if page_granular else [(pos, end)]
    for start, stop in pieces:
        taken = engine.write(fs.inode(node.ino), start, view[start - pos : stop - pos],
                             now_ns=mtime_ns)
        if taken < stop - start:
            end = start + taken  # the size limit: nothing past it is stored
            break
    current = fs.inode(node.ino)
    if current.size < end:
        # Skipped zeros reach the end: the size still covers them.
        engine.zero_tail(current, end)
        current = fs.setattr(node.ino, size=end)
        engine.invalidate(node.ino)
    keep_times(fs, node.ino, times, current)
    return end - pos


def _pieces(engine: IOMapEngine, node: Inode, pos: int,
            view: memoryview) -> list[tuple[int, int]]:
    """[start, stop) byte ranges of the write to store: all but zero blocks over
    holes and unwritten extents."""
    block_size = engine.block_size
    end = pos + len(view)
    if block_size >= PAGE_SIZE or node.has_inline_data or not view:
        return [(pos, end)]
    holes = [(m.offset, m.offset + m.length) for m in engine.begin(node, pos, len(view))
             if m.kind in _READS_AS_ZEROS]  # fmt: skip
    if not holes:
        return [(pos, end)]
    zero_block = bytes(block_size)
    pieces: list[tuple[int, int]] = []
    for hole_start, hole_stop in holes:
        # Whole blocks of the write inside this hole (the write's last block
        # may end early: at the file's new size).
        first = -(-hole_start // block_size) * block_size
        block = first
        while block < hole_stop and block < end:
            stop = min(block + block_size, end, hole_stop)
            if stop - block < block_size and stop != end:
                break  # a block the hole covers only partly: stored
            chunk = view[block - pos : stop - pos]
            if chunk == zero_block[: stop - block]:
                pieces.append((block, stop))  # skipped (collected as gaps below)
            block += block_size
    return _complement(pos, end, pieces)


def _complement(pos: int, end: int, skipped: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges of [pos, end) outside the sorted, disjoint `skipped` ranges."""
    kept: list[tuple[int, int]] = []
    at = pos
    for start, stop in skipped:
        if start > at:
            kept.append((at, start))
        at = max(at, stop)
    if at < end:
        kept.append((at, end))
    return kept
