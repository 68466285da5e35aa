"""Replay the tags of valid fast commits onto a filesystem, as the kernel's
ext4_fc_replay does (fs/ext4/fast_commit.c), with the read-write facade's
primitives (inode table, extent tree writer, directory writer, allocators).

Per tag:
- INODE: the blocks the inode maps now are marked free; the logged inode is
  copied over the slot except i_block (the extent root stays: the ranges
  replay it; an inline body is copied), the inode is marked in use, i_blocks
  is recounted from the tree and the checksum set.
- ADD_RANGE: the extent is mapped into the inode's tree, replacing whatever
  the range mapped (those blocks are marked free) or changing its
  written-ness.
- DEL_RANGE: what the range maps is unmapped and marked free.
- CREAT / LINK / UNLINK: directory entries and link counts.
At the end every block the touched inodes map is marked in use, and inodes
left without a name are freed (the kernel puts them on the orphan list and
frees them when the mount continues).

Bitmaps change at once (BlockAllocator.mark), not at a commit: nothing is
reused in between. A tree or directory block allocated during replay avoids
every range an ADD_RANGE of the replay maps (those still read as free until
the end), as the kernel's replay allocator does.

Deliberate differences from the kernel, where its replay leaves a
filesystem e2fsck repairs: a created directory gets link count 2, its
parent one more link and its group's directory count, and i_blocks counts
the xattr block; a removed directory (UNLINK of a directory) is freed.
"""

from __future__ import annotations

import bisect
import dataclasses
import stat
from collections.abc import Iterable

import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format import features as F
from ext4box.ext4.format.checksum import inode_csum_seed
from ext4box.ext4.format.errors import Corrupt, Exists, Ext4Error, Unsupported, inode_where
from ext4box.ext4.format.extents import EXTENT_MAGIC, LBLK_LIMIT, ROOT_MAX_ENTRIES
from ext4box.ext4.format.inode import FL_EXTENTS, FL_INLINE_DATA, Inode
from ext4box.ext4.format.superblock import Superblock
from ext4box.ext4.journal.cow_device import CopyOnWriteDevice
from ext4box.ext4.journal.fast_commit import (
    TAG_CREAT,
    TAG_LINK,
    AddRange,
    DelRange,
    DentryTag,
    FastCommitTag,
    InodeTag,
)
from ext4box.ext4.read.filesystem import CacheSizes
from ext4box.ext4.write.dir_access import DirHandle, dec_dir_links, inc_dir_links
from ext4box.ext4.write.dir_writer import new_dir_block
from ext4box.ext4.write.extent_writer import ExtentTreeWriter
from ext4box.ext4.write.namespace_ops import file_type
from ext4box.ext4.write.writable import WritableFilesystem

log = structlog.get_logger("ext4box.ext4.journal")

_I_BLOCK_AT = 0x28  # offsetof(struct ext4_inode, i_block)
_GENERATION_AT = 0x64  # offsetof(struct ext4_inode, i_generation): i_block ends here
_EMPTY_ROOT_HEADER = (EXTENT_MAGIC.to_bytes(2, "little") + (0).to_bytes(2, "little")
                      + ROOT_MAX_ENTRIES.to_bytes(2, "little") + bytes(6))
_REPLAY_CACHES = CacheSizes(metadata_blocks=1024, inodes=256, mappers=64, directories=16,
                            dir_blocks=16)


class _ReplayFilesystem(WritableFilesystem):
    """The facade with the replay's block rules: frees take effect at once, and
    allocation skips the ranges the replayed ADD_RANGE tags map."""

    def __init__(self, dev: BlockDevice, sb: Superblock, excluded: list[tuple[int, int]]) -> None:
        super().__init__(dev, sb, _REPLAY_CACHES)
        self._excluded = sorted(excluded)

    def exclude(self, start: int, length: int) -> None:
        """Keep [start, start + length) from being allocated for the rest of the replay."""
        bisect.insort(self._excluded, (start, length))

    def _excluded_end(self, pblk: int) -> int | None:
        for start, length in self._excluded:
            if start <= pblk < start + length:
                return start + length
        return None

    def alloc_meta_block(self, goal: int) -> int:
        taken: list[int] = []
        try:
            while True:  # each pass takes a block, so this ends (NoSpace at worst)
                pblk = self.blocks.alloc_block(goal)
                end = self._excluded_end(pblk)
                if end is None:
                    return pblk
                taken.append(pblk)
                goal = end
        finally:
            for pblk in taken:
                self.blocks.mark(pblk, 1, used=False)

    def free_block(self, pblk: int) -> None:
        self.blocks.mark(pblk, 1, used=False)


def replay_on_copy(base: BlockDevice, sb: Superblock,
                   tags: tuple[FastCommitTag, ...]) -> CopyOnWriteDevice:
    """Replay `tags` onto an in-memory copy of `base`; returns that copy (frozen)."""
    cow = CopyOnWriteDevice(base, sb.block_size)
    excluded = [(t.pblk, t.length) for t in tags if isinstance(t, AddRange) and t.length]
    fs = _ReplayFilesystem(cow, sb, excluded)
    replayer = _Replayer(fs)
    for tag in tags:
        replayer.apply(tag)
    replayer.finish()
    fs.writer.commit(durable=True)
    cow.freeze()
    return cow


class _Replayer:
    def __init__(self, fs: _ReplayFilesystem) -> None:
        self.fs = fs
        self.modified: dict[int, None] = {}  # inodes whose blocks are re-marked at the end
        self.unlinked: dict[int, None] = {}  # inodes that lost a name: freed if none is left
        self.now = fs.now_ns()

    def apply(self, tag: FastCommitTag) -> None:
        if isinstance(tag, InodeTag):
            self._inode(tag)
        elif isinstance(tag, AddRange):
            self._add_range(tag)
        elif isinstance(tag, DelRange):
            self._del_range(tag)
        elif tag.kind == TAG_CREAT:
            self._create(tag)
        elif tag.kind == TAG_LINK:
            self._link(tag)
        else:
            self._unlink(tag)

    # ---- inodes ------------------------------------------------------------

    def _iget(self, ino: int) -> Inode | None:
        """The inode if it is in use (links > 0), as the kernel's iget during replay:
        checksums are not verified (the replay is about to rewrite them)."""
        fs = self.fs
        sb = fs.sb
        if not 1 <= ino <= sb.inodes_count:
            return None
        try:
            inode = Inode.parse(fs.table.read_raw(ino), ino, fs_csum_seed=None,
                                huge_file=fs.table.huge_file, block_size=fs.block_size)
        except Ext4Error:
            return None
        if inode.links_count == 0 or inode.mode == 0:
            return None
        if sb.csum_seed is not None:
            inode = dataclasses.replace(
                inode, csum_seed=inode_csum_seed(sb.csum_seed, ino, inode.generation))
        return inode

    def _extent_mapped(self, inode: Inode) -> bool:
        return inode.uses_extents and not inode.has_inline_data

    def _mark_inode_blocks(self, inode: Inode, *, used: bool) -> None:
        """Mark every data and tree block of an extent-mapped inode. Blocks marked free
        here may be mapped again by the end of the replay: nothing allocates them."""
        if not self._extent_mapped(inode):
            return
        mapper = self.fs.mapper_for(inode)
        runs = [(run.pblk, run.length) for run in mapper.extents() if run.pblk is not None]
        runs += [(block, 1) for block in mapper.tree_blocks()]
        for start, length in runs:
            self.fs.blocks.mark(start, length, used=used)
            if not used:
                self.fs.exclude(start, length)

    def _with_counted_blocks(self, inode: Inode) -> Inode:
        """i_blocks recounted from the tree (ext4_ext_replay_set_iblocks), plus the
        xattr block."""
        if not self._extent_mapped(inode):
            return inode
        mapper = self.fs.mapper_for(inode)
        blocks = sum(run.length for run in mapper.extents()) + len(mapper.tree_blocks())
        if inode.file_acl:
            blocks += self.fs.sb.cluster_size // self.fs.block_size
        return dataclasses.replace(inode, blocks_512=self.fs.sectors(blocks))

    def _inode(self, tag: InodeTag) -> None:
        fs = self.fs
        ino = tag.ino
        if not 1 <= ino <= fs.sb.inodes_count:
            raise Corrupt("fast commit", inode_where(ino), "INODE tag outside the inode table")
        if len(tag.raw) > fs.sb.inode_size:
            raise Corrupt("fast commit", inode_where(ino), f"logged inode of {len(tag.raw)} bytes")
        current = self._iget(ino)
        if current is not None:
            self._mark_inode_blocks(current, used=False)
        self.modified[ino] = None
        mode = int.from_bytes(tag.raw[0:2], "little")
        # Before the copy: a never-zeroed slot is zeroed by marking it in use.
        fs.inodes.mark_used(ino, stat.S_ISDIR(mode))
        raw = bytearray(fs.table.read_raw(ino))
        raw[:_I_BLOCK_AT] = tag.raw[:_I_BLOCK_AT]
        raw[_GENERATION_AT : len(tag.raw)] = tag.raw[_GENERATION_AT:]
        flags = int.from_bytes(raw[0x20:0x24], "little")
        if flags & FL_EXTENTS:
            if int.from_bytes(raw[_I_BLOCK_AT : _I_BLOCK_AT + 2], "little") != EXTENT_MAGIC:
                raw[_I_BLOCK_AT : _I_BLOCK_AT + len(_EMPTY_ROOT_HEADER)] = _EMPTY_ROOT_HEADER
        elif flags & FL_INLINE_DATA:
            raw[_I_BLOCK_AT:_GENERATION_AT] = tag.raw[_I_BLOCK_AT:_GENERATION_AT]
        elif not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
            # A fast symlink or device keeps its body in i_block, which the kernel
            # does not copy: such inodes are not fast-committed (full commit).
            raise Unsupported("fast commit", inode_where(ino),
                              f"INODE tag of a block-mapped inode of mode 0o{mode:o}")
        elif mode:
            raise Unsupported("fast commit", inode_where(ino),
                              "INODE tag of an inode without extents")
        inode = Inode.parse(bytes(raw), ino, fs_csum_seed=None, huge_file=fs.table.huge_file,
                            block_size=fs.block_size)
        if fs.sb.csum_seed is not None:
            inode = dataclasses.replace(
                inode, csum_seed=inode_csum_seed(fs.sb.csum_seed, ino, inode.generation))
        fs.store(self._with_counted_blocks(inode))

    # ---- data ranges -----------------------------------------------------------

    def _tree(self, inode: Inode) -> ExtentTreeWriter:
        tree = self.fs.tree_writer(inode)
        assert isinstance(tree, ExtentTreeWriter)
        return tree

    def _add_range(self, tag: AddRange) -> None:
        fs = self.fs
        inode = self._iget(tag.ino)
        if inode is None or not self._extent_mapped(inode) or tag.length == 0:
            return  # as the kernel: nothing to map into
        where = inode_where(tag.ino)
        if tag.lblk + tag.length > LBLK_LIMIT:
            raise Corrupt("fast commit", where, f"ADD_RANGE {tag.lblk}+{tag.length} past 2^32")
        fs.check_run(tag.pblk, tag.length)
        self.modified[tag.ino] = None
        tree = self._tree(inode)
        for run in fs.mapper_for(inode).map(tag.lblk, tag.length):
            pblk = tag.pblk + (run.lblk - tag.lblk)
            if run.pblk is None:
                tree.insert(run.lblk, pblk, run.length, tag.unwritten)
            elif run.pblk != pblk:
                # Remapped since: the old blocks are free unless a touched inode maps them.
                tree.punch(run.lblk, run.length)
                tree.insert(run.lblk, pblk, run.length, tag.unwritten)
                fs.blocks.mark(run.pblk, run.length, used=False)
                fs.exclude(run.pblk, run.length)  # another touched inode may map them
            elif run.unwritten and not tag.unwritten:
                tree.mark_written(run.lblk, run.length)
            elif tag.unwritten and not run.unwritten:
                tree.punch(run.lblk, run.length)
                tree.insert(run.lblk, pblk, run.length, True)
        fs.store(dataclasses.replace(inode, i_block=tree.i_block))

    def _del_range(self, tag: DelRange) -> None:
        fs = self.fs
        inode = self._iget(tag.ino)
        if inode is None or not self._extent_mapped(inode):
            return
        self.modified[tag.ino] = None
        length = min(tag.length, LBLK_LIMIT - tag.lblk)
        if length <= 0:
            return
        tree = self._tree(inode)
        for run in fs.mapper_for(inode).map(tag.lblk, length):
            if run.pblk is None:
                continue
            fs.blocks.mark(run.pblk, run.length, used=False)
            tree.punch(run.lblk, run.length)
        fs.store(dataclasses.replace(inode, i_block=tree.i_block))

    # ---- names -----------------------------------------------------------------

    def _directory(self, ino: int) -> DirHandle | None:
        inode = self._iget(ino)
        if inode is None or not inode.is_dir:
            return None
        return DirHandle(self.fs, ino)

    def _add_name(self, tag: DentryTag, inode: Inode) -> DirHandle | None:
        """Add the entry; the parent's handle, or None when there is no parent or the
        name is there already (EEXIST: replayed before, or on the device already)."""
        handle = self._directory(tag.parent)
        if handle is None:
            return None
        try:
            handle.writer.add(tag.name, inode.ino, file_type(inode.mode))
        except Exists:
            return None
        return handle

    def _create(self, tag: DentryTag) -> None:
        fs = self.fs
        where = inode_where(tag.ino)
        if not 1 <= tag.ino <= fs.sb.inodes_count:
            raise Corrupt("fast commit", where, "CREAT of an inode outside the table")
        mode = int.from_bytes(fs.table.read_raw(tag.ino)[0:2], "little")
        fs.inodes.mark_used(tag.ino, stat.S_ISDIR(mode))
        inode = self._iget(tag.ino)
        if inode is None:
            raise Corrupt("fast commit", where, "CREAT of an inode that is not in use")
        self.modified[tag.ino] = None
        if inode.is_dir:
            inode = self._init_directory(inode, tag.parent)
        handle = self._add_name(tag, inode)
        if handle is None:
            return
        links = 2 if inode.is_dir else 1
        fs.store(dataclasses.replace(inode, links_count=links, ctime_ns=self.now))
        parent_links = None
        if inode.is_dir:
            parent_links = inc_dir_links(handle.inode.links_count, handle.is_dx)
        handle.finish(self.now, links=parent_links)

    def _init_directory(self, inode: Inode, parent: int) -> Inode:
        """Give a created directory its "." and ".." block (ext4_init_new_dir), unless it
        has a first block already."""
        fs = self.fs
        if inode.has_inline_data:
            raise Unsupported("fast commit", inode_where(inode.ino),
                              "CREAT of an inline-data directory")
        if not self._extent_mapped(inode):
            raise Unsupported("fast commit", inode_where(inode.ino),
                              "CREAT of a directory without extents")
        (run,) = fs.mapper_for(inode).map(0, 1)
        if run.pblk is not None:
            return inode
        tree = self._tree(inode)
        pblk = fs.alloc_meta_block(fs.group_goal(inode.ino))
        tree.insert(0, pblk, 1)
        sb = fs.sb
        fs.writer.write(pblk, new_dir_block(
            ino=inode.ino, parent_ino=parent, block_size=fs.block_size,
            has_filetype=sb.has_incompat(F.INCOMPAT_FILETYPE),
            csum_seed=inode.csum_seed if sb.metadata_csum else None))
        inode = dataclasses.replace(inode, i_block=tree.i_block, size=fs.block_size)
        return fs.store(self._with_counted_blocks(inode))

    def _link(self, tag: DentryTag) -> None:
        inode = self._iget(tag.ino)
        if inode is None:
            return
        handle = self._add_name(tag, inode)
        if handle is None:
            return
        self.fs.store(dataclasses.replace(inode, links_count=inode.links_count + 1,
                                          ctime_ns=self.now))
        handle.finish(self.now)

    def _unlink(self, tag: DentryTag) -> None:
        inode = self._iget(tag.ino)
        handle = self._directory(tag.parent)
        if inode is None or handle is None:
            return
        entry = handle.writer.lookup(tag.name)
        if entry is None:
            return  # ENOENT: gone already
        parent_links = None
        if entry.inode == tag.ino:
            handle.writer.remove(tag.name)
            if inode.is_dir:
                parent_links = dec_dir_links(handle.inode.links_count)
            handle.finish(self.now, links=parent_links)
        # A name pointing at another inode stays, but the link count drops (the kernel's
        # replay does the same).
        links = inode.links_count - 1 if inode.links_count else 0
        if inode.is_dir and entry.inode == tag.ino:
            links = 0
        self.fs.store(dataclasses.replace(inode, links_count=links, ctime_ns=self.now))
        if links == 0:
            self.unlinked[tag.ino] = None

    # ---- the end -----------------------------------------------------------------

    def finish(self) -> None:
        fs = self.fs
        live = [(ino, self._iget(ino)) for ino in self.modified]
        for _ino, inode in live:
            if inode is not None:
                self._mark_inode_blocks(inode, used=True)
        for ino, inode in live:
            if inode is not None and ino not in self.unlinked:
                recounted = self._with_counted_blocks(inode)
                if recounted.blocks_512 != inode.blocks_512:
                    fs.store(recounted)
        self._free_unlinked(self.unlinked)
        log.info("fast_commit_replayed", inodes=len(self.modified), freed=len(self.unlinked))

    def _free_unlinked(self, inos: Iterable[int]) -> None:
        """Inodes without a name: freed as the kernel's orphan cleanup frees them."""
        fs = self.fs
        for ino in inos:
            raw = fs.table.read_raw(ino)
            try:
                inode = Inode.parse(raw, ino, fs_csum_seed=fs.sb.csum_seed,
                                    huge_file=fs.table.huge_file, block_size=fs.block_size)
            except Ext4Error:
                continue
            if inode.links_count:
                continue
            # Their blocks must read as in use before the ordinary free path takes them.
            self._mark_inode_blocks(inode, used=True)
            fs.inodes.mark_used(ino, inode.is_dir)
            fs.open_orphans.add(ino)  # evict() reads it although it has no links
            fs.evict(inode)
