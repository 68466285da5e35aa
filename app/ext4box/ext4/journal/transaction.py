"""Building one jbd2 transaction: the log blocks, in order, that the kernel replays.

A transaction is laid out as jbd2 writes it: revoke blocks first, then
descriptor blocks each followed by the copies its tags name, then the commit
block. The parsers beside this module (descriptor, revoke, commit) read the
same layouts back; this module only produces them, from the journal
superblock's features (tag size, 64-bit block numbers, checksum version).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ext4box.ext4.journal.commit import CHECKSUM_OFFSET as COMMIT_CHECKSUM_OFFSET
from ext4box.ext4.journal.commit import commit_checksum
from ext4box.ext4.journal.descriptor import (
    FLAG_ESCAPE,
    FLAG_LAST_TAG,
    FLAG_SAME_UUID,
    data_checksum,
    tail_checksum,
)
from ext4box.ext4.journal.superblock import (
    BLOCK_COMMIT,
    BLOCK_DESCRIPTOR,
    BLOCK_REVOKE,
    HEADER,
    JBD2_MAGIC,
    JournalSuperblock,
)

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_COMMIT_TIME = struct.Struct(">QI")
_COMMIT_TIME_OFFSET = 48
_REVOKE_RECORDS_OFFSET = 16
_UUID_BYTES = 16
_MAGIC_BYTES = _BE32.pack(JBD2_MAGIC)


@dataclass(frozen=True, slots=True)
class Transaction:
    """The log blocks of one transaction, in log order (the commit block last)."""

    sequence: int
    blocks: list[bytes]


def tags_per_descriptor(jsb: JournalSuperblock) -> int:
    """How many tags fit in one descriptor block (the first carries the UUID)."""
    room = jsb.block_size - HEADER.size - jsb.tail_bytes - _UUID_BYTES
    return room // jsb.tag_bytes


def revokes_per_block(jsb: JournalSuperblock) -> int:
    room = jsb.block_size - _REVOKE_RECORDS_OFFSET - jsb.tail_bytes
    return room // (8 if jsb.is_64bit else 4)


def log_blocks_needed(jsb: JournalSuperblock, copies: int, revokes: int) -> int:
    """Log blocks a transaction of `copies` logged blocks and `revokes` revoked
    blocks takes, the commit block included."""
    descriptors = -(-copies // tags_per_descriptor(jsb)) if copies else 0
    revoke_blocks = -(-revokes // revokes_per_block(jsb)) if revokes else 0
    return revoke_blocks + descriptors + copies + 1


def build_transaction(jsb: JournalSuperblock, sequence: int, copies: Mapping[int, bytes],
                      revokes: Iterable[int], *, commit_ns: int) -> Transaction:
    """Every log block of transaction `sequence`: `copies` maps a filesystem block
    to its new contents, `revokes` are filesystem blocks whose older logged copies
    must not be replayed."""
    sequence &= 0xFFFFFFFF
    blocks: list[bytes] = []
    blocks.extend(_revoke_blocks(jsb, sequence, sorted(set(revokes))))
    targets = sorted(copies)
    per_block = tags_per_descriptor(jsb)
    for first in range(0, len(targets), per_block):
        chunk = targets[first : first + per_block]
        logged = [_escaped(copies[target]) for target in chunk]
        tags = [(target, escaped, data) for target, (data, escaped) in zip(chunk, logged,
                                                                            strict=True)]
        blocks.append(_descriptor_block(jsb, sequence, tags))
        blocks.extend(data for data, _ in logged)
    blocks.append(_commit_block(jsb, sequence, commit_ns))
    return Transaction(sequence, blocks)


def _header(jsb: JournalSuperblock, kind: int, sequence: int) -> bytearray:
    block = bytearray(jsb.block_size)
    HEADER.pack_into(block, 0, JBD2_MAGIC, kind, sequence)
    return block


def _escaped(data: bytes) -> tuple[bytes, bool]:
    """A block that begins with the jbd2 magic would read as a log header: log it
    with those 4 bytes zeroed and the ESCAPE flag set."""
    if data[:4] == _MAGIC_BYTES:
        return bytes(4) + data[4:], True
    return data, False


def _set_tail_checksum(jsb: JournalSuperblock, block: bytearray) -> None:
    if jsb.csum_v2or3:
        _BE32.pack_into(block, jsb.block_size - 4, tail_checksum(block, jsb))


def _descriptor_block(jsb: JournalSuperblock, sequence: int,
                      tags: list[tuple[int, bool, bytes]]) -> bytes:
    block = _header(jsb, BLOCK_DESCRIPTOR, sequence)
    offset = HEADER.size
    for index, (target, escaped, logged) in enumerate(tags):
        flags = (FLAG_ESCAPE if escaped else 0) | (FLAG_SAME_UUID if index else 0)
        if index == len(tags) - 1:
            flags |= FLAG_LAST_TAG
        _BE32.pack_into(block, offset, target & 0xFFFFFFFF)
        _BE16.pack_into(block, offset + 6, flags)
        if jsb.is_64bit or jsb.csum_v3:
            _BE32.pack_into(block, offset + 8, target >> 32 if jsb.is_64bit else 0)
        if jsb.csum_v2or3:
            crc = data_checksum(jsb, sequence, logged)
            if jsb.csum_v3:
                _BE32.pack_into(block, offset + 12, crc)
            else:
                _BE16.pack_into(block, offset + 4, crc & 0xFFFF)
        offset += jsb.tag_bytes
        if not index:
            block[offset : offset + _UUID_BYTES] = jsb.uuid
            offset += _UUID_BYTES
    _set_tail_checksum(jsb, block)
    return bytes(block)


def _revoke_blocks(jsb: JournalSuperblock, sequence: int, targets: list[int]) -> list[bytes]:
    size = 8 if jsb.is_64bit else 4
    fmt = struct.Struct(">Q" if jsb.is_64bit else ">I")
    per_block = revokes_per_block(jsb)
    blocks = []
    for first in range(0, len(targets), per_block):
        chunk = targets[first : first + per_block]
        block = _header(jsb, BLOCK_REVOKE, sequence)
        offset = _REVOKE_RECORDS_OFFSET
        for target in chunk:
            fmt.pack_into(block, offset, target)
            offset += size
        _BE32.pack_into(block, HEADER.size, offset)  # r_count: bytes used, header included
        _set_tail_checksum(jsb, block)
        blocks.append(bytes(block))
    return blocks


def _commit_block(jsb: JournalSuperblock, sequence: int, commit_ns: int) -> bytes:
    block = _header(jsb, BLOCK_COMMIT, sequence)
    seconds, nanos = divmod(commit_ns, 1_000_000_000)
    _COMMIT_TIME.pack_into(block, _COMMIT_TIME_OFFSET, seconds, nanos)
    if jsb.csum_v2or3:
        _BE32.pack_into(block, COMMIT_CHECKSUM_OFFSET, commit_checksum(block, jsb))
    return bytes(block)
