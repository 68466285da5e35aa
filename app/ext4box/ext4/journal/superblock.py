"""The journal superblock (jbd2 v1 and v2): geometry, features, checksum seed.

All jbd2 fields are big-endian. The superblock lives in block 0 of the journal;
its log area is [s_first, j_last) where j_last excludes the fast-commit area.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ext4box.ext4.format.checksum import crc32c_raw
from ext4box.ext4.format.errors import Corrupt, Unsupported

JBD2_MAGIC = 0xC03B3998
BLOCK_DESCRIPTOR = 1
BLOCK_COMMIT = 2
BLOCK_SUPERBLOCK_V1 = 3
BLOCK_SUPERBLOCK_V2 = 4
BLOCK_REVOKE = 5

HEADER = struct.Struct(">III")  # magic, block type, sequence

COMPAT_CHECKSUM = 0x1  # v1 transaction checksums (crc32_be in the commit block)
INCOMPAT_REVOKE = 0x1
INCOMPAT_64BIT = 0x2
INCOMPAT_ASYNC_COMMIT = 0x4
INCOMPAT_CSUM_V2 = 0x8
INCOMPAT_CSUM_V3 = 0x10
INCOMPAT_FAST_COMMIT = 0x20
_INCOMPAT_KNOWN = (INCOMPAT_REVOKE | INCOMPAT_64BIT | INCOMPAT_ASYNC_COMMIT | INCOMPAT_CSUM_V2
                   | INCOMPAT_CSUM_V3 | INCOMPAT_FAST_COMMIT)
CHECKSUM_TYPE_CRC32C = 4
DEFAULT_FAST_COMMIT_BLOCKS = 256
SUPERBLOCK_BYTES = 1024
BLOCK_TAIL_BYTES = 4  # descriptor/revoke tail checksum with csum v2/v3

# s_header, s_blocksize, s_maxlen, s_first, s_sequence, s_start, s_errno,
# compat, incompat, ro_compat, uuid, nr_users, dynsuper, max_transaction,
# max_trans_data, checksum_type (+3 pad), num_fc_blks, s_head.
_LAYOUT = struct.Struct(">III IIIII i III 16s IIII B3x II")
_SEQUENCE_OFFSET = 0x18
_START_OFFSET = 0x1C
_ERRNO_OFFSET = 0x20
_COMPAT_OFFSET = 0x24  # compat, then incompat
_CHECKSUM_TYPE_OFFSET = 0x50
_CHECKSUM = struct.Struct(">I")
_CHECKSUM_OFFSET = 0xFC
_WHERE = "journal block 0"


@dataclass(frozen=True, slots=True)
class JournalSuperblock:
    version: int  # 1 or 2
    block_size: int
    maxlen: int  # blocks in the journal
    first: int  # first log block
    sequence: int  # first transaction expected in the log
    start: int  # first log block of the log; 0 = journal empty
    errno: int
    compat: int
    incompat: int
    uuid: bytes
    nr_users: int
    num_fc_blocks: int  # 0 without fast_commit
    raw: bytes  # the 1024 bytes as read

    # ---- features --------------------------------------------------------

    @property
    def csum_v2or3(self) -> bool:
        return bool(self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3))

    @property
    def csum_v3(self) -> bool:
        return bool(self.incompat & INCOMPAT_CSUM_V3)

    @property
    def checksum_v1(self) -> bool:
        return bool(self.compat & COMPAT_CHECKSUM)

    @property
    def is_64bit(self) -> bool:
        return bool(self.incompat & INCOMPAT_64BIT)

    @property
    def async_commit(self) -> bool:
        return bool(self.incompat & INCOMPAT_ASYNC_COMMIT)

    @property
    def fast_commit(self) -> bool:
        return bool(self.incompat & INCOMPAT_FAST_COMMIT)

    @property
    def csum_seed(self) -> int:
        """Seed of every v2/v3 block checksum: crc32c of the journal UUID."""
        return crc32c_raw(0xFFFFFFFF, self.uuid)

    @property
    def tail_bytes(self) -> int:
        return BLOCK_TAIL_BYTES if self.csum_v2or3 else 0

    @property
    def tag_bytes(self) -> int:
        """Size of one descriptor tag (without the optional 16-byte UUID)."""
        if self.csum_v3:
            return 16
        size = 12 + (2 if self.incompat & INCOMPAT_CSUM_V2 else 0)
        return size if self.is_64bit else size - 4

    @property
    def log_end(self) -> int:
        """One past the last block of the circular log (fast-commit blocks follow it)."""
        return self.maxlen - self.num_fc_blocks

    @property
    def fast_commit_first(self) -> int:
        return self.log_end + 1

    @property
    def log_blocks(self) -> int:
        return self.log_end - self.first

    def wrap(self, position: int) -> int:
        """The log position after `position` runs off the end of the circular log."""
        if position >= self.log_end:
            position -= self.log_blocks
        return position

    # ---- parsing -----------------------------------------------------------

    @classmethod
    def parse(cls, block: bytes, *, fs_block_size: int, journal_blocks: int) -> JournalSuperblock:
        """Parse and check block 0 of an internal journal of `journal_blocks` blocks."""
        if len(block) < SUPERBLOCK_BYTES:
            raise Corrupt("journal superblock", _WHERE, f"block of {len(block)} bytes")
        (magic, blocktype, _seq, block_size, maxlen, first, sequence, start, errno_, compat,
         incompat, _ro, uuid, nr_users, _dyn, _maxt, _maxd, csum_type, num_fc,
         _head) = _LAYOUT.unpack_from(block, 0)

        def bad(why: str) -> Corrupt:
            return Corrupt("journal superblock", _WHERE, why)

        if magic != JBD2_MAGIC:
            raise bad(f"bad magic 0x{magic:08x}")
        if blocktype == BLOCK_SUPERBLOCK_V1:
            version, compat, incompat, num_fc = 1, 0, 0, 0
        elif blocktype == BLOCK_SUPERBLOCK_V2:
            version = 2
        else:
            raise bad(f"block type {blocktype} is not a journal superblock")
        if block_size != fs_block_size:
            raise bad(f"journal block size {block_size} != filesystem block size {fs_block_size}")
        if version == 2 and nr_users > 1:
            raise Unsupported("shared journal", _WHERE, f"{nr_users} filesystems use it")
        unknown = incompat & ~_INCOMPAT_KNOWN
        if unknown:
            raise Unsupported("journal features", _WHERE, f"unknown incompat bits 0x{unknown:x}")
        if incompat & INCOMPAT_CSUM_V2 and incompat & INCOMPAT_CSUM_V3:
            raise bad("both checksum v2 and v3 set")
        if compat & COMPAT_CHECKSUM and incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3):
            raise bad("both checksum v1 and v2/v3 set")
        if incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3):
            if csum_type != CHECKSUM_TYPE_CRC32C:
                raise bad(f"checksum type {csum_type} is not crc32c")
            (stored,) = _CHECKSUM.unpack_from(block, _CHECKSUM_OFFSET)
            if stored != superblock_checksum(block):
                raise bad("checksum mismatch")
        # The fast-commit area is carved off the end of the journal (256 blocks if unset).
        num_fc = (num_fc or DEFAULT_FAST_COMMIT_BLOCKS) if incompat & INCOMPAT_FAST_COMMIT else 0
        if maxlen > journal_blocks or maxlen < 2:
            raise bad(f"s_maxlen {maxlen} vs {journal_blocks} blocks in the journal inode")
        if not 1 <= first < maxlen - num_fc:
            raise bad(f"s_first {first} outside the log area (maxlen {maxlen}, "
                      f"{num_fc} fast-commit blocks)")
        if start and not first <= start < maxlen - num_fc:
            raise bad(f"s_start {start} outside the log [{first}, {maxlen - num_fc})")
        return cls(version, block_size, maxlen, first, sequence, start, errno_, compat,
                   incompat, bytes(uuid), nr_users, num_fc, bytes(block[:SUPERBLOCK_BYTES]))

    def encode_emptied(self, next_sequence: int, *, clear_errno: bool = False) -> bytes:
        """These superblock bytes after recovery: log empty (s_start 0), sequence moved
        on, and s_errno cleared once the caller has moved it into the filesystem state."""
        raw = bytearray(self.raw)
        if clear_errno:
            struct.pack_into(">i", raw, _ERRNO_OFFSET, 0)
        struct.pack_into(">I", raw, _SEQUENCE_OFFSET, next_sequence & 0xFFFFFFFF)
        struct.pack_into(">I", raw, _START_OFFSET, 0)
        if self.csum_v2or3:
            _CHECKSUM.pack_into(raw, _CHECKSUM_OFFSET, superblock_checksum(raw))
        return bytes(raw)

    def encode_errno(self, errno: int) -> bytes:
        """These superblock bytes with s_errno set (jbd2 stores a negative errno when
        it aborts; the next mount or e2fsck marks the filesystem as having errors)."""
        raw = bytearray(self.raw)
        struct.pack_into(">i", raw, _ERRNO_OFFSET, errno)
        if self.csum_v2or3:
            _CHECKSUM.pack_into(raw, _CHECKSUM_OFFSET, superblock_checksum(raw))
        return bytes(raw)

    def encode_log_state(self, *, sequence: int, start: int, compat: int | None = None,
                         incompat: int | None = None) -> bytes:
        """These superblock bytes with the log's first transaction and block (0 = log
        empty) and, when given, new feature words (the checksum type follows them)."""
        raw = bytearray(self.raw)
        struct.pack_into(">I", raw, _SEQUENCE_OFFSET, sequence & 0xFFFFFFFF)
        struct.pack_into(">I", raw, _START_OFFSET, start)
        compat = self.compat if compat is None else compat
        incompat = self.incompat if incompat is None else incompat
        struct.pack_into(">II", raw, _COMPAT_OFFSET, compat, incompat)
        csum = incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3)
        raw[_CHECKSUM_TYPE_OFFSET] = CHECKSUM_TYPE_CRC32C if csum else 0
        _CHECKSUM.pack_into(raw, _CHECKSUM_OFFSET, superblock_checksum(raw) if csum else 0)
        return bytes(raw)


def superblock_checksum(block: bytes | bytearray) -> int:
    """crc32c (seed ~0) over the 1024 superblock bytes with s_checksum zeroed."""
    head = memoryview(block)[:_CHECKSUM_OFFSET]
    crc = crc32c_raw(0xFFFFFFFF, head)
    crc = crc32c_raw(crc, bytes(_CHECKSUM.size))
    return crc32c_raw(crc, memoryview(block)[_CHECKSUM_OFFSET + _CHECKSUM.size : SUPERBLOCK_BYTES])
