"""The ext4 fast-commit area: parse its tags and find the ones to replay.

With the fast_commit feature the last blocks of the journal hold a log of
tag-length-value records (little-endian u16 tag, u16 length, value) written
between two full commits. A fast commit is the run of tags up to and
including a TAIL, whose crc32c (seed 0, no final inversion) covers every tag
since the previous TAIL — headers and values — and the TAIL's own header and
tid. The first tag of the area is a HEAD carrying the transaction id the
fast commits follow; only fast commits whose HEAD and TAIL name the
transaction after the last valid full commit are replayed.

The scan is the kernel's (ext4_fc_replay_scan), tag by tag and block by
block (a tag never straddles blocks; a block's last < 4 bytes are skipped):
- block 0 not starting with HEAD, or a HEAD of another transaction: nothing
  to replay (a stale area);
- a HEAD with feature bits we do not know: Unsupported (the kernel refuses
  the mount);
- a tag whose length runs past the block or does not fit its kind, an
  unknown tag, a TAIL of another transaction or with a bad crc: the scan
  stops there. If a valid TAIL came before, everything up to the last valid
  TAIL is replayed; if none did, the area is Corrupt (the kernel fails the
  mount: -ECANCELED / -EFSBADCRC).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ext4box.ext4.format.checksum import crc32c_raw
from ext4box.ext4.format.errors import Corrupt, Unsupported
from ext4box.ext4.journal.log import JournalBlocks
from ext4box.ext4.journal.superblock import JournalSuperblock

TAG_ADD_RANGE = 0x0001
TAG_DEL_RANGE = 0x0002
TAG_CREAT = 0x0003
TAG_LINK = 0x0004
TAG_UNLINK = 0x0005
TAG_INODE = 0x0006
TAG_PAD = 0x0007
TAG_TAIL = 0x0008
TAG_HEAD = 0x0009
SUPPORTED_FEATURES = 0x0  # EXT4_FC_SUPPORTED_FEATURES: no HEAD feature bit is defined

_TL = struct.Struct("<HH")  # tag, length of the value
_HEAD = struct.Struct("<II")  # features, tid
_TAIL = struct.Struct("<II")  # tid, crc
_ADD_RANGE = struct.Struct("<I IHHI")  # ino; extent: ee_block, ee_len, ee_start_hi, ee_start_lo
_DEL_RANGE = struct.Struct("<III")  # ino, lblk, len
_DENTRY = struct.Struct("<II")  # parent ino, ino (the name follows)
_INO = struct.Struct("<I")
_GOOD_OLD_INODE_SIZE = 128
_NAME_MAX = 255
_INIT_MAX_LEN = 1 << 15  # ee_len above this: an unwritten extent of ee_len - 2^15 blocks


@dataclass(frozen=True, slots=True)
class InodeTag:
    ino: int
    raw: bytes  # the inode as the kernel had it in memory (128 + extra_isize bytes)


@dataclass(frozen=True, slots=True)
class AddRange:
    ino: int
    lblk: int
    length: int
    pblk: int
    unwritten: bool


@dataclass(frozen=True, slots=True)
class DelRange:
    ino: int
    lblk: int
    length: int


@dataclass(frozen=True, slots=True)
class DentryTag:
    kind: int  # TAG_CREAT, TAG_LINK or TAG_UNLINK
    parent: int
    ino: int
    name: bytes


FastCommitTag = InodeTag | AddRange | DelRange | DentryTag


@dataclass(frozen=True, slots=True)
class FastCommitScan:
    tags: tuple[FastCommitTag, ...]  # the tags to replay, in order (HEAD/TAIL/PAD left out)
    commits: int  # valid TAILs
    stopped: str | None  # why the scan ended before the area's end, for the log

    @property
    def pending(self) -> bool:
        return bool(self.commits)


_NOTHING = FastCommitScan((), 0, None)


def _value_length_ok(tag: int, length: int, inode_size: int) -> bool:
    """ext4_fc_value_len_isvalid: the length each kind of tag may have."""
    if tag == TAG_ADD_RANGE:
        return length == _ADD_RANGE.size
    if tag == TAG_DEL_RANGE:
        return length == _DEL_RANGE.size
    if tag in (TAG_CREAT, TAG_LINK, TAG_UNLINK):
        return 1 <= length - _DENTRY.size <= _NAME_MAX
    if tag == TAG_INODE:
        return _GOOD_OLD_INODE_SIZE <= length - _INO.size <= inode_size
    if tag == TAG_PAD:
        return True
    if tag == TAG_TAIL:
        return length >= _TAIL.size
    if tag == TAG_HEAD:
        return length == _HEAD.size
    return False


def _decode(tag: int, value: bytes) -> FastCommitTag | None:
    if tag == TAG_ADD_RANGE:
        ino, lblk, ee_len, start_hi, start_lo = _ADD_RANGE.unpack(value)
        unwritten = ee_len > _INIT_MAX_LEN
        length = ee_len - _INIT_MAX_LEN if unwritten else ee_len
        return AddRange(ino, lblk, length, (start_hi << 32) | start_lo, unwritten)
    if tag == TAG_DEL_RANGE:
        return DelRange(*_DEL_RANGE.unpack(value))
    if tag in (TAG_CREAT, TAG_LINK, TAG_UNLINK):
        parent, ino = _DENTRY.unpack_from(value, 0)
        return DentryTag(tag, parent, ino, bytes(value[_DENTRY.size :]))
    if tag == TAG_INODE:
        (ino,) = _INO.unpack_from(value, 0)
        return InodeTag(ino, bytes(value[_INO.size :]))
    return None  # PAD, HEAD, TAIL: nothing to replay


def scan_fast_commits(blocks: JournalBlocks, jsb: JournalSuperblock, expected_tid: int,
                      inode_size: int) -> FastCommitScan:
    """The fast commits following transaction `expected_tid - 1`, checked as the kernel
    checks them (see the module docstring). Reads at most the fast-commit area."""
    if not jsb.fast_commit:
        return _NOTHING
    first = jsb.fast_commit_first
    # The kernel reads up to s_maxlen inclusive; the journal inode bounds that too.
    last = min(jsb.maxlen, blocks.count - 1)
    if first > last:
        return _NOTHING
    bs = jsb.block_size
    expected_tid &= 0xFFFFFFFF
    pending: list[FastCommitTag] = []  # tags of the fast commit not yet closed by a TAIL
    accepted: list[FastCommitTag] = []
    commits = 0
    crc = 0

    def stop(where: str, why: str) -> FastCommitScan:
        if commits:
            return FastCommitScan(tuple(accepted), commits, f"{where}: {why}")
        raise Corrupt("fast commit area", where, why)

    for position in range(first, last + 1):
        data = blocks.read(position)
        if position == first and _TL.unpack_from(data, 0)[0] != TAG_HEAD:
            return _NOTHING
        cur = 0
        while cur + _TL.size <= bs:
            tag, length = _TL.unpack_from(data, cur)
            where = f"journal block {position} offset {cur}"
            value_at = cur + _TL.size
            if length > bs - value_at or not _value_length_ok(tag, length, inode_size):
                return stop(where, f"tag 0x{tag:x} with a value of {length} bytes "
                            "(past the block or wrong for its kind)")
            value = data[value_at : value_at + length]
            if tag == TAG_HEAD:
                features, tid = _HEAD.unpack(value)
                if features & ~SUPPORTED_FEATURES:
                    raise Unsupported("fast commit features", where,
                                      f"HEAD has unknown feature bits 0x{features:x}")
                if tid != expected_tid:
                    return FastCommitScan(tuple(accepted), commits,
                                          f"{where}: HEAD of transaction {tid}")
                crc = crc32c_raw(crc, data[cur : value_at + length])
            elif tag == TAG_TAIL:
                tid, stored = _TAIL.unpack_from(value, 0)
                crc = crc32c_raw(crc, data[cur : value_at + 4])
                if tid != expected_tid or stored != crc:
                    why = (f"TAIL of transaction {tid}, expected {expected_tid}"
                           if tid != expected_tid else
                           f"TAIL crc 0x{stored:08x} != computed 0x{crc:08x}")
                    return stop(where, why)
                accepted.extend(pending)
                pending.clear()
                commits += 1
                crc = 0
            elif tag in (TAG_ADD_RANGE, TAG_DEL_RANGE, TAG_CREAT, TAG_LINK, TAG_UNLINK,
                         TAG_INODE, TAG_PAD):
                crc = crc32c_raw(crc, data[cur : value_at + length])
                decoded = _decode(tag, value)
                if decoded is not None:
                    pending.append(decoded)
            else:
                return stop(where, f"unknown tag 0x{tag:x}")
            cur = value_at + length
    return FastCommitScan(tuple(accepted), commits, None)
