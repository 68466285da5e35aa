"""Extended attributes: the in-inode area and the external xattr block.

Both places hold the same thing: a table of entries growing from the front,
ended by four zero bytes, and values packed from the back. They differ in
what comes first (a 4-byte magic in the inode, a 32-byte header with refcount,
hash and checksum in the block) and in what value offsets count from (the
first entry in the inode, the block start in the block).

Reading follows the kernel's rules: an inode area without the magic has no
attributes; entries whose name index has no known prefix are skipped, as the
kernel's listxattr skips indexes it has no handler for (they stay on disk and
a builder never sees them); entry hashes and the block hash are not verified
on read (the kernel only uses them to find shareable blocks), but the block
checksum is when metadata_csum is on.

Building mirrors what the kernel writes: values from the end of the area
downwards in entry order, block entries sorted by (index, name length, name)
because the kernel's block lookup stops at the first larger entry, entry
hashes in blocks and for values in EA inodes, zero hashes for plain in-inode
entries, e_value_offs 0 for empty values, h_hash always set. The kernel stacks
values in the order they were set, so a block whose attributes were set out of
sorted order comes back with the same entries but another value layout.
mkfs.ext4 -d (e2fsprogs 1.47.0) differs in three small ways: h_hash left 0,
empty values pointing at the value area's end, a magic with no entries in
inodes whose attributes all went to the block.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ext4box.ext4.format.checksum import crc32c_raw
from ext4box.ext4.format.errors import Corrupt, Ext4Error, Unsupported, block_where, inode_where

XATTR_MAGIC = 0xEA020000
# The kernel's upper bound on one value (EXT4_XATTR_SIZE_MAX); VFS allows 64 KiB.
XATTR_VALUE_MAX = 1 << 24
# What one area's values may make us read from EA inodes. Every entry of a block may
# name a 16 MiB EA inode: read one by one, a 1 KiB block of 48 such entries made a
# listxattr allocate 800 MB (a 64 KiB block, tens of GB). Values are read once per EA
# inode and size, and all of them together must stay under this bound.
EA_VALUES_MAX = 1 << 24
ROOT_INO = 2

_MAGIC = struct.Struct("<I")
# h_magic, h_refcount, h_blocks, h_hash, h_checksum, h_reserved[3]
_BLOCK_HEADER = struct.Struct("<IIIII12x")
_CHECKSUM_OFFSET = 16
# e_name_len, e_name_index, e_value_offs, e_value_inum, e_value_size, e_hash; the name follows.
_ENTRY = struct.Struct("<BBHIII")
_END_MARKER = b"\0\0\0\0"
_WORD = struct.Struct("<I")
_MASK32 = 0xFFFFFFFF

# name index -> prefix of the full name. Indexes 2, 3 and 8 name one attribute each
# (their on-disk name is empty); the others are namespaces ending in ".".
NAME_PREFIXES: dict[int, bytes] = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
    7: b"system.",
    8: b"system.richacl",
    10: b"gnu.",  # GNU Hurd's namespace; Linux ext4 serves it too
}
# For building: longest prefix first, so "system.posix_acl_access" wins over "system.".
_PREFIXES_LONGEST_FIRST = sorted(NAME_PREFIXES.items(), key=lambda item: -len(item[1]))


class XattrNoSpace(Ext4Error):
    """The attributes do not fit in the area they are built for (ENOSPC, as the
    kernel). Not a NoSpace: that one makes a mutation retry after a commit has
    released pending frees, which never makes room in an inode or xattr block."""

    errno = errno.ENOSPC


class XattrNameError(Ext4Error):
    """A name that cannot be stored: too long (ERANGE) or empty after its prefix (EINVAL)."""

    def __init__(self, name: bytes, why: str, code: int) -> None:
        super().__init__(f"xattr name {name!r}: {why}")
        self.errno = code


@dataclass(frozen=True, slots=True)
class XattrEntry:
    name: bytes  # full name, e.g. b"user.foo", b"system.posix_acl_access"
    value: bytes  # ACLs stay in ext4's disk format here; acl.py converts them
    value_inum: int = 0  # ea_inode feature: the inode holding the value, else 0


@dataclass(frozen=True, slots=True)
class XattrBlock:
    refcount: int
    entries: list[XattrEntry]
    hash: int = 0  # h_hash as stored (0: the block is not shareable)


@dataclass(frozen=True, slots=True)
class _RawEntry:
    offset: int  # of the entry inside the area, for error messages
    name_index: int
    name: bytes
    value_offs: int
    value_inum: int
    value_size: int


ReadEaInode = Callable[[int, int], bytes]


def unread_ea_value(ea_ino: int, size: int) -> bytes:
    """A ReadEaInode for parses that need only which EA inodes the entries name
    (dropping references, a refcount change): zeros of the value's size, no I/O.
    Bounded like real reads by EA_VALUES_MAX per area."""
    return bytes(size)


# ---------------------------------------------------------------- hashes


def entry_hash(name_suffix: bytes, value: bytes) -> int:
    """e_hash of an entry: its on-disk name, then its value as le32 words (zero padded).

    For a value kept in an EA inode, `value` is the le32 of that inode's hash.
    Names use unsigned bytes, as Linux >= 6.2 and e2fsprogs >= 1.47 do.
    """
    hash_ = 0
    for byte in name_suffix:
        hash_ = ((hash_ << 5) ^ (hash_ >> 27) ^ byte) & _MASK32
    padded = value + bytes(-len(value) % 4)
    for (word,) in _WORD.iter_unpack(padded):
        hash_ = ((hash_ << 16) ^ (hash_ >> 16) ^ word) & _MASK32
    return hash_


def block_hash(entry_hashes: Iterable[int]) -> int:
    """h_hash: the entry hashes folded in table order; 0 if any entry hash is 0."""
    hash_ = 0
    for one in entry_hashes:
        if one == 0:
            return 0
        hash_ = ((hash_ << 16) ^ (hash_ >> 16) ^ one) & _MASK32
    return hash_


def ea_inode_hash(csum_seed: int, value: bytes) -> int:
    """Hash of a value stored in an EA inode (kept in that inode's i_atime)."""
    return crc32c_raw(csum_seed, value)


def xattr_block_checksum(block: bytes, blkno: int, csum_seed: int) -> int:
    """h_checksum: crc32c over le64 block number, then the block with h_checksum as zero."""
    csum = crc32c_raw(csum_seed, blkno.to_bytes(8, "little"))
    csum = crc32c_raw(csum, memoryview(block)[:_CHECKSUM_OFFSET])
    csum = crc32c_raw(csum, _END_MARKER)
    return crc32c_raw(csum, memoryview(block)[_CHECKSUM_OFFSET + 4 :])


# ---------------------------------------------------------------- parsing


def parse_ibody_xattrs(
    ibody: bytes, *, ino: int, read_ea_inode: ReadEaInode | None = None
) -> list[XattrEntry]:
    """Attributes in the inode after 128 + i_extra_isize; [] when the magic is absent."""
    if len(ibody) < _MAGIC.size or _MAGIC.unpack_from(ibody)[0] != XATTR_MAGIC:
        return []
    where = inode_where(ino)
    first = _MAGIC.size
    raw, table_end = _parse_entry_table(ibody, first, "in-inode xattr", where)
    return _resolve(raw, table_end, ibody, first, "in-inode xattr", where, ino, read_ea_inode)


def parse_xattr_block(
    block: bytes,
    *,
    blkno: int,
    ino: int,
    csum_seed: int | None,
    read_ea_inode: ReadEaInode | None = None,
) -> XattrBlock:
    """An external xattr block (i_file_acl); csum_seed None means no metadata_csum."""
    where = block_where(blkno, ino)
    what = "xattr block"
    if len(block) < _BLOCK_HEADER.size + len(_END_MARKER):
        raise Corrupt(what, where, f"{len(block)} bytes is smaller than a header")
    magic, refcount, blocks, stored_hash, stored_csum = _BLOCK_HEADER.unpack_from(block)
    if magic != XATTR_MAGIC:
        raise Corrupt(what, where, f"bad magic {magic:#010x}")
    if blocks != 1:
        raise Corrupt(what, where, f"h_blocks is {blocks}, not 1")
    if csum_seed is not None:
        expected = xattr_block_checksum(block, blkno, csum_seed)
        if stored_csum != expected:
            raise Corrupt(what, where, f"checksum {stored_csum:#010x} != {expected:#010x}")
    raw, table_end = _parse_entry_table(block, _BLOCK_HEADER.size, what, where)
    entries = _resolve(raw, table_end, block, 0, what, where, ino, read_ea_inode)
    return XattrBlock(refcount=refcount, entries=entries, hash=stored_hash)


def _parse_entry_table(
    area: bytes, start: int, what: str, where: str
) -> tuple[list[_RawEntry], int]:
    """Entries from `start` up to the 4 zero bytes, and where the marker ends."""
    end = len(area)
    entries: list[_RawEntry] = []
    pos = start
    # Every entry takes at least 16 bytes, so the area bounds the count; the loop
    # is bounded explicitly anyway.
    for _ in range((end - start) // _ENTRY.size + 1):
        if pos + len(_END_MARKER) > end:
            raise Corrupt(what, where, f"entry table runs past the end at offset {pos}")
        if area[pos : pos + 4] == _END_MARKER:
            return entries, pos + len(_END_MARKER)
        if pos + _ENTRY.size > end:
            raise Corrupt(what, where, f"entry at offset {pos} crosses the end")
        name_len, name_index, value_offs, value_inum, value_size, _hash = _ENTRY.unpack_from(
            area, pos
        )
        following = pos + _padded(_ENTRY.size + name_len)
        # The following entry (or the end marker) must start inside the area.
        if following + len(_END_MARKER) > end:
            raise Corrupt(what, where, f"name of entry at offset {pos} runs past the end")
        name = bytes(area[pos + _ENTRY.size : pos + _ENTRY.size + name_len])
        if b"\0" in name:
            raise Corrupt(what, where, f"name of entry at offset {pos} contains NUL")
        entries.append(_RawEntry(pos, name_index, name, value_offs, value_inum, value_size))
        pos = following
    raise Corrupt(what, where, "entry table has no end marker")


def _resolve(
    raw: list[_RawEntry],
    table_end: int,
    area: bytes,
    value_base: int,
    what: str,
    where: str,
    ino: int,
    read_ea_inode: ReadEaInode | None,
) -> list[XattrEntry]:
    """Check each value's place and turn raw entries into named attributes."""
    end = len(area)
    result: list[XattrEntry] = []
    ea_values: dict[tuple[int, int], bytes] = {}  # (EA inode, size) -> value, read once
    ea_total = 0
    for entry in raw:
        at = f"entry at offset {entry.offset}"
        if entry.value_size > XATTR_VALUE_MAX:
            raise Corrupt(what, where, f"{at}: value size {entry.value_size} too large")
        if entry.value_inum:
            key = (entry.value_inum, entry.value_size)
            value = ea_values.get(key)
            if value is None:
                ea_total += entry.value_size
                if ea_total > EA_VALUES_MAX:
                    raise Corrupt(what, where, f"{at}: values in EA inodes add up to more "
                                  f"than {EA_VALUES_MAX} bytes")
                value = _read_ea_inode_value(entry, what, where, ino, read_ea_inode)
                ea_values[key] = value
        elif entry.value_size == 0:
            value = b""
        else:
            start = value_base + entry.value_offs
            if start < table_end:
                raise Corrupt(what, where, f"{at}: value at {start} overlaps the entry table")
            if start + _padded(entry.value_size) > end:
                raise Corrupt(
                    what, where, f"{at}: value [{start}, +{entry.value_size}) past the end {end}"
                )
            value = bytes(area[start : start + entry.value_size])
        name = _full_name(entry, what, where)
        if name is not None:
            result.append(XattrEntry(name, value, entry.value_inum))
    return result


def _read_ea_inode_value(
    entry: _RawEntry, what: str, where: str, ino: int, read_ea_inode: ReadEaInode | None
) -> bytes:
    at = f"entry at offset {entry.offset}"
    if read_ea_inode is None:
        raise Corrupt(what, where, f"{at}: value in inode {entry.value_inum} without ea_inode")
    if entry.value_inum in (ino, ROOT_INO):
        raise Corrupt(what, where, f"{at}: value in inode {entry.value_inum}")
    value = read_ea_inode(entry.value_inum, entry.value_size)
    if len(value) != entry.value_size:
        raise Corrupt(
            what,
            where,
            f"{at}: EA inode {entry.value_inum} gave {len(value)} bytes, not {entry.value_size}",
        )
    return value


def _full_name(entry: _RawEntry, what: str, where: str) -> bytes | None:
    """prefix + name; None for an index the kernel has no handler for (hidden)."""
    prefix = NAME_PREFIXES.get(entry.name_index)
    if prefix is None:
        return None
    if prefix.endswith(b".") and not entry.name:
        raise Corrupt(what, where, f"entry at offset {entry.offset}: empty name after {prefix!r}")
    return prefix + entry.name


# ---------------------------------------------------------------- building


def split_name(name: bytes) -> tuple[int, bytes]:
    """Full name -> (name index, on-disk name); raises for names ext4 cannot store."""
    for index, prefix in _PREFIXES_LONGEST_FIRST:
        if not name.startswith(prefix):
            continue
        suffix = name[len(prefix) :]
        if not prefix.endswith(b"."):
            if suffix:
                continue  # e.g. b"system.richaclx" is in the "system." namespace
        elif not suffix:
            raise XattrNameError(name, "empty name after the prefix", errno.EINVAL)
        if len(suffix) > 255:
            raise XattrNameError(name, "longer than 255 bytes", errno.ERANGE)
        return index, suffix
    raise Unsupported("xattr namespace", detail=repr(name))


def build_ibody_xattrs(
    entries: Iterable[XattrEntry], size: int, *, ea_inode_seed: int | None = None
) -> bytes:
    """The in-inode area of `size` bytes (inode size - 128 - i_extra_isize), entries in order.

    No entries gives an area of zeros (no magic), as the kernel leaves it.
    `ea_inode_seed` (the filesystem checksum seed) is needed only for entries
    whose value lives in an EA inode.
    """
    entries = list(entries)
    area = bytearray(size)
    if not entries:
        return bytes(area)
    if size < _MAGIC.size + len(_END_MARKER):
        raise XattrNoSpace(f"in-inode xattr area of {size} bytes holds nothing")
    _MAGIC.pack_into(area, 0, XATTR_MAGIC)
    _lay_out(area, entries, _MAGIC.size, _MAGIC.size, hash_values=False, seed=ea_inode_seed)
    return bytes(area)


def build_xattr_block(
    entries: Iterable[XattrEntry],
    *,
    blkno: int,
    block_size: int,
    refcount: int,
    csum_seed: int | None,
    ea_inode_seed: int | None = None,
) -> bytes:
    """An external xattr block; entries are sorted as the kernel's block lookup requires.

    csum_seed None: no metadata_csum, h_checksum stays 0. `ea_inode_seed`
    defaults to csum_seed (ea_inode hashes use the same filesystem seed).
    """
    ordered = sorted(entries, key=_block_order)
    block = bytearray(block_size)
    hashes = _lay_out(
        block,
        ordered,
        _BLOCK_HEADER.size,
        0,
        hash_values=True,
        seed=csum_seed if ea_inode_seed is None else ea_inode_seed,
    )
    _BLOCK_HEADER.pack_into(block, 0, XATTR_MAGIC, refcount, 1, block_hash(hashes), 0)
    if csum_seed is not None:
        csum = xattr_block_checksum(block, blkno, csum_seed)
        _WORD.pack_into(block, _CHECKSUM_OFFSET, csum)
    return bytes(block)


def _block_order(entry: XattrEntry) -> tuple[int, int, bytes]:
    index, suffix = split_name(entry.name)
    return index, len(suffix), suffix


def _lay_out(
    area: bytearray,
    entries: list[XattrEntry],
    table_start: int,
    value_base: int,
    *,
    hash_values: bool,
    seed: int | None,
) -> list[int]:
    """Write the entry table from table_start and values from the end down; return e_hashes."""
    split = [split_name(entry.name) for entry in entries]
    if len(set(split)) != len(split):
        raise ValueError("duplicate xattr names")
    table_size = sum(_padded(_ENTRY.size + len(suffix)) for _, suffix in split)
    values_size = sum(
        _padded(len(entry.value)) for entry in entries if not entry.value_inum and entry.value
    )
    needed = table_start + table_size + len(_END_MARKER) + values_size
    if needed > len(area):
        raise XattrNoSpace(f"xattrs need {needed} bytes, the area has {len(area)}")
    hashes: list[int] = []
    pos = table_start
    value_end = len(area)
    for entry, (index, suffix) in zip(entries, split, strict=True):
        size = len(entry.value)
        if size > XATTR_VALUE_MAX:
            raise XattrNoSpace(f"xattr value of {size} bytes is too large")
        value_offs = 0
        if entry.value_inum:
            if seed is None:
                raise ValueError("an EA inode value needs the filesystem checksum seed")
            hash_ = entry_hash(suffix, _WORD.pack(ea_inode_hash(seed, entry.value)))
        else:
            if size:
                value_end -= _padded(size)
                area[value_end : value_end + size] = entry.value
                value_offs = value_end - value_base
            hash_ = entry_hash(suffix, entry.value) if hash_values else 0
        _ENTRY.pack_into(area, pos, len(suffix), index, value_offs, entry.value_inum, size, hash_)
        area[pos + _ENTRY.size : pos + _ENTRY.size + len(suffix)] = suffix
        pos += _padded(_ENTRY.size + len(suffix))
        hashes.append(hash_)
    return hashes


def _padded(size: int) -> int:
    return (size + 3) & ~3
