"""Reading and writing single inodes in the inode tables, through the MetadataWriter."""

from __future__ import annotations

import random
import secrets

from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import Corrupt, inode_where
from ext4box.ext4.format.inode import (
    GOOD_OLD_INODE_SIZE,
    Inode,
    blank_inode,
    encode_inode,
    inode_as_stored,
)
from ext4box.ext4.write.metawriter import MetadataWriter

DEFAULT_EXTRA_ISIZE = 32


class InodeTable:
    """Locate, read, write and zero inodes; every write is a read-modify-write
    of one inode-table block buffered by the MetadataWriter."""

    def __init__(self, writer: MetadataWriter) -> None:
        sb = writer.sb
        self.writer = writer
        self.sb = sb
        self.inode_size = sb.inode_size
        self.huge_file = sb.has_ro_compat(F.RO_COMPAT_HUGE_FILE)
        want = int(sb.fields["want_extra_isize"]) or DEFAULT_EXTRA_ISIZE
        self.extra_isize = max(want, int(sb.fields["min_extra_isize"]))
        self.extra_isize = min(self.extra_isize, max(self.inode_size - GOOD_OLD_INODE_SIZE, 0))
        self._itable_blocks = -(-sb.inodes_per_group * sb.inode_size // sb.block_size)
        # i_generation only has to differ between an inode number's lives (NFS file
        # handles), as the kernel's prandom does; a getrandom(2) per create cost 4%
        # of a create's server time. Seeded unpredictably once per mount.
        self._generations = random.Random(secrets.randbits(64))

    def locate(self, ino: int) -> tuple[int, int]:
        """(inode table block, byte offset in it) of inode `ino`."""
        sb = self.sb
        if ino < 1 or ino > sb.inodes_count:
            raise Corrupt("inode number", inode_where(ino), f"outside 1..{sb.inodes_count}")
        group, index = divmod(ino - 1, sb.inodes_per_group)
        desc = self.writer.group_desc(group)
        block_index, offset = divmod(index * self.inode_size, sb.block_size)
        if block_index >= self._itable_blocks:
            raise Corrupt("inode table", inode_where(ino), "slot past the table")
        return desc.inode_table + block_index, offset

    def read_raw(self, ino: int) -> bytes:
        pblk, offset = self.locate(ino)
        return self.writer.read(pblk)[offset : offset + self.inode_size]

    def read(self, ino: int) -> Inode:
        """The inode as it is now (buffered changes included), checksum verified."""
        return Inode.parse(
            self.read_raw(ino),
            ino,
            fs_csum_seed=self.sb.csum_seed,
            huge_file=self.huge_file,
            block_size=self.sb.block_size,
        )

    def write(self, inode: Inode) -> Inode:
        """Encode `inode` (checksum included) into its slot; returns it as stored."""
        if len(inode.raw) != self.inode_size:
            raise ValueError(f"inode {inode.ino}: raw of {len(inode.raw)} bytes")
        raw = encode_inode(
            inode,
            fs_csum_seed=self.sb.csum_seed,
            huge_file=self.huge_file,
            block_size=self.sb.block_size,
        )
        self._put(inode.ino, raw)
        # Usually the stored inode is `inode` with the new raw bytes; parsing
        # them again is only needed where encoding may have changed a value.
        stored = inode_as_stored(inode, raw, fs_csum_seed=self.sb.csum_seed)
        if stored is not None:
            return stored
        return Inode.parse(
            raw,
            inode.ino,
            fs_csum_seed=self.sb.csum_seed,
            huge_file=self.huge_file,
            block_size=self.sb.block_size,
        )

    def zero(self, ino: int) -> None:
        """Clear an inode slot (a slot of a never-zeroed table about to be used)."""
        self._put(ino, bytes(self.inode_size))

    def blank(self, ino: int, generation: int | None = None) -> Inode:
        """A fresh zeroed inode for `ino` with the filesystem's extra_isize and a
        new generation, to fill in with dataclasses.replace and `write`."""
        if generation is None:
            generation = self._generations.getrandbits(32)
        return blank_inode(
            ino,
            self.inode_size,
            fs_csum_seed=self.sb.csum_seed,
            generation=generation,
            extra_isize=self.extra_isize,
        )

    def _put(self, ino: int, raw: bytes) -> None:
        pblk, offset = self.locate(ino)
        block = bytearray(self.writer.read(pblk))
        block[offset : offset + self.inode_size] = raw
        self.writer.write(pblk, bytes(block))
