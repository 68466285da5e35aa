"""Changing one directory: add, remove and retarget names; grow; linear and inline dirs.

Every change follows what the kernel's ext4 does, so an image we wrote looks
like one the kernel wrote and e2fsck's deep htree checks pass:

- Linear directories take a new name in the first record with room (first
  fit). When the only block is full and dir_index is on, the directory is
  converted to an htree. Without dir_index, or with more than one linear
  block, a full directory simply grows by one block.
- Indexed directories are edited by dir_htree_writer.HtreeWriter: the
  conversion, inserts into the leaf the hash selects, leaf and index splits,
  new levels, and NoSpace (ENOSPC) when the index is full.
- Removing a name merges its record into the previous record of the block;
  the first record of a block just gets inode 0. Leaves never shrink or merge.

Inline directories (inline_data) are edited through an `InlineDirStore` the
caller provides (see there); when both inline areas are full the directory
is converted to one block and the add continues on the block path.

Callers own everything outside the directory's bytes: allocating and mapping
blocks (`append_block`), the inode's size and flags (`size`, `indexed`,
`is_inline` after each call), link counts and times.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ext4box.ext4.format.dir_block import (
    DIR_TAIL_SIZE,
    EXT4_FT_DIR,
    MAX_NAME_LEN,
    DirEntry,
    DirRecord,
    ParsedBlockCache,
    build_dir_block,
    dir_rec_len,
    pack_dir_record,
    parse_dir_records,
    splice_dir_block_span,
)
from ext4box.ext4.format.errors import (
    Corrupt,
    Exists,
    InvalidName,
    NameTooLong,
    NoSpace,
    NotFound,
    block_where,
)
from ext4box.ext4.read.directory import DirectoryReader
from ext4box.ext4.write.dir_htree_writer import DOT_REC_LEN, HtreeWriter, find_slot, insert_record

INLINE_IBLOCK_SIZE = 60
INLINE_PARENT_SIZE = 4  # an inline directory's i_block starts with the parent's inode number
# Without large_dir a directory stays below 2 GiB (i_size_high is not used for dirs).
MAX_SMALL_DIR_SIZE = 1 << 31
_U32 = struct.Struct("<I")


def validate_name(name: bytes) -> None:
    """1..255 bytes, no '/' and no NUL; NameTooLong (ENAMETOOLONG) above 255."""
    if len(name) > MAX_NAME_LEN:
        raise NameTooLong(f"name of {len(name)} bytes (limit {MAX_NAME_LEN})")
    if not name or b"/" in name or b"\0" in name:
        raise InvalidName(f"invalid directory entry name {name!r}")


def new_dir_block(
    *, ino: int, parent_ino: int, block_size: int, has_filetype: bool, csum_seed: int | None
) -> bytes:
    """Block 0 of a new directory: "." (12 bytes), ".." over the rest, the tail if csum_seed."""
    ftype = EXT4_FT_DIR if has_filetype else 0
    area = block_size - (DIR_TAIL_SIZE if csum_seed is not None else 0)
    records = [
        DirRecord(0, ino, DOT_REC_LEN, b".", ftype),
        DirRecord(DOT_REC_LEN, parent_ino, area - DOT_REC_LEN, b"..", ftype),
    ]
    return build_dir_block(records, block_size=block_size, csum_seed=csum_seed)


def new_inline_dir_body(parent_ino: int) -> bytes:
    """i_block of a new inline directory: the parent, then one empty 56-byte record."""
    area = INLINE_IBLOCK_SIZE - INLINE_PARENT_SIZE
    return _U32.pack(parent_ino) + pack_dir_record(0, area, b"", 0)


class InlineDirStore(Protocol):
    """The caller's side of an inline directory (inline_data feature).

    The body is i_block (60 bytes: the parent's inode number, then 56 bytes of
    records) followed by the value of the in-inode xattr system.data (more
    records, possibly empty). i_size of an inline directory is len(body).
    """

    def read_body(self) -> bytes:
        """i_block + the system.data value."""
        ...

    def write_body(self, body: bytes) -> None:
        """Store i_block = body[:60], system.data = body[60:], and set i_size = len(body).

        The body only grows when `max_body_size` allowed it.
        """
        ...

    def max_body_size(self) -> int:
        """The largest body the inode can hold (60 + the biggest system.data value that fits)."""
        ...

    def convert_to_blocks(self, first_block: bytes) -> None:
        """Turn the inode into a block directory holding `first_block` as logical block 0.

        The caller allocates and maps one block, writes `first_block` there,
        removes system.data, clears EXT4_INLINE_DATA_FL (setting the extents
        root/flag as for any new directory block) and sets i_size = block size.
        """
        ...


@dataclass(frozen=True, slots=True)
class _Found:
    lblk: int  # -1 for the i_block area of an inline directory, -2 for its system.data area
    records: list[DirRecord]
    index: int


def _delete(records: list[DirRecord], at: int) -> list[DirRecord]:
    """Free records[at]: merge into the previous record, or blank it if it is the first."""
    record = records[at]
    if at == 0:
        return [DirRecord(record.offset, 0, record.rec_len, b"", 0), *records[1:]]
    previous = records[at - 1]
    merged = previous._replace(rec_len=previous.rec_len + record.rec_len)
    return [*records[: at - 1], merged, *records[at + 1 :]]


def _pack_area(records: list[DirRecord], block_size: int) -> bytes:
    return b"".join(
        pack_dir_record(r.inode, r.rec_len, r.name, r.file_type, block_size=block_size)
        for r in records
    )


class DirectoryWriter:
    """Mutations of one directory through block callbacks; holds the size and index flag.

    `read_lblk(lblk)` returns the latest bytes of a logical block (None for a
    hole), `write_lblk(lblk, data)` stores a whole block, `append_block()`
    allocates and maps logical block `size // block_size`, grows the inode's
    i_size by one block and returns that block number (NoSpace if it cannot);
    the writer immediately fills it with one empty record, so the directory
    stays well formed whatever fails next. After every call the caller copies
    `size`, `indexed` (EXT4_INDEX_FL) and `is_inline` back into the inode.
    A writer is valid while nobody else changes the directory; build a new
    one otherwise.
    """

    def __init__(
        self,
        *,
        ino: int,
        size: int,
        block_size: int,
        read_lblk: Callable[[int], bytes | None],
        write_lblk: Callable[[int, bytes], None],
        append_block: Callable[[], int],
        indexed: bool,
        has_filetype: bool,
        csum_seed: int | None,
        hash_seed: tuple[int, int, int, int] | None,
        default_hash_version: int,
        unsigned_hash: bool,
        max_ino: int,
        large_dir: bool,
        dir_index_enabled: bool,
        metadata_csum: bool,
        inline: InlineDirStore | None = None,
        parsed: ParsedBlockCache | None = None,
    ) -> None:
        if metadata_csum and csum_seed is None:
            raise ValueError("metadata_csum needs the directory inode's checksum seed")
        self.ino = ino
        self.block_size = block_size
        self._size = size
        self._read_lblk = read_lblk
        self._write_lblk = write_lblk
        self._append_block = append_block
        self.indexed = indexed and inline is None
        self.has_filetype = has_filetype
        # The seed used for dirent tails and dx tails; None when there are no checksums.
        self._tail_seed = csum_seed if metadata_csum else None
        self.hash_seed = hash_seed
        self.default_hash_version = default_hash_version
        self.unsigned_hash = unsigned_hash
        self.max_ino = max_ino
        self.large_dir = large_dir
        self.dir_index_enabled = dir_index_enabled
        self.metadata_csum = metadata_csum
        self._inline = inline
        # Shared block parses (see ParsedBlockCache), when built for these parameters.
        self._parsed = (
            parsed
            if parsed is not None
            and parsed.serves(has_filetype=has_filetype, max_ino=max_ino, block_size=block_size)
            else None
        )
        self._area = block_size - (DIR_TAIL_SIZE if metadata_csum else 0)
        self._htree = HtreeWriter(
            ino=ino,
            block_size=block_size,
            area=self._area,
            tail_seed=self._tail_seed,
            has_filetype=has_filetype,
            hash_seed=hash_seed,
            default_hash_version=default_hash_version,
            unsigned_hash=unsigned_hash,
            large_dir=large_dir,
            metadata_csum=metadata_csum,
            nblocks=lambda: self.nblocks,
            read_lblk=read_lblk,
            read_block=self._read,
            read_records=self._records,
            write_records=self._write_records,
            first_fit=self._first_fit,
            write_lblk=write_lblk,
            append=self._append,
        )

    # ---- state the caller copies into the inode ---------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def is_inline(self) -> bool:
        return self._inline is not None

    @property
    def nblocks(self) -> int:
        if self._size % self.block_size or self._size < 0:
            why = f"size {self._size} is not a whole number of blocks"
            raise Corrupt("directory", block_where(0, self.ino), why)
        return self._size // self.block_size

    # ---- public operations ------------------------------------------------------

    def lookup(self, name: bytes) -> DirEntry | None:
        validate_name(name)
        return self._reader().lookup(name)

    def is_empty(self) -> bool:
        """True when only "." and ".." remain (the rmdir test)."""
        return all(entry.name in (b".", b"..") for entry, _ in self._reader().iterate())

    def add(self, name: bytes, ino: int, file_type: int) -> None:
        """Insert a new name; Exists if it is already there, NoSpace if the index is full."""
        self._check_new(name, ino)
        if self._locate(name) is not None:
            raise Exists(f"{name!r} already exists in directory inode {self.ino}")
        new = DirRecord(0, ino, dir_rec_len(len(name)), name, file_type if self.has_filetype else 0)
        if self._inline is not None and self._add_inline(new):
            return
        if self.indexed:
            self._htree.add(new)
        else:
            self._add_linear(new)

    def remove(self, name: bytes) -> DirEntry:
        """Delete a name and return what it pointed at; NotFound if absent."""
        self._check_plain(name)
        found = self._locate(name)
        if found is None:
            raise NotFound(f"{name!r} not in directory inode {self.ino}")
        entry = found.records[found.index].entry()
        self._store(found.lblk, _delete(found.records, found.index))
        return entry

    def retarget(self, name: bytes, ino: int, file_type: int) -> DirEntry:
        """Point an existing name (or "..") at another inode; returns the old entry."""
        if not 0 < ino <= self.max_ino:
            raise ValueError(f"inode {ino} outside 1..{self.max_ino}")
        ftype = file_type if self.has_filetype else 0
        if name == b"..":
            return self._retarget_dotdot(ino, ftype)
        self._check_plain(name)
        found = self._locate(name)
        if found is None:
            raise NotFound(f"{name!r} not in directory inode {self.ino}")
        old = found.records[found.index]
        records = list(found.records)
        records[found.index] = old._replace(inode=ino, file_type=ftype)
        self._store(found.lblk, records)
        return old.entry()

    # ---- argument checks --------------------------------------------------------

    def _check_plain(self, name: bytes) -> None:
        validate_name(name)
        if name in (b".", b".."):
            raise InvalidName(f"{name!r} cannot be added or removed")

    def _check_new(self, name: bytes, ino: int) -> None:
        self._check_plain(name)
        if not 0 < ino <= self.max_ino:
            raise ValueError(f"inode {ino} outside 1..{self.max_ino}")

    # ---- block access -----------------------------------------------------------

    def _read(self, lblk: int, what: str = "directory block") -> bytes:
        if not 0 <= lblk < self.nblocks:
            raise Corrupt(what, block_where(lblk, self.ino), "beyond the directory's size")
        block = self._read_lblk(lblk)
        if block is None:
            raise Corrupt(what, block_where(lblk, self.ino), "hole in a directory")
        if len(block) != self.block_size:
            raise Corrupt(what, block_where(lblk, self.ino), f"{len(block)}-byte block")
        return block

    def _records(self, lblk: int, block: bytes | None = None) -> list[DirRecord]:
        if block is None:
            block = self._read(lblk)
        if self._parsed is not None:
            parsed = self._parsed.parse(block, ino=self.ino, lblk=lblk, csum_seed=self._tail_seed)
            return list(parsed.records)
        return parse_dir_records(
            block,
            ino=self.ino,
            lblk=lblk,
            has_filetype=self.has_filetype,
            csum_seed=self._tail_seed,
            max_ino=self.max_ino,
            block_size=self.block_size,
        )

    def _write_records(self, lblk: int, records: list[DirRecord]) -> None:
        data = None
        spliced_from = None
        if self._parsed is not None:
            # Most writes change one or two records of a block we wrote before:
            # repack only those (same bytes as a full build, see splice_dir_block).
            old = self._parsed.peek(self.ino, lblk, self._tail_seed)
            if old is not None and old.canonical and old.block == self._read_lblk(lblk):
                spliced = splice_dir_block_span(
                    old, records, block_size=self.block_size, csum_seed=self._tail_seed
                )
                if spliced is not None:
                    data, head, tail = spliced
                    spliced_from = (old, head, tail)
        if data is None:
            data = build_dir_block(records, block_size=self.block_size, csum_seed=self._tail_seed)
        self._write_lblk(lblk, data)
        if self._parsed is not None:
            self._parsed.remember(data, records, ino=self.ino, lblk=lblk,
                                  csum_seed=self._tail_seed, spliced_from=spliced_from)  # fmt: skip

    def _first_fit(self, lblk: int, records: list[DirRecord], need: int) -> int | None:
        """find_slot(records, need), answered from the block's cached room summary
        when `records` are exactly the cached parse of that block."""
        if self._parsed is not None:
            parsed = self._parsed.peek(self.ino, lblk, self._tail_seed)
            # Tuple equality checks identity first: ~200 pointer compares.
            if parsed is not None and parsed.records == tuple(records):
                return parsed.first_fit(need)
        return find_slot(records, need)

    def _store(self, lblk: int, records: list[DirRecord]) -> None:
        """Write records back where _locate found them (a block or an inline area)."""
        if lblk >= 0:
            self._write_records(lblk, records)
        else:
            self._write_inline_area(lblk, records)

    def _append(self) -> int:
        limit = (1 << 48) if self.large_dir else MAX_SMALL_DIR_SIZE
        if self._size + self.block_size > limit:
            raise NoSpace(f"directory inode {self.ino} at its maximum size")
        expected = self.nblocks
        lblk = self._append_block()
        if lblk != expected:
            raise ValueError(f"append_block returned block {lblk}, expected {expected}")
        self._size += self.block_size
        # Valid (empty) at once: if a later step fails, e.g. the second append of
        # an htree conversion hits ENOSPC, the directory is still well formed.
        self._write_records(lblk, [DirRecord(0, 0, self._area, b"", 0)])
        return lblk

    def _reader(self) -> DirectoryReader:
        body = self._inline.read_body() if self._inline is not None else None
        return DirectoryReader(
            ino=self.ino,
            size=len(body) if body is not None else self._size,
            block_size=self.block_size,
            read_lblk=self._read_lblk,
            indexed=self.indexed,
            has_filetype=self.has_filetype,
            csum_seed=self._tail_seed,
            hash_seed=self.hash_seed,
            default_hash_version=self.default_hash_version,
            unsigned_hash=self.unsigned_hash,
            max_ino=self.max_ino,
            inline_body=body,
            large_dir=self.large_dir,
            parsed=self._parsed,
        )

    # ---- finding a name ---------------------------------------------------------

    def _locate(self, name: bytes) -> _Found | None:
        """Where a live record named `name` is. An unusable index raises Corrupt:
        we never write into a directory whose index we cannot trust."""
        if self._inline is not None:
            return self._locate_inline(name)
        if self.indexed:
            lblks: Iterable[int] = self._htree.leaf_blocks(name)
        else:
            lblks = range(self.nblocks)
        for lblk in lblks:
            if self._parsed is not None:
                block = self._read(lblk)
                parsed = self._parsed.parse(
                    block, ino=self.ino, lblk=lblk, csum_seed=self._tail_seed
                )
                at = parsed.find(name)
                if at is not None:
                    return _Found(lblk, list(parsed.records), at)
                continue
            records = self._records(lblk)
            for i, record in enumerate(records):
                if record.inode != 0 and record.name == name:
                    return _Found(lblk, records, i)
        return None

    # ---- linear directories -----------------------------------------------------

    def _add_linear(self, new: DirRecord) -> None:
        nblocks = self.nblocks
        for lblk in range(nblocks):
            records = self._records(lblk)
            at = self._first_fit(lblk, records, new.rec_len)
            if at is not None:
                self._write_records(lblk, insert_record(records, at, new))
                return
            if nblocks == 1 and self.dir_index_enabled:
                self._htree.make_indexed(records, new)
                self.indexed = True
                return
        lblk = self._append()
        fresh = [DirRecord(0, 0, self._area, b"", 0)]
        self._write_records(lblk, insert_record(fresh, 0, new))

    # ---- "." and ".." ---------------------------------------------------------

    def _retarget_dotdot(self, ino: int, ftype: int) -> DirEntry:
        if self._inline is not None:
            body = bytearray(self._inline.read_body())
            old = _U32.unpack_from(body, 0)[0]
            _U32.pack_into(body, 0, ino)
            self._inline.write_body(bytes(body))
            return DirEntry(old, b"..", EXT4_FT_DIR if self.has_filetype else 0)
        if self.indexed:
            old_parent = self._htree.set_parent(ino)
            return DirEntry(old_parent, b"..", EXT4_FT_DIR if self.has_filetype else 0)
        records = self._records(0)
        if len(records) < 2 or records[1].name != b".." or records[1].inode == 0:
            raise Corrupt("directory block", block_where(0, self.ino), "no '..' record")
        old_record = records[1]
        records[1] = old_record._replace(inode=ino, file_type=ftype)
        self._write_records(0, records)
        return old_record.entry()

    # ---- inline directories -----------------------------------------------------

    def _inline_areas(self, body: bytes) -> list[tuple[int, bytes]]:
        """(area id, bytes): -1 the i_block records, -2 the system.data records."""
        if len(body) < INLINE_IBLOCK_SIZE:
            raise Corrupt("inline directory", block_where(0, self.ino), "body under 60 bytes")
        return [(-1, body[INLINE_PARENT_SIZE:INLINE_IBLOCK_SIZE]), (-2, body[INLINE_IBLOCK_SIZE:])]

    def _inline_records(self, area: bytes) -> list[DirRecord]:
        if not area:
            return []
        return parse_dir_records(
            area,
            ino=self.ino,
            lblk=0,
            has_filetype=self.has_filetype,
            csum_seed=None,
            max_ino=self.max_ino,
            block_size=self.block_size,
        )

    def _locate_inline(self, name: bytes) -> _Found | None:
        assert self._inline is not None
        for area_id, area in self._inline_areas(self._inline.read_body()):
            records = self._inline_records(area)
            for i, record in enumerate(records):
                if record.inode != 0 and record.name == name:
                    return _Found(area_id, records, i)
        return None

    def _write_inline_area(self, area_id: int, records: list[DirRecord]) -> None:
        assert self._inline is not None
        body = self._inline.read_body()
        packed = _pack_area(records, self.block_size)
        if area_id == -1:
            body = body[:INLINE_PARENT_SIZE] + packed + body[INLINE_IBLOCK_SIZE:]
        else:
            body = body[:INLINE_IBLOCK_SIZE] + packed
        self._inline.write_body(body)
        self._size = len(body)

    def _add_inline(self, new: DirRecord) -> bool:
        """Insert into i_block, else system.data (grown once to the most the inode
        holds, as the kernel does), else convert to a block; False after converting."""
        store = self._inline
        assert store is not None
        body = store.read_body()
        areas = self._inline_areas(body)
        if not areas[1][1]:
            room = (store.max_body_size() - INLINE_IBLOCK_SIZE) & ~3
            if room >= dir_rec_len(1):
                areas[1] = (-2, pack_dir_record(0, room, b"", 0, block_size=self.block_size))
        for area_id, area in areas:
            records = self._inline_records(area)
            at = find_slot(records, new.rec_len)
            if at is not None:
                if area_id == -2 and len(body) == INLINE_IBLOCK_SIZE:
                    store.write_body(body + area)  # the grown, still empty, system.data
                self._write_inline_area(area_id, insert_record(records, at, new))
                return True
        self._convert_inline(body)
        return False

    def _convert_inline(self, body: bytes) -> None:
        """Inline records become block 0 after "." and ".."; the last record stretches."""
        assert self._inline is not None
        parent = _U32.unpack_from(body, 0)[0]
        ftype = EXT4_FT_DIR if self.has_filetype else 0
        records = [
            DirRecord(0, self.ino, DOT_REC_LEN, b".", ftype),
            DirRecord(DOT_REC_LEN, parent, DOT_REC_LEN, b"..", ftype),
        ]
        offset = 2 * DOT_REC_LEN
        for _, area in self._inline_areas(body):
            for record in self._inline_records(area):
                records.append(record._replace(offset=offset + record.offset))
            offset += len(area)
        records[-1] = records[-1]._replace(rec_len=self._area - records[-1].offset)
        first_block = build_dir_block(records, block_size=self.block_size,
                                      csum_seed=self._tail_seed)
        self._inline.convert_to_blocks(first_block)
        self._inline = None
        self._size = self.block_size
        self.indexed = False
