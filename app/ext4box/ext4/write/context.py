"""What may the write operations use of the read-write facade?

`WriteContext` names the write stack and the primitives that the operation
modules (namespace_ops, attr_ops, file_data, dir_access, orphans, quota,
ea_inode_writer, fallocate, trim, fs_label, inode_flags, mount_state) share.
`WritableFilesystem` (writable.py) provides it and calls those modules; they
are written against this protocol, so none of them imports the facade that
calls it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.blockmap import BlockMapMapper
from ext4box.ext4.format.dir_block import ParsedBlockCache
from ext4box.ext4.format.extents import ExtentMapper
from ext4box.ext4.format.inode import Inode
from ext4box.ext4.format.superblock import Superblock
from ext4box.ext4.write.alloc import BlockAllocator
from ext4box.ext4.write.blockmap_writer import BlockMapWriter
from ext4box.ext4.write.ea_inode_index import EaInodeIndex
from ext4box.ext4.write.extent_writer import ExtentTreeWriter
from ext4box.ext4.write.inode_alloc import InodeAllocator
from ext4box.ext4.write.inode_table import InodeTable
from ext4box.ext4.write.metawriter import MetadataWriter
from ext4box.ext4.write.orphan_chain import OrphanChain

# The writer of one inode's block tree: extents, or an ext2/ext3 block map.
TreeWriter = ExtentTreeWriter | BlockMapWriter


class QuotaChecks(Protocol):
    """What the operations ask of the quota accounting (quota.QuotaAccounting)."""

    def check(self, uid: int, gid: int, projid: int, *, space: int = 0,
              inodes: int = 0) -> None: ...

    def check_transfer(self, inode: Inode, *, uid: int | None, gid: int | None) -> None: ...

    def charge_inodes(self, owner: Inode, count: int) -> None: ...


class WriteContext(Protocol):
    """The read-write facade as the operation modules see it."""

    # The filesystem and its write stack.
    dev: BlockDevice
    sb: Superblock
    mount_sb: Superblock  # the superblock as found at mount (for the clean unmount)
    block_size: int
    has_extents: bool
    writer: MetadataWriter
    lock: threading.RLock
    table: InodeTable
    blocks: BlockAllocator
    inodes: InodeAllocator
    dir_blocks: ParsedBlockCache
    quota: QuotaChecks | None
    ea_values: EaInodeIndex
    open_orphans: set[int]
    orphan_chain: OrphanChain
    is_open: Callable[[int], bool]

    # Reading, seeing uncommitted changes.
    def inode(self, ino: int) -> Inode: ...
    def lookup(self, dir_ino: int, name: bytes) -> int: ...
    def getxattr(self, ino: int, name: bytes) -> bytes: ...
    def read_bytes(self, inode: Inode, offset: int, length: int) -> bytes: ...
    def _read_ea_inode(self, ea_ino: int, size: int) -> bytes: ...
    def mapper_for(self, inode: Inode) -> ExtentMapper | BlockMapMapper: ...

    # The primitives the operations share (writable.py says what each does).
    def now_ns(self) -> int: ...
    def store(self, inode: Inode) -> Inode: ...
    def check_quota(self, inode: Inode, *, blocks: int = 0, inodes: int = 0) -> None: ...
    def group_goal(self, ino: int) -> int: ...
    def alloc_meta_block(self, goal: int) -> int: ...
    def free_block(self, pblk: int) -> None: ...
    def has_block_tree(self, inode: Inode) -> bool: ...
    def check_blocks_freeable(self, inode: Inode) -> None: ...
    def tree_writer(self, inode: Inode) -> TreeWriter: ...
    def with_tree(self, inode: Inode, tree: TreeWriter, data_blocks_delta: int = 0) -> Inode: ...
    def truncate_blocks(self, inode: Inode, first_lblk: int) -> Inode: ...
    def drop_xattr_block(self, inode: Inode) -> Inode: ...
    def evict(self, inode: Inode) -> None: ...
