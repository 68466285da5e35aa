"""The read-write facade: one ext4 filesystem the FUSE and iomap layers can change.

`open_filesystem(dev, readonly=False)` (ext4/opening.py) returns a
`WritableFilesystem`. Every read method of `Filesystem` keeps working and
sees uncommitted changes:
metadata blocks are read through the MetadataWriter, inodes through the
InodeTable (which follows the writer's group descriptors), and the inode,
mapper and directory caches are refreshed by every write that changes them.

The operations themselves live in small modules beside this one:
`namespace_ops` (create/mkdir/symlink/link/unlink/rmdir/rename),
`file_data` (write_begin/write_end/write_inline/truncate), `attr_ops`
(setattr, xattrs), `orphans` (the s_last_orphan list) and `mount_state`
(rw mount checks, superblock state). This class holds the write stack and
the few primitives they share (store an inode, edit its block tree, free it);
the modules see it as a `context.WriteContext`, so they need not import it.

Every public mutating method is all-or-nothing: when it raises (NoSpace,
Exists, ...) nothing it changed is left behind. An allocation that fails
while frees are pending (they become reusable only once the metadata that
dropped them is on the device) commits and retries once, as the kernel
retries after forcing a journal commit.

Deviations from / additions to the contract in docs/design.md:
- `rename`: when it replaces a target whose last link goes away, the facade
  asks `fs.is_open(ino)` (a callable the FUSE layer may set; default: never
  open) whether to keep the inode on the orphan list instead of freeing it.
- `write_begin` is all-or-nothing: NoSpace maps nothing (no short mapping);
  an inline-data inode is converted to blocks first. Unwritten extents in
  the range are converted to written and reported with `new=True` and
  `converted=True` (the executor must zero-fill what the request does not
  cover, as for holes). No commit can happen before the data is written, so
  on the device this is the kernel's ioend conversion; if the data write
  fails, `write_abort(ino, ranges, converted)` frees the new blocks and makes
  the converted ones unwritten again.
- `write_inline` also accepts an empty blockless regular file when the
  filesystem has inline_data (it becomes inline, as the kernel's first write
  to a new file does) and returns False without changes when the data does
  not fit such a file or the inode is not inline.
- `rmdir` frees the directory at once (there is no still_open for it).
- `close()` frees unlinked inodes still held open (nobody can use them after).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format import features as F
from ext4box.ext4.format.blockmap import BlockMapMapper
from ext4box.ext4.format.errors import Corrupt, Ext4Error, NoSpace, inode_where
from ext4box.ext4.format.extents import ExtentMapper
from ext4box.ext4.format.group_desc import GroupDesc, group_first_block
from ext4box.ext4.format.inode import Inode, replace_inode
from ext4box.ext4.format.superblock import Superblock
from ext4box.ext4.format.xattr import unread_ea_value
from ext4box.ext4.read.filesystem import CacheSizes, Filesystem, StatFs
from ext4box.ext4.write import (
    attr_ops,
    ea_inode_writer,
    file_data,
    flag_guards,
    fs_label,
    inode_flags,
    mount_state,
    namespace_ops,
    orphans,
    trim,
)
from ext4box.ext4.write import fallocate as fallocate_ops
from ext4box.ext4.write.alloc import BlockAllocator
from ext4box.ext4.write.blockmap_writer import BlockMapWriter
from ext4box.ext4.write.context import TreeWriter
from ext4box.ext4.write.ea_inode_index import EaInodeIndex
from ext4box.ext4.write.extent_writer import ExtentTreeWriter
from ext4box.ext4.write.file_data import WriteRun
from ext4box.ext4.write.inline_writer import empty_extent_root
from ext4box.ext4.write.inode_alloc import InodeAllocator
from ext4box.ext4.write.inode_table import InodeTable
from ext4box.ext4.write.metawriter import MetadataWriter
from ext4box.ext4.write.orphan_chain import OrphanChain
from ext4box.ext4.write.quota import QuotaAccounting, ea_values_held
from ext4box.ext4.write.xattr_writer import (
    BlockAction,
    XattrUpdate,
    apply_block_update,
    xattr_state,
)

log = structlog.get_logger("ext4box.ext4")

P = ParamSpec("P")
R = TypeVar("R")
__all__ = ["TreeWriter", "WritableFilesystem", "WriteRun"]


def _serialised(method: Callable[P, R], *, commit_point: bool) -> Callable[P, R]:
    """Serialise a mutating call and retry it once after a commit when it ran out
    of space while frees were pending (they are reusable only after a commit).
    At a `commit_point` (the call leaves the filesystem consistent), commit when
    the journal asks for it (a quarter of the log is dirty)."""

    @wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        fs = args[0]
        assert isinstance(fs, WritableFilesystem)
        with fs.lock:
            try:
                result = method(*args, **kwargs)
            except NoSpace:
                if not fs.writer.dirty:
                    raise
                fs.writer.commit()
                result = method(*args, **kwargs)
            if commit_point and fs.writer.wants_commit:
                fs.writer.commit()
            return result

    return run


def _mutation(method: Callable[P, R]) -> Callable[P, R]:
    return _serialised(method, commit_point=True)


def _mutation_before_data(method: Callable[P, R]) -> Callable[P, R]:
    """For write_begin: its blocks get their data only after it returns, and a
    commit must not make pointers to them durable before that (ordered mode)."""
    return _serialised(method, commit_point=False)


# i_block of an extent-mapped inode that maps nothing yet (see maps_nothing).
_EMPTY_EXTENT_ROOT = empty_extent_root()


class WritableFilesystem(Filesystem):
    def __init__(self, dev: BlockDevice, sb: Superblock, caches: CacheSizes) -> None:
        self._rw: MetadataWriter | None = None  # read_meta_block runs in the base __init__
        self.quota: QuotaAccounting | None = None
        super().__init__(dev, sb, caches)
        self.readonly = False
        self.writer = MetadataWriter(dev, self.meta, sb, self.groups)
        self._rw = self.writer
        self.lock = self.writer.lock
        self.table = InodeTable(self.writer)
        self.blocks = BlockAllocator(self.writer)
        self.inodes = InodeAllocator(self.writer, self.blocks, self.table)
        self.mount_sb = sb  # the superblock as found at mount (for the clean unmount)
        # Unlinked inodes still open: readable until release_orphan frees them.
        self.open_orphans: set[int] = set()
        # Who precedes each inode on the on-disk orphan list (orphans.py).
        self.orphan_chain = OrphanChain()
        # Set by the FUSE layer: whether an inode has open handles (see rename).
        self.is_open: Callable[[int], bool] = lambda ino: False
        self.has_extents = sb.has_incompat(F.INCOMPAT_EXTENTS)
        self.ea_values = EaInodeIndex()  # EA inodes seen, for sharing values
        self.closed = False
        # Usage per uid/gid/project in the quota files (the quota feature), or None.
        self.quota = QuotaAccounting.open(
            self, self._ea_values_of if sb.has_incompat(F.INCOMPAT_EA_INODE) else None)

    @classmethod
    def open_rw(cls, dev: BlockDevice, sb: Superblock, caches: CacheSizes) -> WritableFilesystem:
        """Check the image may be written, open it and record the mount (mount_state)."""
        mount_state.check_rw_mount(sb, dev)
        fs = cls(dev, sb, caches)
        mount_state.begin_rw_mount(fs)
        return fs

    # ---- read side, through the writer ----------------------------------

    def read_meta_block(self, pblk: int) -> bytes:
        writer = self._rw
        if writer is None:
            return super().read_meta_block(pblk)
        if pblk <= 0 or pblk >= self.sb.blocks_count:
            raise Corrupt("block pointer", f"block {pblk}", "outside the filesystem")
        return writer.read(pblk)

    def inode(self, ino: int) -> Inode:
        cached = self._inodes.get(ino)
        if cached is not None:
            return cached
        if self.quota is not None and ino in self.quota.quota_inodes:
            # Only quota.py writes these (as metadata); a name leading to one is damage,
            # as the kernel's iget says.
            raise Corrupt("inode", inode_where(ino), "a quota inode referenced")
        inode = self.table.read(ino)
        if inode.links_count == 0 and ino not in self.open_orphans:
            raise Corrupt("inode", inode_where(ino), "deleted inode (links_count 0) referenced")
        self._inodes.put(ino, inode)
        return inode

    def _read_ea_inode(self, ea_ino: int, size: int) -> bytes:
        value = super()._read_ea_inode(ea_ino, size)
        ea_inode_writer.note_read(self, ea_ino)
        return value

    def statfs(self) -> StatFs:
        with self.lock:
            return self._statfs(pending_blocks=self.blocks.pending_free_blocks,
                                pending_inodes=self.inodes.pending_free_inodes)

    def _group_descs(self) -> list[GroupDesc]:
        return [self.writer.group_desc(g) for g in range(self.writer.group_count)]

    # ---- primitives the operation modules share -------------------------

    @staticmethod
    def now_ns() -> int:
        return time.time_ns()

    def store(self, inode: Inode) -> Inode:
        """Write an inode (checksummed) and refresh the caches that derive from it;
        with quotas, charge the change to its owners (quota.py)."""
        ino = inode.ino
        if self.quota is not None and self.quota.counted(inode):
            self._charge_quota(inode)
        stored = self.table.write(inode)
        mapper = self._mappers.get(ino)
        if mapper is not None and not _mapping_kept(mapper[1]):
            self._mappers.pop(ino)
        reader = self._dirs.get(ino)
        if reader is not None:
            if _reader_kept(reader[0], stored):
                self._dirs.put(ino, (stored, reader[1]))
            else:
                self._dirs.pop(ino)
        # In-inode xattrs live in the inode; its xattr block (file_acl) is only
        # changed by a write that stores the inode too (shared blocks: refcount only).
        self._xattr_lists.pop(ino)
        if stored.links_count or ino in self.open_orphans:
            self._inodes.put(ino, stored)
        else:
            self._inodes.pop(ino)
        return stored

    def _charge_quota(self, inode: Inode) -> None:
        assert self.quota is not None
        ino = inode.ino
        old: Inode | None = self._inodes.get(ino)
        if old is None:
            try:
                old = self.table.read(ino)
            except Corrupt:
                old = None  # a slot never used or freed long ago: nothing was charged for it
        new_live = inode.links_count > 0 or ino in self.open_orphans
        # An unlinked inode was charged while open (still in open_orphans), and so was
        # one stored with no links again: only an inode in use is (its eviction drops
        # it from open_orphans first). A slot taken by a new inode was not.
        old_live = old is not None and old.mode != 0 and (
            old.links_count > 0 or ino in self.open_orphans or inode.links_count == 0)
        self.quota.inode_stored(old, inode, old_live=old_live, new_live=new_live)

    def _ea_values_of(self, inode: Inode) -> int:
        """Inodes charged to `inode`'s owners for its values in EA inodes (quota.py)."""
        state = xattr_state(
            inode, read_meta=self.writer.read, block_size=self.block_size,
            csum_seed=self.sb.csum_seed, goal=self.group_goal(inode.ino), ea_inode=True,
            cluster_size=self.sb.cluster_size, read_ea_inode=unread_ea_value)
        return ea_values_held((*state.ibody_entries, *state.block_entries))

    def check_quota(self, inode: Inode, *, blocks: int = 0, inodes: int = 0) -> None:
        """Raise QuotaExceeded (EDQUOT) before allocating `blocks` blocks and `inodes`
        inodes charged to `inode`'s owners would pass their limits."""
        if self.quota is not None:
            self.quota.check_inode(inode, blocks=blocks, inodes=inodes)

    def group_goal(self, ino: int) -> int:
        """Where blocks for inode `ino` should go when nothing better is known."""
        group = (ino - 1) // self.sb.inodes_per_group
        return group_first_block(self.sb, min(group, self.writer.group_count - 1))

    def alloc_meta_block(self, goal: int) -> int:
        return self.blocks.alloc_block(goal)

    def free_block(self, pblk: int) -> None:
        """Free one metadata block (tree, directory, xattr: the writers' callback)."""
        self.blocks.free(pblk, 1, metadata=True)

    @staticmethod
    def maps_nothing(inode: Inode) -> bool:
        """Whether i_block is an extent root with no extents (every new file until
        its first write): no block to check or free, and no tree to walk for it."""
        return inode.i_block == _EMPTY_EXTENT_ROOT and inode.uses_extents

    def has_block_tree(self, inode: Inode) -> bool:
        """Whether i_block holds an extent root or block map (not a fast symlink,
        device number, inline body)."""
        if inode.has_inline_data:
            return False
        if inode.is_symlink:
            return not self._is_fast_symlink(inode)
        return inode.is_reg or inode.is_dir or inode.uses_extents

    def check_blocks_freeable(self, inode: Inode) -> None:
        """Raise Corrupt if freeing the tree and data blocks of `inode` would fail
        half-way (a bitmap failing its checks, a block not allocated)."""
        if self.maps_nothing(inode):
            return
        mapper = self.mapper_for(inode)
        for pblk in mapper.tree_blocks():
            self.blocks.check_free(pblk, 1)
        for run in mapper.extents():
            if run.pblk is not None:
                self.blocks.check_free(run.pblk, run.length)

    def tree_writer(self, inode: Inode) -> TreeWriter:
        if inode.uses_extents:
            return ExtentTreeWriter(
                ino=inode.ino, i_block=inode.i_block, block_size=self.block_size,
                csum_seed=inode.csum_seed, read_meta=self.writer.read,
                write_meta=self.writer.write, alloc_block=self.alloc_meta_block,
                free_block=self.free_block, check_run=self.check_run,
                parse=self.extent_nodes.parse)
        return BlockMapWriter(
            ino=inode.ino, i_block=inode.i_block, block_size=self.block_size,
            read_meta=self.writer.read, write_meta=self.writer.write,
            alloc_block=self.alloc_meta_block, free_block=self.free_block,
            check_run=self.check_run)

    def mapper_for(self, inode: Inode) -> ExtentMapper | BlockMapMapper:
        """A fresh (uncached) mapper of `inode` as it is now, for code in the middle of
        changing it; or the cached one when that maps the same depth-0 extent tree
        (it reads nothing outside i_block, so it cannot be stale)."""
        cached = self._mappers.get(inode.ino)
        if (
            inode.uses_extents
            and cached is not None
            and cached[0] == inode.i_block
            and _mapping_kept(cached[1])
        ):
            return cached[1]
        if inode.uses_extents:
            return ExtentMapper(ino=inode.ino, i_block=inode.i_block,
                                read_block=self.read_meta_block, block_size=self.block_size,
                                csum_seed=inode.csum_seed, check_run=self.check_run,
                                parse=self.extent_nodes.parse)
        return BlockMapMapper(ino=inode.ino, i_block=inode.i_block,
                              read_block=self.read_meta_block, block_size=self.block_size,
                              check_run=self.check_run)

    def sectors(self, blocks: int) -> int:
        return blocks * (self.block_size // 512)

    def with_tree(self, inode: Inode, tree: TreeWriter, data_blocks_delta: int = 0) -> Inode:
        """`inode` with the tree writer's new root and i_blocks adjusted for the tree
        blocks it allocated/freed and `data_blocks_delta` data blocks."""
        blocks = inode.blocks_512 + self.sectors(tree.tree_blocks_delta + data_blocks_delta)
        if blocks < 0:
            raise Corrupt("inode", inode_where(inode.ino), "i_blocks would become negative")
        return replace_inode(inode, i_block=tree.i_block, blocks_512=blocks)

    def truncate_blocks(self, inode: Inode, first_lblk: int) -> Inode:
        """Unmap and free every block from `first_lblk` on (data and tree blocks)."""
        if not self.has_block_tree(inode) or self.maps_nothing(inode):
            return inode
        tree = self.tree_writer(inode)
        freed = tree.truncate(first_lblk)
        # A directory's or symlink's blocks are metadata (buffered, maybe logged).
        metadata = inode.is_dir or inode.is_symlink
        count = 0
        for pblk, length in freed:
            self.blocks.free(pblk, length, metadata=metadata)
            count += length
        return self.with_tree(inode, tree, -count)

    def drop_xattr_block(self, inode: Inode) -> Inode:
        """Release what the inode's xattrs hold: its references to EA inodes (freeing
        those nothing else names) and its xattr block (free it, or drop our reference
        to a shared one). The inode itself is about to be freed or discarded."""
        held = 0
        if self.quota is not None and self.quota.ea_values_of is not None:
            held = self.quota.ea_values_of(inode)
        ea_inode_writer.release_all(self, inode)
        if held and self.quota is not None:
            # Each EA inode reference counted one inode to the owner (quota.py).
            self.quota.charge_inodes(inode, -held)
        if not inode.file_acl:
            return inode
        ea_inode = self.sb.has_incompat(F.INCOMPAT_EA_INODE)
        state = xattr_state(
            inode, read_meta=self.writer.read, block_size=self.block_size,
            csum_seed=self.sb.csum_seed, goal=self.group_goal(inode.ino),
            ea_inode=ea_inode, cluster_size=self.sb.cluster_size,
            read_ea_inode=unread_ea_value if ea_inode else None)
        action = BlockAction.FREE if state.block_refcount <= 1 else BlockAction.DETACH
        update = XattrUpdate(changed=True, ibody=None, ibody_entries=state.ibody_entries,
                             block_action=action, block_entries=())
        outcome = apply_block_update(
            update, state, read_meta=self.writer.read, write_meta=self.writer.write,
            alloc_block=self.alloc_meta_block, free_block=self.free_block)
        return replace_inode(inode, file_acl=outcome.file_acl,
                                   blocks_512=max(inode.blocks_512 + outcome.blocks_512_delta, 0))

    def evict(self, inode: Inode) -> None:
        """Free an inode no name holds any more: its blocks, xattr block and number."""
        ino = inode.ino
        inode = self.truncate_blocks(inode, 0)
        inode = self.drop_xattr_block(inode)
        now = self.now_ns()
        self.open_orphans.discard(ino)
        inode = replace_inode(
            inode, links_count=0, size=0, dtime=(now // 1_000_000_000) & 0xFFFFFFFF,
            ctime_ns=now, mtime_ns=now)
        self.store(inode)
        self.inodes.free(ino, inode.is_dir)

    # ---- namespace -------------------------------------------------------

    @_mutation
    def tmpfile(self, parent: int, mode: int, uid: int, gid: int) -> Inode:
        """open(O_TMPFILE): a new regular inode with no name, on the orphan list."""
        return namespace_ops.tmpfile(self, parent, mode, uid, gid)

    @_mutation
    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
               rdev: int = 0) -> Inode:
        return namespace_ops.create(self, parent, name, mode, uid, gid, rdev)

    @_mutation
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return namespace_ops.mkdir(self, parent, name, mode, uid, gid)

    @_mutation
    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        return namespace_ops.symlink(self, parent, name, target, uid, gid)

    @_mutation
    def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        return namespace_ops.link(self, ino, new_parent, new_name)

    @_mutation
    def unlink(self, parent: int, name: bytes, *, still_open: bool) -> Inode:
        return namespace_ops.unlink(self, parent, name, still_open=still_open)

    @_mutation
    def rmdir(self, parent: int, name: bytes) -> None:
        namespace_ops.rmdir(self, parent, name)

    @_mutation
    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0, *, whiteout_owner: tuple[int, int] | None = None) -> None:
        namespace_ops.rename(self, old_parent, old_name, new_parent, new_name, flags,
                             whiteout_owner=whiteout_owner)

    # ---- attributes ------------------------------------------------------

    @_mutation
    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None,
                times_now: bool = False) -> Inode:
        """`times_now`: the times are "now" (utimes(NULL), UTIME_NOW), which an
        append-only inode allows where it refuses explicit times."""
        return attr_ops.setattr(self, ino, mode=mode, uid=uid, gid=gid, size=size,
                                atime_ns=atime_ns, mtime_ns=mtime_ns, ctime_ns=ctime_ns,
                                times_now=times_now)

    @_mutation
    def touch_atime(self, ino: int, atime_ns: int) -> Inode:
        """A read's access-time update: atime alone, no ctime, whatever the
        inode's flags (the VFS's touch_atime; the rule is the caller's)."""
        return self.store(replace_inode(self.inode(ino), atime_ns=atime_ns))

    @_mutation
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> Inode:
        return attr_ops.setxattr(self, ino, name, value, flags)

    @_mutation
    def removexattr(self, ino: int, name: bytes) -> Inode:
        return attr_ops.removexattr(self, ino, name)

    # ---- inode flags, label, trim (the ioctls; rules in their modules) -------

    def get_flags(self, ino: int) -> int:
        """FS_IOC_GETFLAGS (inode_flags.py)."""
        return inode_flags.visible_flags(self.inode(ino))

    def get_fsxattr(self, ino: int) -> inode_flags.FsxAttr:
        """FS_IOC_FSGETXATTR (inode_flags.py)."""
        return inode_flags.get_fsxattr(self, self.inode(ino))

    @_mutation
    def set_flags(self, ino: int, flags: int, uid: int) -> Inode:
        """FS_IOC_SETFLAGS by a caller of `uid` (inode_flags.py)."""
        return inode_flags.set_flags(self, ino, flags, uid)

    @_mutation
    def set_fsxattr(self, ino: int, attr: inode_flags.FsxAttr, uid: int) -> Inode:
        """FS_IOC_FSSETXATTR by a caller of `uid` (inode_flags.py)."""
        return inode_flags.set_fsxattr(self, ino, attr, uid)

    def get_label(self) -> bytes:
        """FS_IOC_GETFSLABEL: the label NUL-padded to 17 bytes (fs_label.py)."""
        with self.lock:
            return fs_label.get_label(self)

    def set_label(self, buffer: bytes, uid: int) -> None:
        """FS_IOC_SETFSLABEL by a caller of `uid`; durable on return (fs_label.py)."""
        fs_label.set_label(self, buffer, uid)

    def trim(self, request: trim.TrimRange, uid: int) -> int:
        """FITRIM by a caller of `uid`: the bytes discarded (trim.py)."""
        return trim.trim(self, request, uid)

    def check_open(self, ino: int, flags: int) -> None:
        """EPERM where an immutable/append-only flag forbids opening `ino` with `flags`
        (or writing through a file whose flags are now `flags`): flag_guards.py."""
        with self.lock:
            flag_guards.check_open(self.inode(ino), flags)

    @_mutation
    def release_orphan(self, ino: int) -> None:
        """Last close of an unlinked inode: take it off the orphan list and free it."""
        orphans.release(self, ino)

    # ---- data ------------------------------------------------------------

    def check_file_write(self, ino: int) -> None:
        """Raise as write_begin would if `ino` may not get file data written
        (a directory, a special file, an encrypted or verity inode)."""
        with self.lock:
            file_data.check_file_write(self, ino)

    def writable_length(self, ino: int, pos: int, length: int) -> int:
        """How many of `length` bytes at `pos` may be written to `ino`: all, or those
        below its size limit (a short write); FileTooBig at or past the limit."""
        with self.lock:
            return file_data.writable_length(self, ino, pos, length)

    @_mutation_before_data
    def write_begin(self, inode: Inode | int, lblk: int, count: int) -> list[WriteRun]:
        ino = inode if isinstance(inode, int) else inode.ino
        return file_data.write_begin(self, ino, lblk, count)

    @_mutation
    def write_abort(self, ino: int, ranges: list[tuple[int, int]],
                    converted: list[tuple[int, int]] | None = None) -> None:
        file_data.write_abort(self, ino, ranges, converted or [])

    @_mutation
    def write_end(self, ino: int, end_pos: int, *, now_ns: int | None = None) -> Inode:
        return file_data.write_end(self, ino, end_pos, now_ns=now_ns)

    @_mutation
    def write_inline(self, ino: int, pos: int, data: bytes) -> bool:
        return file_data.write_inline(self, ino, pos, data)

    @_mutation
    def fallocate(self, ino: int, mode: int, offset: int, length: int, *,
                  now_ns: int | None = None) -> Inode:
        """fallocate(2) `mode` on bytes [offset, offset + length) of a regular file;
        the rules per mode are in ext4/write/fallocate.py. Returns the stored inode."""
        return fallocate_ops.fallocate(self, ino, mode, offset, length, now_ns=now_ns)

    # ---- durability --------------------------------------------------------

    def commit(self, durable: bool = False) -> None:
        with self.lock:
            self.writer.commit(durable=durable)

    def close(self) -> None:
        if self.closed:
            return
        with self.lock:
            for ino in sorted(self.open_orphans):
                try:
                    orphans.release(self, ino)
                except Ext4Error as err:
                    # Still on the on-disk orphan list: e2fsck or the next mount frees it.
                    self.open_orphans.discard(ino)
                    log.error("orphan_not_freed", where=inode_where(ino), why=str(err))
            mount_state.end_rw_mount(self)
            self.closed = True
        super().close()


def _mapping_kept(mapper: ExtentMapper | BlockMapMapper) -> bool:
    """Whether a cached mapper stays right across any inode store. A mapper serves
    only an inode with the i_block it was built from (Filesystem._mapper); an
    extent tree of depth 0 lives entirely in i_block, so for those the mapping
    cannot have changed. Deeper trees and block maps have blocks outside the
    inode that a store's operation may have rewritten."""
    return isinstance(mapper, ExtentMapper) and mapper.depth == 0


def _reader_kept(before: Inode, after: Inode) -> bool:
    """Whether a DirectoryReader built from `before` reads `after` the same way:
    nothing it was built from changed (times, links and owner it does not read).
    Indexed directories are dropped anyway: the reader keeps their dx_root."""
    return (
        after.size == before.size
        and after.flags == before.flags
        and after.i_block == before.i_block
        and after.csum_seed == before.csum_seed
        and after.file_acl == before.file_acl
        and after.links_count > 0
        and not after.is_indexed
        and not after.has_inline_data
    )

