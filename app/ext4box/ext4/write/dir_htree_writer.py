"""The htree side of changing a directory: build, probe, split and grow its index.

Used by DirectoryWriter (dir_writer.py), which owns the directory's size, its
block access and the linear and inline paths; this module follows the kernel:

- A full one-block directory becomes an htree (make_indexed_dir): block 0
  becomes the dx_root (keeping "." and ".."), its other records move to a new
  block 1, and that block is split by hash into blocks 1 and 2.
- A new name goes to the leaf the hash selects (dx_probe). A full leaf is
  split: entries sorted by hash, the upper part (about half the bytes) moves
  to a new block, and the parent gets an index entry for it (with the
  "continued" bit when equal hashes straddle the split). A full index node is
  split in two when its parent has room; when every level up to the root is
  full, the root's entries move into a new node and the tree gains a level.
  Beyond 2 index levels (3 with large_dir) the kernel returns ENOSPC, and so
  do we (errors.NoSpace).

The record edits both paths share (first fit, insert, pack) live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from ext4box.ext4.format.dir_block import DIR_RECORD, EXT4_FT_DIR, DirRecord, dir_rec_len
from ext4box.ext4.format.dir_hash import dx_hash
from ext4box.ext4.format.errors import Corrupt, NoSpace, block_where
from ext4box.ext4.format.htree import (
    DX_ROOT_INFO_LENGTH,
    HTREE_LEVELS_COMPAT,
    HTREE_LEVELS_LARGE_DIR,
    DxEntry,
    DxNode,
    DxRoot,
    HtreeIndex,
    build_dx_node,
    build_dx_root,
    child_index,
    dx_node_limit,
    dx_root_limit,
    parse_dx_node,
    parse_dx_root,
)

DOT_REC_LEN = dir_rec_len(1)  # 12
# When the kernel turns a leaf into the dx_root it wipes only up to the old
# dirent tail, so the dx_tail's reserved word keeps that tail's rec_len (12)
# and file_type (0xDE) bytes. We write the same value so our roots match.
CONVERTED_ROOT_TAIL_RESERVED = 0xDE00000C


@dataclass(slots=True)
class _Frame:
    """One index block on the path from the root to a leaf, as being edited."""

    lblk: int  # 0 for the dx_root
    limit: int
    entries: list[DxEntry]
    at: int  # the entry followed towards the leaf
    tail_reserved: int


@dataclass(frozen=True, slots=True)
class _Path:
    root: DxRoot
    parent_ino: int  # ".." of the dx_root, kept when the root is rewritten
    frames: list[_Frame]
    leaf: int


# ---- record edits shared with dir_writer's linear and inline paths -------------


def _room(record: DirRecord) -> int:
    """Bytes a new record could take out of this one (all of it if free)."""
    if record.inode == 0:
        return record.rec_len
    return record.rec_len - dir_rec_len(len(record.name))


def find_slot(records: list[DirRecord], need: int) -> int | None:
    """First record with room for `need` bytes: the kernel's first fit."""
    # _room inlined: this scans every record of a block on each insert.
    for i, (_, inode, rec_len, name, _) in enumerate(records):
        if (rec_len if inode == 0 else rec_len - ((len(name) + 11) & ~3)) >= need:
            return i
    return None


def insert_record(records: list[DirRecord], at: int, new: DirRecord) -> list[DirRecord]:
    """Put `new` into records[at]: reuse it if free, else split off its slack."""
    record = records[at]
    if record.inode == 0:
        placed = [new._replace(offset=record.offset, rec_len=record.rec_len)]
    else:
        used = dir_rec_len(len(record.name))
        placed = [
            record._replace(rec_len=used),
            new._replace(offset=record.offset + used, rec_len=record.rec_len - used),
        ]
    return [*records[:at], *placed, *records[at + 1 :]]


def packed_records(live: list[DirRecord], area: int) -> list[DirRecord]:
    """Live records laid end to end at their minimal length; the last one spans the rest."""
    out: list[DirRecord] = []
    offset = 0
    for record in live:
        length = dir_rec_len(len(record.name))
        out.append(record._replace(offset=offset, rec_len=length))
        offset += length
    if offset > area:
        raise ValueError(f"{offset} bytes of records do not fit a {area}-byte area")
    if not out:
        return [DirRecord(0, 0, area, b"", 0)]
    out[-1] = out[-1]._replace(rec_len=area - out[-1].offset)
    return out


class HtreeWriter:
    """Index edits of one indexed directory, through its DirectoryWriter's block access.

    `nblocks()` is the directory's current size in blocks; `read_block(lblk,
    what)` returns a checked block (Corrupt names `what`); `read_records`,
    `write_records` and `write_lblk` read and store whole blocks; `first_fit(lblk,
    records, need)` answers find_slot for a leaf's records; `append()`
    adds one empty directory block and returns its number (NoSpace if it
    cannot). `read_lblk` is the raw callback, for the read-side HtreeIndex.
    """

    def __init__(
        self,
        *,
        ino: int,
        block_size: int,
        area: int,
        tail_seed: int | None,
        has_filetype: bool,
        hash_seed: tuple[int, int, int, int] | None,
        default_hash_version: int,
        unsigned_hash: bool,
        large_dir: bool,
        metadata_csum: bool,
        nblocks: Callable[[], int],
        read_lblk: Callable[[int], bytes | None],
        read_block: Callable[[int, str], bytes],
        read_records: Callable[[int], list[DirRecord]],
        write_records: Callable[[int, list[DirRecord]], None],
        write_lblk: Callable[[int, bytes], None],
        append: Callable[[], int],
        first_fit: Callable[[int, list[DirRecord], int], int | None] | None = None,
    ) -> None:
        self.ino = ino
        self.block_size = block_size
        self._area = area
        # The seed used for dirent tails and dx tails; None when there are no checksums.
        self._tail_seed = tail_seed
        self.has_filetype = has_filetype
        self.hash_seed = hash_seed
        self.default_hash_version = default_hash_version
        self.unsigned_hash = unsigned_hash
        self.large_dir = large_dir
        self.metadata_csum = metadata_csum
        self._nblocks = nblocks
        self._read_lblk = read_lblk
        self._read = read_block
        self._records = read_records
        self._write_records = write_records
        self._write_lblk = write_lblk
        self._append = append
        # find_slot for the records of a leaf, possibly from a cached summary.
        self._first_fit = first_fit or (lambda _lblk, records, need: find_slot(records, need))

    @property
    def nblocks(self) -> int:
        return self._nblocks()

    # ---- public operations ------------------------------------------------------

    def leaf_blocks(self, name: bytes) -> Iterable[int]:
        """The leaves that may hold `name`, by the read side's index walk."""
        index = HtreeIndex(
            ino=self.ino,
            block_size=self.block_size,
            nblocks=self.nblocks,
            read_lblk=self._read_lblk,
            csum_seed=self._tail_seed,
            hash_seed=self.hash_seed,
            unsigned_hash=self.unsigned_hash,
            large_dir=self.large_dir,
        )
        return index.leaf_blocks(name)

    def make_indexed(self, block0: list[DirRecord], new: DirRecord) -> None:
        """Turn a full one-block directory into an htree, then add `new` (make_indexed_dir)."""
        where = block_where(0, self.ino)
        if len(block0) < 3 or block0[0].name != b"." or block0[1].name != b"..":
            raise Corrupt("directory block", where, "block 0 does not start with '.' and '..'")
        if block0[0].inode != self.ino:
            raise Corrupt("directory block", where, f"'.' points at inode {block0[0].inode}")
        # Everything after ".." moves, keeping its layout; the last record stretches.
        start = block0[2].offset
        moved = [r._replace(offset=r.offset - start) for r in block0[2:]]
        moved[-1] = moved[-1]._replace(rec_len=self._area - moved[-1].offset)
        leaf = self._append()
        root = DxRoot(
            hash_version=self.default_hash_version,
            info_length=DX_ROOT_INFO_LENGTH,
            indirect_levels=0,
            unused_flags=0,
            limit=dx_root_limit(self.block_size, self.metadata_csum),
            entries=(DxEntry(0, leaf),),
            tail_reserved=CONVERTED_ROOT_TAIL_RESERVED if self.metadata_csum else 0,
        )
        frame = _Frame(0, root.limit, [DxEntry(0, leaf)], 0, root.tail_reserved)
        path = _Path(root, block0[1].inode, [frame], leaf)
        # The kernel always splits the moved block at once, with the new name's hash.
        self._split_leaf(path, moved, new)

    def add(self, new: DirRecord) -> None:
        """Insert `new` into the leaf its hash selects, splitting or growing the index."""
        max_levels = HTREE_LEVELS_LARGE_DIR if self.large_dir else HTREE_LEVELS_COMPAT
        # Each pass either inserts or grows the index by one split; the index has
        # at most max_levels levels, so a handful of passes always suffices.
        for _ in range(2 * max_levels + 2):
            path = self._probe(new.name)
            records = self._records(path.leaf)
            at = self._first_fit(path.leaf, records, new.rec_len)
            if at is not None:
                self._write_records(path.leaf, insert_record(records, at, new))
                return
            bottom = path.frames[-1]
            if len(bottom.entries) < bottom.limit:
                self._split_leaf(path, records, new)
                return
            self._grow_index(path, max_levels)
        raise Corrupt("dx index", block_where(0, self.ino), "index keeps growing on insert")

    def set_parent(self, ino: int) -> int:
        """Point the dx_root's ".." at `ino`; returns the inode it pointed at."""
        path = self._probe(None)
        root = path.frames[0]
        self._write_frame(replace(path, parent_ino=ino), root)
        return path.parent_ino

    # ---- index walk and edits -----------------------------------------------------

    def _hash(self, root: DxRoot, name: bytes) -> int:
        return dx_hash(name, root.hash_version, self.hash_seed, self.unsigned_hash)[0]

    def _probe(self, name: bytes | None) -> _Path:
        """The index path from the root to the leaf covering `name`'s hash (dx_probe);
        with None, the path to the first leaf."""
        block0 = self._read(0, "dx_root")
        root = parse_dx_root(
            block0,
            ino=self.ino,
            block_size=self.block_size,
            csum_seed=self._tail_seed,
            large_dir=self.large_dir,
        )
        parent_ino = DIR_RECORD.unpack_from(block0, DOT_REC_LEN)[0]
        hash_ = 0 if name is None else self._hash(root, name)
        entries = list(root.entries)
        frames = [_Frame(0, root.limit, entries, child_index(entries, hash_), root.tail_reserved)]
        for _ in range(root.indirect_levels):
            child = frames[-1].entries[frames[-1].at].block
            self._check_child(child, frames, "dx_node")
            node = parse_dx_node(
                self._read(child, "dx_node"),
                ino=self.ino,
                lblk=child,
                block_size=self.block_size,
                csum_seed=self._tail_seed,
            )
            entries = list(node.entries)
            frames.append(_Frame(child, node.limit, entries, child_index(entries, hash_),
                                 node.tail_reserved))
        leaf = frames[-1].entries[frames[-1].at].block
        self._check_child(leaf, frames, "dx leaf pointer")
        return _Path(root, parent_ino, frames, leaf)

    def _check_child(self, lblk: int, frames: list[_Frame], what: str) -> None:
        if lblk == 0 or lblk >= self.nblocks or any(f.lblk == lblk for f in frames):
            why = f"index points at block {lblk}"
            raise Corrupt(what, block_where(frames[-1].lblk, self.ino), why)

    def _write_frame(self, path: _Path, frame: _Frame, levels: int | None = None) -> None:
        if frame.lblk == 0:
            root = replace(
                path.root,
                indirect_levels=path.root.indirect_levels if levels is None else levels,
                limit=frame.limit,
                entries=tuple(frame.entries),
                tail_reserved=frame.tail_reserved,
            )
            data = build_dx_root(
                root,
                ino=self.ino,
                parent_ino=path.parent_ino,
                block_size=self.block_size,
                csum_seed=self._tail_seed,
                dot_file_type=EXT4_FT_DIR if self.has_filetype else 0,
            )
        else:
            node = DxNode(frame.limit, tuple(frame.entries), frame.tail_reserved)
            data = build_dx_node(node, block_size=self.block_size, csum_seed=self._tail_seed)
        self._write_lblk(frame.lblk, data)

    def _split_leaf(self, path: _Path, records: list[DirRecord], new: DirRecord) -> None:
        """Move the upper hashes of a full leaf to a new block, then insert `new` (do_split)."""
        bs = self.block_size
        live = [r for r in records if r.inode != 0 and r.name]
        mapped = sorted(((self._hash(path.root, r.name), r) for r in live), key=lambda m: m[0])
        count = len(mapped)
        if count < 2:
            raise Corrupt("directory leaf", block_where(path.leaf, self.ino),
                          f"full leaf with {count} entries cannot be split")
        # Take entries from the top until half the block would be passed; when even
        # that leaves too much behind, split by count instead (as the kernel does).
        moved_bytes = 0
        move = 0
        i = count - 1
        while i >= 0:
            size = mapped[i][1].rec_len
            if moved_bytes + size // 2 > bs // 2:
                break
            moved_bytes += size
            move += 1
            i -= 1
        split = count - move if i > 0 else count // 2
        split_hash = mapped[split][0]
        continued = 1 if split_hash == mapped[split - 1][0] else 0
        moving = [r for _, r in mapped[split:]]
        moving_offsets = {r.offset for r in moving}
        staying = [r for r in live if r.offset not in moving_offsets]
        low = packed_records(staying, self._area)
        high = packed_records(moving, self._area)
        new_lblk = self._append()
        new_hash = self._hash(path.root, new.name)
        target = high if new_hash >= split_hash else low
        at = find_slot(target, new.rec_len)
        if at is None:
            raise NoSpace(f"split leaf of directory inode {self.ino} has no room")
        if target is high:
            high = insert_record(high, at, new)
        else:
            low = insert_record(low, at, new)
        # New block first, then the shrunk leaf, then the index entry pointing at it.
        self._write_records(new_lblk, high)
        self._write_records(path.leaf, low)
        bottom = path.frames[-1]
        bottom.entries.insert(bottom.at + 1, DxEntry(split_hash + continued, new_lblk))
        self._write_frame(path, bottom)

    def _grow_index(self, path: _Path, max_levels: int) -> None:
        """Make room in a full bottom index node: split it or add a level."""
        frames = path.frames
        levels = len(frames)
        depth = levels - 1
        add_level = True
        while depth > 0:
            if len(frames[depth - 1].entries) < frames[depth - 1].limit:
                add_level = False
                break
            depth -= 1
        if add_level and levels >= max_levels:
            hint = "" if self.large_dir else " (large_dir is off)"
            raise NoSpace(f"htree of directory inode {self.ino} is full{hint}")
        new_lblk = self._append()
        node_limit = dx_node_limit(self.block_size, self.metadata_csum)
        frame = frames[depth]
        if add_level:
            # The root's entries move down into a new node; the root points at it.
            node = _Frame(new_lblk, node_limit, list(frame.entries), 0, 0)
            self._write_frame(path, node)
            frame.entries = [DxEntry(0, new_lblk)]
            self._write_frame(path, frame, levels=path.root.indirect_levels + 1)
            return
        half = len(frame.entries) // 2
        split_hash = frame.entries[half].hash
        upper = _Frame(new_lblk, node_limit, frame.entries[half:], 0, 0)
        frame.entries = frame.entries[:half]
        self._write_frame(path, upper)
        self._write_frame(path, frame)
        parent = frames[depth - 1]
        parent.entries.insert(parent.at + 1, DxEntry(split_hash, new_lblk))
        self._write_frame(path, parent)
