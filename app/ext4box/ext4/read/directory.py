"""Looking up and listing one directory: linear, hash-indexed (htree) or inline.

Listing always walks the directory in byte order, block by block; cookies are
byte positions ("resume here"), so a listing can be continued from any
cookie it handed out. In an indexed directory block 0 (dx_root) contributes
only "." and "..", whose records frame it, and interior dx_node blocks
contribute nothing: their single empty record spans the block.

Lookups in an indexed directory go through the index; if the index itself is
unusable (bad framing, limits, checksum, pointers) the lookup logs that and
scans linearly, as the kernel does for a damaged index. Damaged leaves are
reported, never skipped.

Inline directories keep the parent's inode number in the first 4 bytes of
i_block and records in the remaining 56 bytes and in the system.data value;
"." and ".." are implied. Cookies there follow the kernel's layout: "." at
0, ".." at 12, i_block records from 24, system.data records from 80.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from ext4box.ext4.format.dir_block import DirEntry, DirRecord, ParsedBlockCache, parse_dir_records
from ext4box.ext4.format.errors import Corrupt, block_where, inode_where
from ext4box.ext4.format.htree import HtreeIndex, is_dx_node_block
from ext4box.log import get_logger

_log = get_logger(__name__)

MAX_NAME_LEN = 255
INLINE_IBLOCK_SIZE = 60
INLINE_PARENT_SIZE = 4  # i_block starts with the parent's inode number
# Positions of the synthesised "." and ".." and of the two record areas in an
# inline directory's cookie space (the kernel's readdir layout).
INLINE_DOT_POS = 0
INLINE_DOTDOT_POS = 12
INLINE_IBLOCK_POS = 24
INLINE_XATTR_POS = INLINE_IBLOCK_POS + INLINE_IBLOCK_SIZE - INLINE_PARENT_SIZE  # 80
EXT4_FT_DIR = 2
# Without large_dir the kernel keeps directories below 2 GiB (32-bit i_size).
MAX_SMALL_DIR_SIZE = 1 << 32


class DirectoryReader:
    """Read access to one directory's entries. Holds no parsed state that can go stale
    except the inputs it was built with and the parsed dx_root; build a new one after
    the directory changes."""

    def __init__(
        self,
        *,
        ino: int,
        size: int,
        block_size: int,
        read_lblk: Callable[[int], bytes | None],
        indexed: bool,
        has_filetype: bool,
        csum_seed: int | None,
        hash_seed: tuple[int, int, int, int] | None,
        default_hash_version: int,
        unsigned_hash: bool,
        max_ino: int,
        inline_body: bytes | None = None,
        large_dir: bool = False,
        hole_end: Callable[[int], int] | None = None,
        parsed: ParsedBlockCache | None = None,
    ) -> None:
        self.ino = ino
        self.size = size
        self.block_size = block_size
        self._read_lblk = read_lblk
        self.indexed = indexed and inline_body is None
        self.has_filetype = has_filetype
        self.csum_seed = csum_seed
        self.hash_seed = hash_seed
        # Used only when an index is created (write side); lookups use the dx_root's version.
        self.default_hash_version = default_hash_version
        self.unsigned_hash = unsigned_hash
        self.max_ino = max_ino
        self.inline_body = inline_body
        self.large_dir = large_dir
        # Given a hole at a logical block, the first block after it: lets a scan
        # jump a hole of millions of blocks (a crafted i_size) in one step.
        self._hole_end = hole_end
        # The parsed dx_root, kept while this reader lives (a reader is dropped when
        # its directory changes). dx_nodes and leaves are still read per lookup.
        self._index: HtreeIndex | None = None
        # Shared parses of whole blocks; used only when it was built for the same
        # filesystem parameters (filetype, inode count, block size) as this reader.
        self._parsed = (
            parsed
            if parsed is not None
            and parsed.serves(has_filetype=has_filetype, max_ino=max_ino, block_size=block_size)
            else None
        )

    # ---- shape -----------------------------------------------------------

    @property
    def nblocks(self) -> int:
        if self.size < 0 or (self.size >= MAX_SMALL_DIR_SIZE and not self.large_dir):
            raise Corrupt("directory", inode_where(self.ino), f"size {self.size} out of range")
        return -(-self.size // self.block_size)

    def _read_block(self, lblk: int) -> bytes | None:
        block = self._read_lblk(lblk)
        if block is not None and len(block) != self.block_size:
            raise Corrupt(
                "directory block",
                block_where(lblk, self.ino),
                f"read {len(block)} bytes, expected {self.block_size}",
            )
        return block

    def _block_records(self, lblk: int, block: bytes) -> Sequence[DirRecord]:
        """Records of one block of this directory, skipping index-only blocks."""
        if self.indexed:
            if lblk == 0 and _frames_dx_root(block, self.block_size):
                # The dx_root's own checksum guards this block; linear readers only
                # need its "." and ".." records, which tile it structurally.
                return self._parse(lblk, block, csum_seed=None)[:2]
            if lblk != 0 and is_dx_node_block(block, self.block_size):
                return []
        return self._parse(lblk, block, csum_seed=self.csum_seed)

    def _parse(self, lblk: int, area: bytes, *, csum_seed: int | None) -> Sequence[DirRecord]:
        if self._parsed is not None and len(area) == self.block_size:
            return self._parsed.parse(area, ino=self.ino, lblk=lblk, csum_seed=csum_seed).records
        return parse_dir_records(
            area,
            ino=self.ino,
            lblk=lblk,
            has_filetype=self.has_filetype,
            csum_seed=csum_seed,
            max_ino=self.max_ino,
            block_size=self.block_size,
        )

    def _find(self, lblk: int, block: bytes, name: bytes) -> DirEntry | None:
        """The live entry `name` in a (leaf or linear) block parsed with its checksum."""
        if self._parsed is not None:
            parsed = self._parsed.parse(block, ino=self.ino, lblk=lblk, csum_seed=self.csum_seed)
            at = parsed.find(name)
            return None if at is None else parsed.records[at].entry()
        for rec in self._parse(lblk, block, csum_seed=self.csum_seed):
            if rec.inode != 0 and rec.name == name:
                return rec.entry()
        return None

    # ---- lookup ----------------------------------------------------------

    def lookup(self, name: bytes) -> DirEntry | None:
        if not 0 < len(name) <= MAX_NAME_LEN or b"/" in name or b"\0" in name:
            return None
        if self.inline_body is not None:
            for entry, _ in self._iterate_inline(0):
                if entry.name == name:
                    return entry
            return None
        if name in (b".", b".."):
            # Both live only in block 0, in every directory layout.
            return self._search_blocks(name, range(min(1, self.nblocks)))
        if self.indexed:
            found, entry = self._lookup_indexed(name)
            if found:
                return entry
        return self._search_blocks(name, range(self.nblocks))

    def _search_blocks(self, name: bytes, lblks: range) -> DirEntry | None:
        for lblk, block in self._blocks(lblks.start, lblks.stop):
            if not self.indexed:
                entry = self._find(lblk, block, name)
                if entry is not None:
                    return entry
                continue
            # A linear scan of an indexed directory: skip what only the index uses.
            for rec in self._block_records(lblk, block):
                if rec.inode != 0 and rec.name == name:
                    return rec.entry()
        return None

    def _blocks(self, lblk: int, stop: int) -> Iterator[tuple[int, bytes]]:
        """(lblk, block) for the mapped blocks in [lblk, stop); the kernel skips holes
        in linear directories, and so do we, a whole hole at a time."""
        while lblk < stop:
            block = self._read_block(lblk)
            if block is not None:
                yield lblk, block
                lblk += 1
            elif self._hole_end is None:
                lblk += 1
            else:
                lblk = max(lblk + 1, self._hole_end(lblk))

    def _lookup_indexed(self, name: bytes) -> tuple[bool, DirEntry | None]:
        """(True, result) if the index answered; (False, None) if it is unusable."""
        try:
            index = self._index
            if index is None:
                index = HtreeIndex(
                    ino=self.ino,
                    block_size=self.block_size,
                    nblocks=self.nblocks,
                    read_lblk=self._read_block,
                    csum_seed=self.csum_seed,
                    hash_seed=self.hash_seed,
                    unsigned_hash=self.unsigned_hash,
                    large_dir=self.large_dir,
                )
                # Only a root that parsed is kept: a damaged one is re-read (and
                # its fallback logged) by every lookup, as before.
                self._index = index
            leaves = index.leaf_blocks(name)
        except Corrupt as err:
            self._log_fallback(err)
            return False, None
        # The leaf walk is lazy: index errors can surface between leaves.
        for _ in range(self.nblocks + 1):
            try:
                lblk = next(leaves, None)
                block = None if lblk is None else self._read_block(lblk)
                if lblk is not None and block is None:
                    where = block_where(lblk, self.ino)
                    raise Corrupt("dx leaf pointer", where, "points at a hole")
            except Corrupt as err:
                self._log_fallback(err)
                return False, None
            if lblk is None or block is None:
                return True, None
            entry = self._find(lblk, block, name)
            if entry is not None:
                return True, entry
        raise Corrupt("dx index", inode_where(self.ino), "leaf walk did not end")

    def _log_fallback(self, err: Corrupt) -> None:
        _log.warning(
            "htree index unusable, scanning linearly",
            what=err.what,
            where=err.where,
            why=err.why,
            inode=self.ino,
        )

    # ---- iteration -------------------------------------------------------

    def iterate(self, cookie: int = 0) -> Iterator[tuple[DirEntry, int]]:
        """(entry, cookie to resume after it) in on-disk order, "." and ".." included."""
        if cookie < 0:
            return
        if self.inline_body is not None:
            yield from self._iterate_inline(cookie)
            return
        bs = self.block_size
        for lblk, block in self._blocks(cookie // bs, self.nblocks):
            base = lblk * bs
            skip_before = cookie - base  # records starting before the cookie were returned
            for rec in self._block_records(lblk, block):
                if rec.inode != 0 and rec.offset >= skip_before:
                    yield rec.entry(), base + rec.offset + rec.rec_len

    def _iterate_inline(self, cookie: int) -> Iterator[tuple[DirEntry, int]]:
        body = self.inline_body
        assert body is not None
        where = inode_where(self.ino)
        if len(body) < INLINE_IBLOCK_SIZE:
            raise Corrupt("inline directory", where, f"body of {len(body)} bytes is too short")
        parent = int.from_bytes(body[:INLINE_PARENT_SIZE], "little")
        if not 0 < parent <= self.max_ino:
            raise Corrupt("inline directory", where, f"parent inode {parent} out of range")
        dot_type = EXT4_FT_DIR if self.has_filetype else 0
        if cookie <= INLINE_DOT_POS:
            yield DirEntry(self.ino, b".", dot_type), INLINE_DOTDOT_POS
        if cookie <= INLINE_DOTDOT_POS:
            yield DirEntry(parent, b"..", dot_type), INLINE_IBLOCK_POS
        areas = (
            (INLINE_IBLOCK_POS, body[INLINE_PARENT_SIZE:INLINE_IBLOCK_SIZE]),
            (INLINE_XATTR_POS, body[INLINE_IBLOCK_SIZE:]),
        )
        for area_pos, area in areas:
            # lblk 0 in errors: inline directories have no blocks.
            for rec in self._parse(0, area, csum_seed=None):
                pos = area_pos + rec.offset
                if rec.inode != 0 and pos >= cookie:
                    yield rec.entry(), pos + rec.rec_len


def _frames_dx_root(block: bytes, block_size: int) -> bool:
    """Does block 0 begin with a 12-byte "." record and a ".." spanning the rest?"""
    dot_rec_len = int.from_bytes(block[4:6], "little")
    dotdot_rec_len = int.from_bytes(block[16:18], "little")
    return dot_rec_len == 12 and dotdot_rec_len == block_size - 12
