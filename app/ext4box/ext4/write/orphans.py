"""The orphan list: inodes that lost their last name while still open.

The classic on-disk list: the superblock's s_last_orphan names the first
inode and each listed inode's i_dtime names the next (0 ends the list). An
unlinked-but-open inode is put on the list at unlink and taken off when its
last handle closes and it is freed; a crash in between leaves it listed, and
the next read-write mount (ours, the kernel's) or e2fsck frees it.

The kernel uses this list only with a journal, yet its mount-time cleanup
and e2fsck process it on any filesystem, so we keep it on every image. With
the orphan_file feature the kernel prefers that file, but falls back to this
list when the file is full; the list is therefore valid there too (a
non-empty orphan file refuses the rw mount instead, see mount_state).

The list is singly linked and inodes leave it in any order (the order their
last handles close), so each inode's predecessor is kept in memory
(`OrphanChain`, orphan_chain.py): taking one off touches only that neighbour, instead of
walking the list from the superblock every time (10,000 orphans closed at
unmount took minutes that way). The mirror starts empty because the mount
empties the on-disk list (`process_at_mount`) before anything is added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from ext4box.ext4.format.errors import Corrupt, inode_where
from ext4box.ext4.format.inode import Inode, replace_inode
from ext4box.ext4.write import ea_inode_writer
from ext4box.ext4.write.orphan_chain import SUPERBLOCK

if TYPE_CHECKING:
    from ext4box.ext4.write.context import WriteContext

log = structlog.get_logger("ext4box.ext4")


def _head(fs: WriteContext) -> int:
    return int(fs.writer.superblock().fields["last_orphan"])


def add(fs: WriteContext, inode: Inode) -> Inode:
    """Put `inode` (links 0, still open) at the head of the list; returns it to store."""
    fs.open_orphans.add(inode.ino)
    if inode.ino in fs.orphan_chain:
        return inode  # listed already: linking it in again would make the list loop
    head = _head(fs)
    fs.writer.update_superblock(last_orphan=inode.ino)
    fs.orphan_chain.pushed(inode.ino, head)
    return replace_inode(inode, dtime=head)


def remove(fs: WriteContext, inode: Inode) -> Inode:
    """`inode` got a name (linkat of an O_TMPFILE inode, as ext4_orphan_del): take it
    off the list; returns it to store, dtime cleared."""
    fs.open_orphans.discard(inode.ino)
    if inode.ino in fs.orphan_chain:
        _unlist(fs, inode.ino, inode.dtime)
    return replace_inode(inode, dtime=0)


def _unlist(fs: WriteContext, ino: int, next_ino: int) -> None:
    """Take `ino` out of the chain by pointing its predecessor at `next_ino`."""
    before = fs.orphan_chain.removed(ino, next_ino)
    if before == SUPERBLOCK and _head(fs) == ino:
        fs.writer.update_superblock(last_orphan=next_ino)
        return
    if before is not None and before != SUPERBLOCK:
        predecessor = fs.table.read(before)
        if predecessor.dtime == ino:
            fs.store(replace_inode(predecessor, dtime=next_ino))
            return
    # The mirror and the image disagree (it never should): find the link on disk.
    log.warning("orphan_chain_out_of_step", where=inode_where(ino), predecessor=before)
    _unlist_by_walk(fs, ino, next_ino)


def _unlist_by_walk(fs: WriteContext, ino: int, next_ino: int) -> None:
    current = _head(fs)
    if current == ino:
        fs.writer.update_superblock(last_orphan=next_ino)
        return
    seen: set[int] = set()
    while current and current not in seen and len(seen) <= fs.sb.inodes_count:
        seen.add(current)
        listed = fs.table.read(current)
        if listed.dtime == ino:
            fs.store(replace_inode(listed, dtime=next_ino))
            return
        current = listed.dtime
    log.warning("orphan_not_listed", where=inode_where(ino))


def check_evictable(fs: WriteContext, inode: Inode) -> None:
    """Raise Corrupt now, before any name changes, if freeing `inode` would fail half-way
    (a block bitmap failing its checks, a block or the inode not allocated, a bad tree or
    xattr block): the operation is then refused whole instead of leaving a name removed
    and the inode neither linked nor freed."""
    if fs.has_block_tree(inode):
        fs.check_blocks_freeable(inode)
    ea_inode_writer.check_release(fs, inode)  # parses the xattr block too
    if inode.file_acl:
        fs.blocks.check_free(inode.file_acl, 1)
    fs.inodes.check_free(inode.ino)


def release(fs: WriteContext, ino: int) -> None:
    """The last handle of an unlinked inode closed: unlist it and free it (or, when it
    cannot be freed, raise Corrupt with it still listed, for e2fsck or the next mount)."""
    inode = fs.table.read(ino)
    if ino not in fs.open_orphans or inode.links_count:
        fs.open_orphans.discard(ino)
        return
    check_evictable(fs, inode)
    _unlist(fs, ino, inode.dtime)
    fs.evict(replace_inode(inode, dtime=0))


def process_at_mount(fs: WriteContext) -> int:
    """Free (links 0) or truncate to i_size (still linked) every listed inode, as the
    kernel's orphan cleanup does at mount; returns how many were processed.

    A list that stops making sense (a number outside the inode table, an inode
    never used or not allocated, a loop) ends the cleanup there and the list is
    dropped, as the kernel drops it; what it still held is e2fsck's to find.
    A crash without a journal can leave such a list: an evicted inode's dtime
    (the deletion time) written before the superblock that unlinked it."""
    fs.orphan_chain.clear()  # the list is emptied below, whatever it holds
    current = _head(fs)
    seen: set[int] = set()
    while current:
        why = _unusable_orphan(fs, current, seen)
        if why is not None:
            log.warning("orphan_list_dropped", where=inode_where(current), why=why,
                        processed=len(seen))
            break
        seen.add(current)
        inode = fs.table.read(current)
        following = inode.dtime
        inode = replace_inode(inode, dtime=0)
        if inode.links_count == 0:
            fs.open_orphans.add(current)  # let evict's store keep it readable meanwhile
            fs.evict(inode)
        else:
            if inode.is_reg:
                inode = fs.truncate_blocks(inode, -(-inode.size // fs.block_size))
            fs.store(inode)
        current = following
    if current or seen:
        fs.writer.update_superblock(last_orphan=0)
    if seen:
        log.info("orphans_processed", count=len(seen))
    return len(seen)


def _unusable_orphan(fs: WriteContext, ino: int, seen: set[int]) -> str | None:
    if ino in seen:
        return "the list loops"
    if not fs.sb.first_ino <= ino <= fs.sb.inodes_count:
        return "not a usable inode number"
    try:
        inode = fs.table.read(ino)
        if inode.mode == 0:
            return "listed inode was never used"
        # Everything freeing or truncating it touches must pass its checks now
        # (allocated, bitmaps matching their checksums: a crash without a journal
        # can leave a bitmap ahead of its descriptor), so processing never stops
        # half-way through an inode. The kernel too drops the list and leaves
        # such an inode to e2fsck.
        check_evictable(fs, inode)
    except Corrupt as err:
        return f"{err.what} at {err.where}: {err.why}"
    return None
