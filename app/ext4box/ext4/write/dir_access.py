"""One directory being changed: a DirectoryWriter wired to the facade's blocks.

`DirHandle` owns the directory inode while an operation edits it: the
writer's `append_block` maps a new block into the inode's tree, an inline
directory's body lives in i_block and the in-inode `system.data` xattr, and
`finish` stores the inode once with the writer's size and index flag, and
the new times and link count. Build a handle per operation; two handles on
the same directory at once would overwrite each other's inode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ext4box.ext4.format import features as F
from ext4box.ext4.format.blockmap import BlockMapMapper
from ext4box.ext4.format.errors import (
    Corrupt,
    NoSpace,
    NotADirectory,
    NotFound,
    Unsupported,
    inode_where,
)
from ext4box.ext4.format.extents import LBLK_LIMIT, ExtentMapper
from ext4box.ext4.format.inline_data import INLINE_IBLOCK_SIZE, SYSTEM_DATA_NAME
from ext4box.ext4.format.inode import FL_EXTENTS, FL_INDEX, FL_INLINE_DATA, Inode, replace_inode
from ext4box.ext4.format.xattr import XattrEntry, build_ibody_xattrs, parse_ibody_xattrs
from ext4box.ext4.write.dir_writer import DirectoryWriter
from ext4box.ext4.write.inline_writer import InlineState, empty_extent_root, max_inline_size

if TYPE_CHECKING:
    from ext4box.ext4.write.context import WriteContext

# The kernel's EXT4_LINK_MAX: beyond it a file cannot get another name, and an
# indexed directory (dir_nlink) stops counting its subdirectories (nlink 1).
LINK_MAX = 65000


class DirHandle:
    def __init__(self, fs: WriteContext, ino: int) -> None:
        inode = fs.inode(ino)
        where = inode_where(ino)
        if not inode.is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")
        if inode.links_count == 0:
            raise NotFound(f"directory inode {ino} was removed")
        if inode.is_encrypted or inode.is_casefold:
            raise Unsupported("encrypted or casefolded directory", where, "writing names")
        sb = fs.sb
        if -(-inode.size // fs.block_size) > sb.blocks_count:
            # As the read side refuses it: a scan of such a size maps block after
            # block for minutes (fuzzer find: a replayed root inode of size ~4 GiB).
            raise Corrupt("directory", where,
                          f"size {inode.size} exceeds the filesystem's {sb.blocks_count} blocks")
        self.fs = fs
        self.inode = inode
        self._mapper: ExtentMapper | BlockMapMapper | None = None
        self.dir_index = sb.has_compat(F.COMPAT_DIR_INDEX)
        self.writer = DirectoryWriter(
            ino=ino,
            size=inode.size,
            block_size=fs.block_size,
            read_lblk=self._read_lblk,
            write_lblk=self._write_lblk,
            append_block=self._append_block,
            indexed=inode.is_indexed and self.dir_index,
            has_filetype=sb.has_incompat(F.INCOMPAT_FILETYPE),
            csum_seed=inode.csum_seed,
            hash_seed=sb.hash_seed,
            default_hash_version=int(sb.def_hash_version),
            unsigned_hash=sb.unsigned_hash,
            max_ino=sb.inodes_count,
            large_dir=sb.has_incompat(F.INCOMPAT_LARGEDIR),
            dir_index_enabled=self.dir_index,
            metadata_csum=sb.metadata_csum,
            inline=self if inode.has_inline_data else None,
            parsed=fs.dir_blocks,
        )

    @property
    def is_dx(self) -> bool:
        """The kernel's is_dx(): dir_index on and the directory indexed."""
        return self.dir_index and self.writer.indexed

    # ---- blocks ------------------------------------------------------------

    def _map(self, lblk: int) -> int | None:
        if self._mapper is None:
            self._mapper = self.fs.mapper_for(self.inode)
        (run,) = self._mapper.map(lblk, 1)
        return None if run.pblk is None or run.unwritten else run.pblk

    def _read_lblk(self, lblk: int) -> bytes | None:
        pblk = self._map(lblk)
        return None if pblk is None else self.fs.writer.read(pblk)

    def _write_lblk(self, lblk: int, data: bytes) -> None:
        pblk = self._map(lblk)
        if pblk is None:
            raise NotFound(f"directory inode {self.inode.ino} has no block {lblk}")
        self.fs.writer.write(pblk, data)

    def _new_block(self, lblk: int, goal: int) -> int:
        """Allocate a block and map it at `lblk` (the tree must have a hole there)."""
        fs = self.fs
        (run,) = fs.mapper_for(self.inode).map(lblk, 1)
        if run.pblk is not None:  # i_size says the directory ends before a mapped block
            raise Corrupt("directory", inode_where(self.inode.ino),
                          f"block {lblk} past i_size {self.inode.size} is already mapped")
        fs.check_quota(self.inode, blocks=1)  # charged to the directory's owners
        pblk = fs.alloc_meta_block(goal)
        tree = fs.tree_writer(self.inode)
        try:
            tree.insert(lblk, pblk, 1)
        except BaseException:
            fs.free_block(pblk)
            raise
        self.inode = fs.with_tree(self.inode, tree, 1)
        self._mapper = None
        return pblk

    def _append_block(self) -> int:
        lblk = self.inode.size // self.fs.block_size
        if lblk >= LBLK_LIMIT:
            raise NoSpace(f"directory inode {self.inode.ino} cannot grow past {LBLK_LIMIT} blocks")
        previous = self._map(lblk - 1) if lblk else None
        goal = previous + 1 if previous is not None else self.fs.group_goal(self.inode.ino)
        self._new_block(lblk, goal)
        self.inode = replace_inode(self.inode, size=self.inode.size + self.fs.block_size)
        return lblk

    # ---- InlineDirStore ------------------------------------------------------

    def _ibody_entries(self) -> list[XattrEntry]:
        return list(parse_ibody_xattrs(self.inode.ibody_xattr_area, ino=self.inode.ino))

    def read_body(self) -> bytes:
        data = b""
        for entry in self._ibody_entries():
            if entry.name == SYSTEM_DATA_NAME:
                data = entry.value
        return self.inode.i_block + data

    def write_body(self, body: bytes) -> None:
        entries = self._ibody_entries()
        value = XattrEntry(SYSTEM_DATA_NAME, bytes(body[INLINE_IBLOCK_SIZE:]))
        for position, entry in enumerate(entries):
            if entry.name == SYSTEM_DATA_NAME:
                entries[position] = value
                break
        else:
            entries.append(value)
        self.inode = _with_ibody(self.inode, entries,
                                 i_block=bytes(body[:INLINE_IBLOCK_SIZE]), size=len(body))

    def max_body_size(self) -> int:
        area = self.inode.ibody_xattr_area
        state = InlineState(ino=self.inode.ino, i_block=self.inode.i_block, size=self.inode.size,
                            ibody_entries=tuple(self._ibody_entries()), ibody_size=len(area))
        return max(max_inline_size(state), INLINE_IBLOCK_SIZE)

    def convert_to_blocks(self, first_block: bytes) -> None:
        fs = self.fs
        entries = [e for e in self._ibody_entries() if e.name != SYSTEM_DATA_NAME]
        flags = self.inode.flags & ~FL_INLINE_DATA
        i_block = bytes(INLINE_IBLOCK_SIZE)
        if fs.has_extents:
            flags |= FL_EXTENTS
            i_block = empty_extent_root()
        self.inode = _with_ibody(self.inode, entries, i_block=i_block, size=0, flags=flags)
        self._mapper = None
        self._new_block(0, fs.group_goal(self.inode.ino))
        self.inode = replace_inode(self.inode, size=fs.block_size)
        fs.writer.write(self._map(0), first_block)  # type: ignore[arg-type]

    # ---- the end of an operation -----------------------------------------------

    def finish(self, now_ns: int, *, links: int | None = None, touch: bool = True) -> Inode:
        """Store the directory inode: size and index flag from the writer, mtime and
        ctime = now (when `touch`), and `links` when given."""
        inode = self.inode
        flags = inode.flags & ~FL_INDEX
        if self.writer.indexed and not self.writer.is_inline:
            flags |= FL_INDEX
        changes: dict[str, int] = {"size": self.writer.size, "flags": flags}
        if touch:
            changes.update(mtime_ns=now_ns, ctime_ns=now_ns)
        if links is not None:
            changes["links_count"] = links
        self.inode = self.fs.store(replace_inode(inode, **changes))
        return self.inode


def _with_ibody(inode: Inode, entries: list[XattrEntry], **changes: object) -> Inode:
    area = inode.ibody_xattr_area
    raw = bytearray(inode.raw)
    raw[len(raw) - len(area):] = build_ibody_xattrs(entries, len(area))
    return replace_inode(inode, raw=bytes(raw), **changes)  # type: ignore[arg-type]


def inc_dir_links(links: int, is_dx: bool) -> int:
    """ext4_inc_count for a directory gaining a subdirectory."""
    links += 1
    if is_dx and (links > LINK_MAX or links == 2):
        return 1
    return links


def dec_dir_links(links: int) -> int:
    """ext4_dec_count for a directory losing a subdirectory (1 stays: uncounted)."""
    return links - 1 if links > 2 else links


def dir_link_max(links: int, is_dx: bool, dir_nlink: bool) -> bool:
    """EXT4_DIR_LINK_MAX: the directory cannot take another subdirectory."""
    return links >= LINK_MAX and not (dir_nlink and is_dx)
