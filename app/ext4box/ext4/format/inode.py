"""One inode: its fields, timestamps, device number and checksum."""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

from ext4box.ext4.format.checksum import crc32c_raw, inode_csum_seed
from ext4box.ext4.format.errors import Corrupt, inode_where

ROOT_INO = 2
GOOD_OLD_INODE_SIZE = 128
I_BLOCK_SIZE = 60

# i_flags
FL_IMMUTABLE = 0x10
FL_APPEND = 0x20
FL_ENCRYPT = 0x800
FL_INDEX = 0x1000
FL_HUGE_FILE = 0x40000
FL_EXTENTS = 0x80000
FL_VERITY = 0x100000
FL_EA_INODE = 0x200000
FL_INLINE_DATA = 0x10000000
FL_CASEFOLD = 0x40000000

# The fixed 128-byte part. i_block is kept as raw bytes: its meaning depends on
# the flags (extent root, block map, inline data, fast symlink, device number).
# osd2 (the last 12 bytes) for Linux: blocks_high, file_acl_high, uid_high,
# gid_high, checksum_lo, reserved.
_BASE_OSD2 = struct.Struct("<HHIiiiIHHIII60sIIIIHHHHHH")
_SEED_WORDS = struct.Struct("<II")  # inode number, generation: the per-inode seed
_EXTRA_ISIZE = struct.Struct("<HH")
# Every field of _EXTRA_FIELDS at once (extra_isize, then checksum_hi .. projid):
# the common 32-byte extra part in one unpack instead of one per field.
_EXTRA_ALL = struct.Struct("<HHIIIiIII")
_EXTRA_ALL_ISIZE = _EXTRA_ALL.size  # 32
_CHECKSUM_LO_OFFSET = 0x7C
_CHECKSUM_HI_OFFSET = 0x82
# Offsets of the optional fields after the 128 bytes, relative to offset 128:
# each exists only if i_extra_isize covers its end.
_EXTRA_FIELDS = {
    "checksum_hi": (2, "<H"),
    "ctime_extra": (4, "<I"),
    "mtime_extra": (8, "<I"),
    "atime_extra": (12, "<I"),
    "crtime": (16, "<i"),
    "crtime_extra": (20, "<I"),
    "version_hi": (24, "<I"),
    "projid": (28, "<I"),
}


@dataclass(frozen=True, slots=True)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    links_count: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    crtime_ns: int
    dtime: int
    blocks_512: int  # st_blocks
    flags: int
    generation: int
    file_acl: int  # external xattr block, 0 if none
    i_block: bytes
    extra_isize: int
    projid: int
    raw: bytes  # the whole on-disk inode (inode_size bytes)
    csum_seed: int | None  # per-inode seed for extent/dir/xattr checksums

    @property
    def file_type(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_device(self) -> bool:
        return stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode)

    @property
    def has_inline_data(self) -> bool:
        return bool(self.flags & FL_INLINE_DATA)

    @property
    def uses_extents(self) -> bool:
        return bool(self.flags & FL_EXTENTS)

    @property
    def is_indexed(self) -> bool:
        return bool(self.flags & FL_INDEX)

    @property
    def is_encrypted(self) -> bool:
        return bool(self.flags & FL_ENCRYPT)

    @property
    def is_casefold(self) -> bool:
        return bool(self.flags & FL_CASEFOLD)

    @property
    def is_verity(self) -> bool:
        return bool(self.flags & FL_VERITY)

    @property
    def stat_blocks(self) -> int:
        """st_blocks as ext4 reports it: an inline-data file owns no blocks, yet
        the kernel counts its bytes so tools don't take it for a sparse file."""
        if self.is_reg and self.has_inline_data:
            return self.blocks_512 + ((self.size + 511) >> 9)
        return self.blocks_512

    @property
    def ibody_xattr_area(self) -> bytes:
        """The in-inode extended attribute area (may be empty)."""
        start = GOOD_OLD_INODE_SIZE + self.extra_isize
        return self.raw[start:] if start < len(self.raw) else b""

    @property
    def rdev(self) -> int:
        """Device number of a char/block device, as os.makedev builds it."""
        if not self.is_device:
            return 0
        old, new = struct.unpack_from("<II", self.i_block, 0)
        if old:
            return os.makedev((old >> 8) & 0xFF, old & 0xFF)
        major = (new & 0xFFF00) >> 8
        minor = (new & 0xFF) | ((new >> 12) & 0xFFF00)
        return os.makedev(major, minor)

    @classmethod
    def parse(
        cls,
        raw: bytes,
        ino: int,
        *,
        fs_csum_seed: int | None,
        huge_file: bool,
        block_size: int,
    ) -> Inode:
        """Parse one on-disk inode of len(raw) == inode_size bytes.

        fs_csum_seed is the filesystem checksum seed when metadata_csum is on.
        (Every cold lookup, getattr and readdirplus entry runs this: one unpack
        for the 128 bytes and one for the usual 32 extra bytes, and error texts
        built only when raised.)
        """
        (
            mode,
            uid_lo,
            size_lo,
            atime,
            ctime,
            mtime,
            dtime,
            gid_lo,
            links,
            blocks_lo,
            flags,
            _osd1,
            i_block,
            generation,
            file_acl_lo,
            size_hi,
            _faddr,
            blocks_hi,
            file_acl_hi,
            uid_hi,
            gid_hi,
            csum_lo,
            _reserved,
        ) = _BASE_OSD2.unpack_from(raw, 0)
        inode_size = len(raw)
        extra_isize = 0
        csum_hi = ctime_extra = mtime_extra = atime_extra = None
        crtime_ns = projid = 0
        if inode_size > GOOD_OLD_INODE_SIZE:
            (extra_isize,) = _EXTRA_ISIZE.unpack_from(raw, GOOD_OLD_INODE_SIZE)[:1]
            if extra_isize & 3 or GOOD_OLD_INODE_SIZE + extra_isize > inode_size:
                raise Corrupt("inode", inode_where(ino), f"extra_isize {extra_isize} invalid")
            if extra_isize >= _EXTRA_ALL_ISIZE:
                (
                    _isize,
                    csum_hi,
                    ctime_extra,
                    mtime_extra,
                    atime_extra,
                    crtime,
                    crtime_extra,
                    _version_hi,
                    projid,
                ) = _EXTRA_ALL.unpack_from(raw, GOOD_OLD_INODE_SIZE)
                crtime_ns = _time_ns(crtime, crtime_extra)
            elif extra_isize > 2:
                extra = _short_extra(raw, extra_isize)
                csum_hi = extra.get("checksum_hi")
                ctime_extra = extra.get("ctime_extra")
                mtime_extra = extra.get("mtime_extra")
                atime_extra = extra.get("atime_extra")
                if "crtime" in extra:
                    crtime_ns = _time_ns(extra["crtime"], extra.get("crtime_extra"))

        csum_seed = None
        if fs_csum_seed is not None:
            csum_seed = crc32c_raw(fs_csum_seed, _SEED_WORDS.pack(ino, generation))
            _verify_checksum(raw, csum_lo, csum_hi, csum_seed, ino)

        size = size_lo | (size_hi << 32)
        if size >= 1 << 63:
            raise Corrupt("inode", inode_where(ino), f"size {size} exceeds 2^63")
        if huge_file:
            blocks = blocks_lo | (blocks_hi << 32)
            blocks_512 = blocks * (block_size // 512) if flags & FL_HUGE_FILE else blocks
        else:
            blocks_512 = blocks_lo

        return cls(
            ino,
            mode,
            uid_lo | (uid_hi << 16),
            gid_lo | (gid_hi << 16),
            size,
            links,
            _time_ns(atime, atime_extra),
            _time_ns(mtime, mtime_extra),
            _time_ns(ctime, ctime_extra),
            crtime_ns,
            dtime,
            blocks_512,
            flags,
            generation,
            file_acl_lo | (file_acl_hi << 32),
            i_block,
            extra_isize,
            projid,
            bytes(raw),
            csum_seed,
        )


# Inode fields in declaration (= __init__) order, for the positional calls above
# and in `replace_inode`.
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Inode))
_FIELD_INDEX = {name: index for index, name in enumerate(_FIELD_NAMES)}
_ALL_FIELDS = operator.attrgetter(*_FIELD_NAMES)


def replace_inode(inode: Inode, **changes: Any) -> Inode:
    """`dataclasses.replace(inode, **changes)` at half the cost (no field
    introspection per call): every inode change of a request goes through one."""
    values = list(_ALL_FIELDS(inode))
    for name, value in changes.items():
        index = _FIELD_INDEX.get(name)
        if index is None:
            raise TypeError(f"Inode has no field {name!r}")
        values[index] = value
    return Inode(*values)


def _short_extra(raw: bytes, extra_isize: int) -> dict[str, int]:
    """The optional fields a short i_extra_isize (under 32 bytes) covers."""
    extra: dict[str, int] = {}
    for name, (offset, fmt) in _EXTRA_FIELDS.items():
        if offset + struct.calcsize(fmt) <= extra_isize:
            (extra[name],) = struct.unpack_from(fmt, raw, GOOD_OLD_INODE_SIZE + offset)
    return extra


def _time_ns(seconds: int, extra: int | None) -> int:
    """Seconds are signed 32-bit; the extra word adds 2 epoch bits and nanoseconds."""
    if extra is None:
        return seconds * 1_000_000_000
    seconds += (extra & 3) << 32
    nsec = extra >> 2
    if nsec > 999_999_999:
        nsec = 999_999_999
    return seconds * 1_000_000_000 + nsec


def inode_checksum(raw: bytes, csum_seed: int, has_hi: bool) -> int:
    """crc32c over the inode with both checksum fields taken as zero."""
    # One pass over a copy with the fields zeroed (the same bytes a chain of
    # slices would feed the crc): a single crc call per inode on the hot path.
    zeroed = bytearray(raw)
    zeroed[_CHECKSUM_LO_OFFSET : _CHECKSUM_LO_OFFSET + 2] = b"\0\0"
    if has_hi and len(raw) > GOOD_OLD_INODE_SIZE:
        zeroed[_CHECKSUM_HI_OFFSET : _CHECKSUM_HI_OFFSET + 2] = b"\0\0"
    return crc32c_raw(csum_seed, zeroed)


def _verify_checksum(
    raw: bytes, csum_lo: int, csum_hi: int | None, csum_seed: int, ino: int
) -> None:
    has_hi = csum_hi is not None
    crc = inode_checksum(raw, csum_seed, has_hi)
    if has_hi:
        stored = csum_lo | (csum_hi << 16)  # type: ignore[operator]
    else:
        stored = csum_lo
        crc &= 0xFFFF
    if crc != stored:
        raise Corrupt("inode", inode_where(ino), f"checksum 0x{stored:x} != computed 0x{crc:x}")


# Field offsets in the fixed 128-byte part, for writing back.
_MODE_UID = struct.Struct("<HHI")  # mode, uid_lo, size_lo at 0x00
_TIMES = struct.Struct("<iiiI")  # atime, ctime, mtime, dtime at 0x08
_GID_LINKS_BLOCKS_FLAGS = struct.Struct("<HHII")  # gid_lo, links, blocks_lo, flags at 0x18
_I_BLOCK_OFFSET = 0x28
_GEN_ACL_SIZEHI = struct.Struct("<III")  # generation, file_acl_lo, size_hi at 0x64
_OSD2_OFFSET = 0x74
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_S32_MIN, _S32_MAX = -(1 << 31), (1 << 31) - 1
# With the extra word: 2 epoch bits extend the signed 32-bit seconds to 34 bits.
_EXTRA_TIME_MAX = _S32_MAX + (3 << 32)
NS = 1_000_000_000


_OSD2_IDS = struct.Struct("<HHHH")  # blocks_high, file_acl_high, uid_high, gid_high
# The optional fields after offset 128 as (absolute offset, Struct), for writing.
_EXTRA_PACKERS = {
    name: (GOOD_OLD_INODE_SIZE + offset, struct.Struct(fmt))
    for name, (offset, fmt) in _EXTRA_FIELDS.items()
}


@functools.lru_cache(maxsize=64)
def _extra_present(extra_isize: int) -> frozenset[str]:
    """The optional fields an i_extra_isize covers (each must end inside it).
    Cached: an image uses one or two sizes, and every inode write asks."""
    return frozenset(
        name
        for name, (offset, fmt) in _EXTRA_FIELDS.items()
        if offset + struct.calcsize(fmt) <= extra_isize
    )


def encode_inode(
    inode: Inode, *, fs_csum_seed: int | None, huge_file: bool, block_size: int
) -> bytes:
    """The on-disk bytes of `inode`: its modelled fields written into a copy of
    `inode.raw`, so fields this code does not model (osd1, faddr, version,
    in-inode xattrs) survive unchanged; then the checksum, if metadata_csum.

    Change fields with `dataclasses.replace(inode, size=..., mtime_ns=...)`;
    the Inode stays frozen. (Every inode store runs this: layouts are
    precompiled and error texts built only when raised.)
    """
    raw = bytearray(inode.raw)
    ino = inode.ino
    if len(raw) < GOOD_OLD_INODE_SIZE or len(inode.i_block) != I_BLOCK_SIZE:
        raise ValueError(
            f"{inode_where(ino)}: raw of {len(raw)} bytes or i_block of {len(inode.i_block)}"
        )
    extra_isize = inode.extra_isize
    if len(raw) > GOOD_OLD_INODE_SIZE:
        if extra_isize & 3 or GOOD_OLD_INODE_SIZE + extra_isize > len(raw):
            raise ValueError(f"{inode_where(ino)}: extra_isize {extra_isize} invalid")
        _U16.pack_into(raw, GOOD_OLD_INODE_SIZE, extra_isize)
    else:
        extra_isize = 0
    present = _extra_present(extra_isize)

    def put_extra(name: str, value: int) -> None:
        offset, packer = _EXTRA_PACKERS[name]
        packer.pack_into(raw, offset, value)

    size, uid, gid, file_acl = inode.size, inode.uid, inode.gid, inode.file_acl
    if not 0 <= size < 1 << 63:
        raise ValueError(f"{inode_where(ino)}: size {size} out of range")
    if not 0 <= uid < 1 << 32 or not 0 <= gid < 1 << 32:
        raise ValueError(f"{inode_where(ino)}: uid/gid out of range")
    if not 0 <= file_acl < 1 << 48:
        raise ValueError(f"{inode_where(ino)}: file_acl {file_acl} out of range")

    blocks_lo, blocks_hi, flags = _encode_blocks(
        inode.blocks_512, inode.flags, huge_file, block_size, ino
    )

    _MODE_UID.pack_into(raw, 0x00, inode.mode & 0xFFFF, uid & 0xFFFF, size & 0xFFFFFFFF)
    atime, atime_extra = _encode_time(inode.atime_ns, "atime_extra" in present)
    ctime, ctime_extra = _encode_time(inode.ctime_ns, "ctime_extra" in present)
    mtime, mtime_extra = _encode_time(inode.mtime_ns, "mtime_extra" in present)
    if ctime_extra is not None:
        put_extra("ctime_extra", ctime_extra)
    if mtime_extra is not None:
        put_extra("mtime_extra", mtime_extra)
    if atime_extra is not None:
        put_extra("atime_extra", atime_extra)
    _TIMES.pack_into(raw, 0x08, atime, ctime, mtime, inode.dtime)
    _GID_LINKS_BLOCKS_FLAGS.pack_into(
        raw, 0x18, gid & 0xFFFF, inode.links_count, blocks_lo, flags
    )
    raw[_I_BLOCK_OFFSET : _I_BLOCK_OFFSET + I_BLOCK_SIZE] = inode.i_block
    _GEN_ACL_SIZEHI.pack_into(raw, 0x64, inode.generation, file_acl & 0xFFFFFFFF, size >> 32)
    # osd2: blocks_high, file_acl_high, uid_high, gid_high; checksum_lo and
    # the reserved word are left for the checksum step / as read.
    _OSD2_IDS.pack_into(raw, _OSD2_OFFSET, blocks_hi, file_acl >> 32, uid >> 16, gid >> 16)
    if "crtime" in present:
        seconds, extra = _encode_time(inode.crtime_ns, "crtime_extra" in present)
        put_extra("crtime", seconds)
        if extra is not None:
            put_extra("crtime_extra", extra)
    if "projid" in present:
        put_extra("projid", inode.projid)

    if fs_csum_seed is not None:
        has_hi = "checksum_hi" in present
        crc = inode_checksum(raw, inode_csum_seed(fs_csum_seed, ino, inode.generation), has_hi)
        _U16.pack_into(raw, _CHECKSUM_LO_OFFSET, crc & 0xFFFF)
        if has_hi:
            _U16.pack_into(raw, _CHECKSUM_HI_OFFSET, crc >> 16)
    return bytes(raw)


# Seconds (in ns) a timestamp with its extra word round-trips exactly: see _encode_time.
_EXACT_TIME_MIN = _S32_MIN * NS
_EXACT_TIME_END = (_EXTRA_TIME_MAX + 1) * NS


def inode_as_stored(inode: Inode, raw: bytes, *, fs_csum_seed: int | None) -> Inode | None:
    """What `Inode.parse(raw, ...)` returns for the `raw` that `encode_inode(inode)`
    just built, without parsing it again; None when encoding may have changed a
    value (a clamped time, a time without its extra word, huge_file block units,
    a short extra part), and the caller must parse.

    Within those bounds every field round-trips exactly: only `raw` and
    `csum_seed` (derived from ino and generation) can differ from `inode`.
    """
    if (
        inode.extra_isize < _EXTRA_ALL_ISIZE
        or len(raw) < GOOD_OLD_INODE_SIZE + _EXTRA_ALL_ISIZE
        or not 0 <= inode.mode <= 0xFFFF
        or inode.flags & FL_HUGE_FILE
        or not 0 <= inode.blocks_512 < 1 << 32
        or type(inode.i_block) is not bytes  # parse would hand back bytes
    ):
        return None
    for time_ns in (inode.atime_ns, inode.mtime_ns, inode.ctime_ns, inode.crtime_ns):
        if not _EXACT_TIME_MIN <= time_ns < _EXACT_TIME_END:
            return None
    values = list(_ALL_FIELDS(inode))
    values[_RAW_INDEX] = raw
    values[_CSUM_SEED_INDEX] = (
        None
        if fs_csum_seed is None
        else crc32c_raw(fs_csum_seed, _SEED_WORDS.pack(inode.ino, inode.generation))
    )
    return Inode(*values)


_RAW_INDEX = _FIELD_INDEX["raw"]
_CSUM_SEED_INDEX = _FIELD_INDEX["csum_seed"]


def _encode_time(time_ns: int, with_extra: bool) -> tuple[int, int | None]:
    """(signed 32-bit seconds, extra word or None), clamped to what fits, like the kernel."""
    seconds, nsec = divmod(time_ns, NS)
    if not with_extra:
        return min(max(seconds, _S32_MIN), _S32_MAX), None
    if seconds < _S32_MIN:
        seconds, nsec = _S32_MIN, 0
    elif seconds > _EXTRA_TIME_MAX:
        seconds, nsec = _EXTRA_TIME_MAX, NS - 1
    low = (seconds + (1 << 31)) % (1 << 32) - (1 << 31)  # the low 32 bits, signed
    epoch = ((seconds - low) >> 32) & 3
    return low, epoch | (nsec << 2)


def _encode_blocks(
    blocks_512: int, flags: int, huge_file: bool, block_size: int, ino: int
) -> tuple[int, int, int]:
    """i_blocks as (lo, hi, flags): 512-byte units while they fit in 48 bits,
    filesystem blocks with HUGE_FILE set only beyond that (huge_file feature)."""
    if blocks_512 < 0:
        raise ValueError(f"{inode_where(ino)}: negative block count")
    if blocks_512 < 1 << 32:
        return blocks_512, 0, flags & ~FL_HUGE_FILE
    if not huge_file:
        raise ValueError(f"{inode_where(ino)}: {blocks_512} sectors need the huge_file feature")
    if blocks_512 < 1 << 48:
        return blocks_512 & 0xFFFFFFFF, blocks_512 >> 32, flags & ~FL_HUGE_FILE
    units = blocks_512 // (block_size // 512)
    if units >= 1 << 48:
        raise ValueError(f"{inode_where(ino)}: {blocks_512} sectors exceed the huge_file limit")
    return units & 0xFFFFFFFF, units >> 32, flags | FL_HUGE_FILE


def blank_inode(
    ino: int, inode_size: int, *, fs_csum_seed: int | None, generation: int, extra_isize: int = 32
) -> Inode:
    """An all-zero inode (as a freshly zeroed inode table holds) ready to be
    filled in with `dataclasses.replace` and written with `encode_inode`."""
    extra = extra_isize if inode_size > GOOD_OLD_INODE_SIZE else 0
    extra = min(extra, inode_size - GOOD_OLD_INODE_SIZE) & ~3
    raw = bytearray(inode_size)
    if inode_size > GOOD_OLD_INODE_SIZE:
        _U16.pack_into(raw, GOOD_OLD_INODE_SIZE, extra)
    return Inode(
        ino=ino,
        mode=0,
        uid=0,
        gid=0,
        size=0,
        links_count=0,
        atime_ns=0,
        mtime_ns=0,
        ctime_ns=0,
        crtime_ns=0,
        dtime=0,
        blocks_512=0,
        flags=0,
        generation=generation,
        file_acl=0,
        i_block=bytes(I_BLOCK_SIZE),
        extra_isize=extra,
        projid=0,
        raw=bytes(raw),
        csum_seed=inode_csum_seed(fs_csum_seed, ino, generation)
        if fs_csum_seed is not None
        else None,
    )
