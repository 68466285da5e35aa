"""The facade the upper layers use: one opened ext4 filesystem, read side.

It ties the leaf parsers together (superblock → groups → inodes → extents /
block maps / directories / xattrs) and owns the small caches between them.
Nothing here knows about FUSE: callers get Inode objects, names as bytes,
BlockRuns, and Ext4Error subclasses.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

from ext4box.blockdev import BlockDevice, DeviceRangeError, MetadataCache
from ext4box.ext4.format import features as F
from ext4box.ext4.format.acl import acl_disk_to_xattr
from ext4box.ext4.format.blockmap import BlockMapMapper
from ext4box.ext4.format.blockrun import BlockRun
from ext4box.ext4.format.dir_block import ParsedBlockCache
from ext4box.ext4.format.errors import (
    Corrupt,
    NoData,
    NotADirectory,
    NotASymlink,
    NotFound,
    Unsupported,
    block_where,
    inode_where,
)
from ext4box.ext4.format.extents import ExtentMapper, ExtentNodeCache
from ext4box.ext4.format.group_desc import GroupDesc, GroupTable, gdt_block_count
from ext4box.ext4.format.inline_data import inline_bytes
from ext4box.ext4.format.inode import (
    FL_EA_INODE,
    GOOD_OLD_INODE_SIZE,
    I_BLOCK_SIZE,
    Inode,
)
from ext4box.ext4.format.superblock import Superblock
from ext4box.ext4.format.xattr import XATTR_MAGIC, XattrEntry, parse_ibody_xattrs, parse_xattr_block
from ext4box.ext4.read.directory import DirectoryReader

log = structlog.get_logger("ext4box.ext4")

ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
INLINE_DATA_XATTR = b"system.data"
MAX_SYMLINK = 4096
_IBODY_XATTR_MAGIC = XATTR_MAGIC.to_bytes(4, "little")  # starts a non-empty in-inode area
# Larger xattr sets (EA inode values reach 64 KiB) are parsed per call, not kept.
_XATTR_CACHE_MAX_BYTES = 4096
_DIR_HOLE_WINDOW = 1 << 16  # blocks mapped at once to find the end of a directory hole

K = TypeVar("K")
V = TypeVar("V")


class _Lru(Generic[K, V]):
    """A small thread-safe LRU map; the bound keeps hostile images from growing it."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)


@dataclass(frozen=True, slots=True)
class DirItem:
    name: bytes
    ino: int
    file_type: int
    cookie: int  # resume point after this item


@dataclass(frozen=True, slots=True)
class StatFs:
    block_size: int
    blocks: int
    blocks_free: int
    blocks_avail: int
    files: int
    files_free: int
    namelen: int = 255


@dataclass(frozen=True, slots=True)
class CacheSizes:
    metadata_blocks: int = 8192
    inodes: int = 16384
    mappers: int = 1024
    directories: int = 1024
    # Parsed directory blocks (records + a name index: ~48 KiB of Python objects
    # for a 4 KiB block of 200 names, so ~12 MiB at most), counted in 4 KiB
    # blocks whatever the block size (a 64 KiB-block image keeps 16).
    dir_blocks: int = 256
    # Parsed extent-tree blocks shared by all inodes (a full 4 KiB leaf is ~340
    # extents, ~60 KiB of objects: ~15 MiB at most).
    extent_nodes: int = 256


class Filesystem:
    def __init__(self, dev: BlockDevice, sb: Superblock, caches: CacheSizes) -> None:
        self.dev = dev
        self.sb = sb
        self.block_size = sb.block_size
        self.readonly = True
        self.meta = MetadataCache(dev, sb.block_size, caches.metadata_blocks)
        self.groups = GroupTable(sb, self.read_meta_block)
        self._inodes: _Lru[int, Inode] = _Lru(caches.inodes)
        # Each with the i_block (mappers) or Inode (readers) it was built from: a
        # cached one serves only an inode that still has it (see _mapper), and a
        # read-write store keeps the ones its change cannot affect (writable.store).
        self._mappers: _Lru[int, tuple[bytes, ExtentMapper | BlockMapMapper]] = _Lru(
            caches.mappers
        )
        self._dirs: _Lru[int, tuple[Inode, DirectoryReader]] = _Lru(caches.directories)
        self.extent_nodes = ExtentNodeCache(caches.extent_nodes)
        self.dir_blocks = ParsedBlockCache(
            max(1, caches.dir_blocks * 4096 // sb.block_size),
            has_filetype=sb.has_incompat(F.INCOMPAT_FILETYPE),
            max_ino=sb.inodes_count,
            block_size=sb.block_size,
        )
        # Parsed xattrs per inode, with the Inode they were parsed from: an entry
        # is used only while that very Inode object is the one asked about, so a
        # store of a changed inode (rw) makes it stale even before it is popped.
        # Bounded in count and, per entry, in value bytes (_XATTR_CACHE_MAX_BYTES).
        self._xattr_lists: _Lru[int, tuple[Inode, tuple[XattrEntry, ...]]] = _Lru(
            max(1, caches.inodes // 4)
        )
        self._huge_file = sb.has_ro_compat(F.RO_COMPAT_HUGE_FILE)
        # Blocks no file may map: the boot block, superblock and primary GDT.
        self._reserved_end = (
            sb.first_data_block + 1 + gdt_block_count(sb) + int(sb.reserved_gdt_blocks)
        )

    def close(self) -> None:
        self.meta.clear()

    # ---- blocks --------------------------------------------------------

    def read_meta_block(self, pblk: int) -> bytes:
        if pblk <= 0 or pblk >= self.sb.blocks_count:
            raise Corrupt("block pointer", block_where(pblk), "outside the filesystem")
        try:
            return self.meta.read(pblk)
        except DeviceRangeError as err:
            raise Corrupt("block pointer", block_where(pblk), "past the end of the device") from err

    def check_run(self, pblk: int, length: int) -> None:
        """Refuse data runs outside the filesystem or over its fixed metadata."""
        if length <= 0 or pblk < self._reserved_end or pblk + length > self.sb.blocks_count:
            raise Corrupt(
                "block mapping",
                block_where(pblk),
                f"run of {length} blocks not inside the data area "
                f"[{self._reserved_end}, {self.sb.blocks_count})",
            )

    # ---- inodes --------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        cached = self._inodes.get(ino)
        if cached is not None:
            return cached
        sb = self.sb
        if ino < 1 or ino > sb.inodes_count:
            raise Corrupt("inode number", inode_where(ino), f"outside 1..{sb.inodes_count}")
        group, index = divmod(ino - 1, sb.inodes_per_group)
        desc = self.groups[group]
        offset = index * sb.inode_size
        block = self.read_meta_block(desc.inode_table + offset // sb.block_size)
        start = offset % sb.block_size
        raw = block[start : start + sb.inode_size]
        inode = Inode.parse(
            raw,
            ino,
            fs_csum_seed=sb.csum_seed,
            huge_file=self._huge_file,
            block_size=sb.block_size,
        )
        if inode.links_count == 0:
            # As the kernel's iget: a name (or pointer) leading to an inode no
            # name holds is a dangling reference to a deleted inode.
            raise Corrupt("inode", inode_where(ino), "deleted inode (links_count 0) referenced")
        self._inodes.put(ino, inode)
        return inode

    def _check_contents_readable(self, inode: Inode) -> None:
        if inode.is_encrypted:
            raise Unsupported(
                "encrypted inode", inode_where(inode.ino), "encryption keys are not supported"
            )
        if inode.is_verity and inode.is_reg:
            raise Unsupported(
                "verity inode", inode_where(inode.ino), "fs-verity contents cannot be verified"
            )

    # ---- file data -----------------------------------------------------

    def _mapper(self, inode: Inode) -> ExtentMapper | BlockMapMapper:
        cached = self._mappers.get(inode.ino)
        if (
            cached is not None
            and cached[0] == inode.i_block
            and isinstance(cached[1], ExtentMapper) == inode.uses_extents
        ):
            return cached[1]
        if inode.uses_extents:
            mapper = ExtentMapper(
                ino=inode.ino,
                i_block=inode.i_block,
                read_block=self.read_meta_block,
                block_size=self.block_size,
                csum_seed=inode.csum_seed,
                check_run=self.check_run,
                parse=self.extent_nodes.parse,
            )
        else:
            mapper = BlockMapMapper(
                ino=inode.ino,
                i_block=inode.i_block,
                read_block=self.read_meta_block,
                block_size=self.block_size,
                check_run=self.check_run,
            )
        self._mappers.put(inode.ino, (inode.i_block, mapper))
        return mapper

    def map_blocks(self, inode: Inode, lblk: int, count: int) -> list[BlockRun]:
        """Where logical blocks [lblk, lblk+count) of a file live on the device."""
        self._check_contents_readable(inode)
        if inode.has_inline_data:
            raise Corrupt("inode", inode_where(inode.ino), "inline-data inode has no block map")
        return self._mapper(inode).map(lblk, count)

    def read_bytes(self, inode: Inode, offset: int, length: int) -> bytes:
        """Read a byte range of a small file body (symlinks, directories, EA inodes)."""
        if inode.has_inline_data:
            return self.inline_data(inode)[offset : offset + length]
        bs = self.block_size
        first = offset // bs
        last = (offset + length + bs - 1) // bs
        parts = []
        for run in self.map_blocks(inode, first, last - first):
            if run.pblk is None or run.unwritten:
                parts.append(bytes(run.length * bs))
            else:
                parts.append(self.dev.pread(run.pblk * bs, run.length * bs))
        data = b"".join(parts)
        skip = offset - first * bs
        return data[skip : skip + length]

    def inline_data(self, inode: Inode) -> bytes:
        self._check_contents_readable(inode)
        if not inode.has_inline_data:
            raise Corrupt("inode", inode_where(inode.ino), "not an inline-data inode")
        system_data = self._xattr_value(inode, INLINE_DATA_XATTR)
        return inline_bytes(inode.i_block, system_data, inode.size, inode.ino)

    # ---- directories ---------------------------------------------------

    def _directory(self, ino: int) -> DirectoryReader:
        inode = self.inode(ino)
        cached = self._dirs.get(ino)
        if cached is not None and cached[0] is inode:
            return cached[1]
        if not inode.is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")
        if inode.is_encrypted:
            raise Unsupported("encrypted directory", inode_where(ino))
        if inode.is_casefold:
            raise Unsupported("casefolded directory", inode_where(ino), "case-insensitive lookups")
        sb = self.sb
        inline_body = None
        if inode.has_inline_data:
            inline_body = inode.i_block + (self._xattr_value(inode, INLINE_DATA_XATTR) or b"")

        nblocks = -(-inode.size // self.block_size)
        if nblocks > sb.blocks_count:
            # More blocks than the filesystem has: only holes or blocks mapped
            # twice could fill it, and scanning it would take unbounded time.
            raise Corrupt("directory", inode_where(ino),
                          f"size {inode.size} exceeds the filesystem's {sb.blocks_count} blocks")

        def read_lblk(lblk: int) -> bytes | None:
            (run,) = self.map_blocks(inode, lblk, 1)
            if run.pblk is None or run.unwritten:
                return None
            return self.read_meta_block(run.pblk)

        def hole_end(lblk: int) -> int:
            # Map a bounded window: a hole longer than it costs one call per window.
            window = min(_DIR_HOLE_WINDOW, max(1, nblocks - lblk))
            return self.map_blocks(inode, lblk, window)[0].end

        reader = DirectoryReader(
            ino=ino,
            size=inode.size,
            block_size=self.block_size,
            read_lblk=read_lblk,
            indexed=inode.is_indexed and sb.has_compat(F.COMPAT_DIR_INDEX),
            has_filetype=sb.has_incompat(F.INCOMPAT_FILETYPE),
            csum_seed=inode.csum_seed,
            hash_seed=sb.hash_seed,
            default_hash_version=int(sb.def_hash_version),
            unsigned_hash=sb.unsigned_hash,
            max_ino=sb.inodes_count,
            inline_body=inline_body,
            large_dir=sb.has_incompat(F.INCOMPAT_LARGEDIR),
            hole_end=None if inline_body is not None else hole_end,
            parsed=self.dir_blocks,
        )
        self._dirs.put(ino, (inode, reader))
        return reader

    def lookup(self, dir_ino: int, name: bytes) -> int:
        entry = self._directory(dir_ino).lookup(name)
        if entry is None:
            raise NotFound(f"{name!r} not in directory {dir_ino}")
        return entry.inode

    def find(self, dir_ino: int, name: bytes) -> int | None:
        """`lookup` answering a missing name with None: the kernel asks for a
        name before every create, and an exception costs more than the search."""
        entry = self._directory(dir_ino).lookup(name)
        return None if entry is None else entry.inode

    def readdir(self, dir_ino: int, cookie: int = 0) -> Iterator[DirItem]:
        for entry, next_cookie in self._directory(dir_ino).iterate(cookie):
            yield DirItem(entry.name, entry.inode, entry.file_type, next_cookie)

    # ---- symlinks ------------------------------------------------------

    def readlink(self, ino: int) -> bytes:
        inode = self.inode(ino)
        where = inode_where(ino)
        if not inode.is_symlink:
            raise NotASymlink(f"inode {ino} is not a symlink")
        if inode.is_encrypted:
            raise Unsupported("encrypted symlink", where)
        size = inode.size
        if size == 0 or size > MAX_SYMLINK or size > self.block_size:
            raise Corrupt("symlink", where, f"target length {size} invalid")
        if inode.has_inline_data:
            target = self.inline_data(inode)
        elif self._is_fast_symlink(inode):
            if size >= I_BLOCK_SIZE:
                raise Corrupt("symlink", where, f"fast symlink of length {size} exceeds i_block")
            target = inode.i_block[:size]
        else:
            target = self.read_bytes(inode, 0, size)
        if b"\0" in target:
            raise Corrupt("symlink", where, "target contains a NUL byte")
        return target

    def _is_fast_symlink(self, inode: Inode) -> bool:
        # A fast symlink owns no blocks beyond a possible xattr block.
        xattr_sectors = self.sb.cluster_size // 512 if inode.file_acl else 0
        return inode.blocks_512 - xattr_sectors == 0

    # ---- extended attributes -------------------------------------------

    def _xattrs(self, inode: Inode) -> tuple[XattrEntry, ...]:
        if not inode.file_acl:
            start = GOOD_OLD_INODE_SIZE + inode.extra_isize
            if inode.raw[start : start + 4] != _IBODY_XATTR_MAGIC:
                # Nothing to parse (most files): cheaper than a cache round trip.
                return ()
        cached = self._xattr_lists.get(inode.ino)
        if cached is not None and cached[0] is inode:
            return cached[1]
        entries = self._parse_xattrs(inode)
        if sum(len(e.value) for e in entries) <= _XATTR_CACHE_MAX_BYTES:
            self._xattr_lists.put(inode.ino, (inode, entries))
        return entries

    def _parse_xattrs(self, inode: Inode) -> tuple[XattrEntry, ...]:
        entries = list(
            parse_ibody_xattrs(
                inode.ibody_xattr_area, ino=inode.ino, read_ea_inode=self._read_ea_inode
            )
        )
        if inode.file_acl:
            block = self.read_meta_block(inode.file_acl)
            parsed = parse_xattr_block(
                block,
                blkno=inode.file_acl,
                ino=inode.ino,
                csum_seed=self.sb.csum_seed,
                read_ea_inode=self._read_ea_inode,
            )
            entries.extend(parsed.entries)
        return tuple(entries)

    def _read_ea_inode(self, ea_ino: int, size: int) -> bytes:
        ea = self.inode(ea_ino)
        if not ea.flags & FL_EA_INODE:
            raise Corrupt("xattr value inode", inode_where(ea_ino), "EA_INODE flag not set")
        if not ea.is_reg or ea.has_inline_data:
            # The value lives in the EA inode's blocks. An inline EA inode would
            # keep its body in an xattr that may point at another EA inode, and
            # two of them pointing at each other recurse without end (fuzzer find).
            raise Corrupt("xattr value inode", inode_where(ea_ino),
                          "EA inode is not a block-mapped regular file")
        if ea.size != size:
            raise Corrupt(
                "xattr value inode", inode_where(ea_ino), f"size {ea.size} != entry size {size}"
            )
        return self.read_bytes(ea, 0, size)

    def _xattr_value(self, inode: Inode, name: bytes) -> bytes | None:
        for entry in self._xattrs(inode):
            if entry.name == name:
                return entry.value
        return None

    def listxattr(self, ino: int) -> list[bytes]:
        return [e.name for e in self._xattrs(self.inode(ino)) if _listed(e.name)]

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = self.find_xattr(ino, name)
        if value is None:
            raise NoData(name.decode(errors="replace"))
        return value

    def find_xattr(self, ino: int, name: bytes) -> bytes | None:
        """`getxattr` answering a missing attribute with None: `ls -l` asks every
        file for security.selinux and its ACL, and most have neither."""
        if not _listed(name):
            return None
        inode = self.inode(ino)
        value = self._xattr_value(inode, name)
        if value is not None and name in ACL_XATTRS:
            return acl_disk_to_xattr(value, where=inode_where(ino))
        return value

    # ---- whole filesystem ----------------------------------------------

    def statfs(self) -> StatFs:
        return self._statfs()

    def _statfs(self, *, pending_blocks: int = 0, pending_inodes: int = 0) -> StatFs:
        """`pending_*`: freed objects a read-write mount releases at its next commit;
        the kernel counts them free at once (only their reuse waits for the commit)."""
        sb = self.sb
        # Like the kernel, count free space from the group descriptors (the
        # superblock totals are only updated lazily) and keep back the
        # clusters ext4 reserves for delayed allocation.
        cluster_ratio = sb.cluster_size // sb.block_size
        good = self._group_descs()
        free = sum(d.free_blocks_count for d in good) * cluster_ratio + pending_blocks
        free_inodes = sum(d.free_inodes_count for d in good) + pending_inodes
        reserved = sb.r_blocks_count + self._delalloc_reserve_blocks()
        return StatFs(
            block_size=sb.block_size,
            blocks=sb.blocks_count - self._overhead_blocks(),
            blocks_free=free,
            blocks_avail=max(0, free - reserved),
            files=sb.inodes_count,
            files_free=free_inodes,
        )

    def _group_descs(self) -> list[GroupDesc]:
        """The usable group descriptors (a read-write mount has its own, current, copies)."""
        return [d for d in self.groups.descs if d.group not in self.groups.bad]

    def _delalloc_reserve_blocks(self) -> int:
        sb = self.sb
        if not sb.has_incompat(F.INCOMPAT_EXTENTS):
            return 0
        cluster_ratio = sb.cluster_size // sb.block_size
        return min(sb.blocks_count // cluster_ratio // 50, 4096) * cluster_ratio

    def _overhead_blocks(self) -> int:
        sb = self.sb
        overhead = int(sb.overhead_clusters) * (sb.cluster_size // sb.block_size)
        if overhead:
            return overhead
        # As the kernel counts it: superblock and GDT copies, bitmaps, inode tables.
        itable = -(-sb.inodes_per_group * sb.inode_size // sb.block_size)
        gdt = gdt_block_count(sb) + int(sb.reserved_gdt_blocks)
        backups = sum(1 for g in range(sb.group_count) if sb.group_has_super(g))
        return sb.first_data_block + backups * (1 + gdt) + sb.group_count * (2 + itable)


def _listed(name: bytes) -> bool:
    """Whether an xattr is visible to users; like the kernel, `system.*` other
    than the ACLs (e.g. the inline-data body `system.data`) stays internal."""
    return not name.startswith(b"system.") or name in ACL_XATTRS
