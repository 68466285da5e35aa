"""Where a (possibly mutated) image's journal lives and what its log holds, for the fuzzers.

`journal_device_blocks` maps the journal inode with the engine's mapper (the
layout the recovery code will read). `walk_log` follows the log from s_start
the way jbd2's scan does, but tolerantly: it stops quietly at the first block
that does not continue the log, never raises for damage and never revisits a
block. `reseal_journal` recomputes every checksum of the log it can reach
(superblock, descriptor and revoke tails, tag checksums of logged copies,
commit blocks), so a mutation of a checksummed journal reaches the recovery
logic behind the checksum gate. `tag_targets` lists every block any
descriptor anywhere in the journal names: the most a replay may write.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock
from ext4box.ext4.journal.commit import CHECKSUM_OFFSET as COMMIT_CHECKSUM_OFFSET
from ext4box.ext4.journal.commit import commit_checksum
from ext4box.ext4.journal.descriptor import BlockTag, data_checksum, parse_tags, tail_checksum
from ext4box.ext4.journal.recovery import open_journal
from ext4box.ext4.journal.superblock import (
    BLOCK_COMMIT,
    BLOCK_DESCRIPTOR,
    BLOCK_REVOKE,
    HEADER,
    JBD2_MAGIC,
    JournalSuperblock,
    superblock_checksum,
)
from ext4box.ext4.read.filesystem import CacheSizes, Filesystem

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_JSB_CHECKSUM_OFFSET = 0xFC
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class LogEntry:
    kind: int  # BLOCK_DESCRIPTOR, BLOCK_COMMIT or BLOCK_REVOKE
    position: int  # journal block number
    sequence: int
    tags: tuple[BlockTag, ...] = ()  # descriptors only
    logged: tuple[int, ...] = ()  # journal positions of the tags' logged copies


def journal_device_blocks(image: bytes | bytearray) -> tuple[int, ...]:
    """Device block of every journal block (block 0 = the journal superblock), or ()
    when the image has no journal the engine can map."""
    fd = os.memfd_create("fuzz-journal")
    try:
        os.write(fd, image)
        dev = BlockDevice(fd, size=len(image))
        try:
            sb = Superblock.parse(dev.pread(SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE))
            if not int(sb.fields["journal_inum"]):
                return ()
            # As recovery reads it: the device as it is, before any replay.
            fs = Filesystem(dev, sb, CacheSizes(metadata_blocks=64, inodes=4, mappers=1,
                                                directories=1))
            blocks, _jsb = open_journal(fs)
            return tuple(blocks.device_block(i) for i in range(blocks.count))
        except Ext4Error:
            return ()
    finally:
        os.close(fd)


def journal_superblock(image: bytes | bytearray, journal: tuple[int, ...],
                       block_size: int) -> JournalSuperblock | None:
    if not journal or (journal[0] + 1) * block_size > len(image):
        return None
    raw = bytes(image[journal[0] * block_size:][:block_size])
    try:
        return JournalSuperblock.parse(raw, fs_block_size=block_size, journal_blocks=len(journal))
    except Ext4Error:
        return None


def _block(image: bytes | bytearray, journal: tuple[int, ...], index: int, bs: int) -> bytes:
    pblk = journal[index]
    return bytes(image[pblk * bs:(pblk + 1) * bs])


def walk_log(image: bytes | bytearray, journal: tuple[int, ...], jsb: JournalSuperblock
             ) -> Iterator[LogEntry]:
    """The header blocks of the log from s_start, each with the tags it holds."""
    bs = jsb.block_size
    if not jsb.start or any((p + 1) * bs > len(image) for p in journal):
        return
    position, sequence, left = jsb.start, jsb.sequence, jsb.log_blocks

    def advance(at: int) -> int:
        return jsb.first + (at - jsb.first + 1) % jsb.log_blocks

    while left > 0:
        data = _block(image, journal, position, bs)
        magic, kind, seq = HEADER.unpack_from(data, 0)
        if magic != JBD2_MAGIC or seq != sequence or kind not in (
                BLOCK_DESCRIPTOR, BLOCK_COMMIT, BLOCK_REVOKE):
            return
        here = position
        position, left = advance(position), left - 1
        if kind == BLOCK_DESCRIPTOR:
            tags = parse_tags(data, jsb)
            if len(tags) > left:
                return
            logged = []
            for _ in tags:
                logged.append(position)
                position, left = advance(position), left - 1
            yield LogEntry(kind, here, seq, tags, tuple(logged))
        else:
            yield LogEntry(kind, here, seq)
            if kind == BLOCK_COMMIT:
                sequence = (sequence + 1) & _MASK32


def reseal_journal(image: bytearray, journal: tuple[int, ...], block_size: int) -> None:
    """Recompute the checksums of the journal superblock and of every log block reached."""
    if not journal or (journal[0] + 1) * block_size > len(image):
        return
    jsb_at = journal[0] * block_size
    incompat = _BE32.unpack_from(image, jsb_at + 0x28)[0]
    if not incompat & 0x18:  # no csum v2/v3: nothing to seal
        return
    _BE32.pack_into(image, jsb_at + _JSB_CHECKSUM_OFFSET, superblock_checksum(image[jsb_at:]))
    jsb = journal_superblock(image, journal, block_size)
    if jsb is None:
        return
    bs = block_size
    for entry in list(walk_log(image, journal, jsb)):
        at = journal[entry.position] * bs
        if entry.kind == BLOCK_DESCRIPTOR:
            for tag, position in zip(entry.tags, entry.logged, strict=True):
                crc = data_checksum(jsb, entry.sequence, _block(image, journal, position, bs))
                if jsb.csum_v3:
                    _BE32.pack_into(image, at + tag.offset + 12, crc)
                else:
                    _BE16.pack_into(image, at + tag.offset + 4, crc & 0xFFFF)
        if entry.kind in (BLOCK_DESCRIPTOR, BLOCK_REVOKE):
            _BE32.pack_into(image, at + bs - 4, tail_checksum(image[at:at + bs], jsb))
        elif entry.kind == BLOCK_COMMIT:
            _BE32.pack_into(image, at + COMMIT_CHECKSUM_OFFSET,
                            commit_checksum(image[at:at + bs], jsb))


def tag_targets(image: bytes | bytearray, journal: tuple[int, ...], block_size: int) -> set[int]:
    """Every block a descriptor block anywhere in the journal names (a superset of what
    any replay of this journal can write)."""
    jsb = journal_superblock(image, journal, block_size)
    if jsb is None:
        return set()
    targets: set[int] = set()
    for index in range(1, len(journal)):
        data = _block(image, journal, index, block_size)
        if len(data) == block_size and HEADER.unpack_from(data, 0)[:2] == (
                JBD2_MAGIC, BLOCK_DESCRIPTOR):
            targets.update(tag.target for tag in parse_tags(data, jsb))
    return targets
