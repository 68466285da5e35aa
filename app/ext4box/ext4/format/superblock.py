"""The ext4 superblock: parse, validate, and derive the geometry everything else uses."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ext4box.ext4.format import features as F
from ext4box.ext4.format.checksum import crc32c_raw, ext4_csum_seed
from ext4box.ext4.format.errors import Corrupt, NotExt4, Unsupported

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT4_MAGIC = 0xEF53
GOOD_OLD_INODE_SIZE = 128
GOOD_OLD_FIRST_INO = 11
DYNAMIC_REV = 1
CHECKSUM_TYPE_CRC32C = 1

# s_flags
FLAG_SIGNED_HASH = 0x1
FLAG_UNSIGNED_HASH = 0x2

# s_state
STATE_VALID = 0x1
STATE_ERROR = 0x2
STATE_ORPHAN = 0x4

# One declaration of the on-disk layout, in order; "x"/"Ns" pads are unnamed.
_LAYOUT: tuple[tuple[str | None, str], ...] = (
    ("inodes_count", "I"),
    ("blocks_count_lo", "I"),
    ("r_blocks_count_lo", "I"),
    ("free_blocks_count_lo", "I"),
    ("free_inodes_count", "I"),
    ("first_data_block", "I"),
    ("log_block_size", "I"),
    ("log_cluster_size", "I"),
    ("blocks_per_group", "I"),
    ("clusters_per_group", "I"),
    ("inodes_per_group", "I"),
    ("mtime_lo", "I"),
    ("wtime_lo", "I"),
    ("mnt_count", "H"),
    ("max_mnt_count", "h"),
    ("magic", "H"),
    ("state", "H"),
    ("errors", "H"),
    ("minor_rev_level", "H"),
    ("lastcheck_lo", "I"),
    ("checkinterval", "I"),
    ("creator_os", "I"),
    ("rev_level", "I"),
    ("def_resuid", "H"),
    ("def_resgid", "H"),
    ("first_ino", "I"),
    ("inode_size", "H"),
    ("block_group_nr", "H"),
    ("feature_compat", "I"),
    ("feature_incompat", "I"),
    ("feature_ro_compat", "I"),
    ("uuid", "16s"),
    ("volume_name", "16s"),
    ("last_mounted", "64s"),
    ("algorithm_usage_bitmap", "I"),
    ("prealloc_blocks", "B"),
    ("prealloc_dir_blocks", "B"),
    ("reserved_gdt_blocks", "H"),
    ("journal_uuid", "16s"),
    ("journal_inum", "I"),
    ("journal_dev", "I"),
    ("last_orphan", "I"),
    ("hash_seed", "16s"),
    ("def_hash_version", "B"),
    ("jnl_backup_type", "B"),
    ("desc_size", "H"),
    ("default_mount_opts", "I"),
    ("first_meta_bg", "I"),
    ("mkfs_time_lo", "I"),
    ("jnl_blocks", "68s"),
    ("blocks_count_hi", "I"),
    ("r_blocks_count_hi", "I"),
    ("free_blocks_count_hi", "I"),
    ("min_extra_isize", "H"),
    ("want_extra_isize", "H"),
    ("flags", "I"),
    ("raid_stride", "H"),
    ("mmp_interval", "H"),
    ("mmp_block", "Q"),
    ("raid_stripe_width", "I"),
    ("log_groups_per_flex", "B"),
    ("checksum_type", "B"),
    ("encryption_level", "B"),
    (None, "x"),
    ("kbytes_written", "Q"),
    ("snapshot_inum", "I"),
    ("snapshot_id", "I"),
    ("snapshot_r_blocks_count", "Q"),
    ("snapshot_list", "I"),
    ("error_count", "I"),
    ("first_error_time_lo", "I"),
    ("first_error_ino", "I"),
    ("first_error_block", "Q"),
    ("first_error_func", "32s"),
    ("first_error_line", "I"),
    ("last_error_time_lo", "I"),
    ("last_error_ino", "I"),
    ("last_error_line", "I"),
    ("last_error_block", "Q"),
    ("last_error_func", "32s"),
    ("mount_opts", "64s"),
    ("usr_quota_inum", "I"),
    ("grp_quota_inum", "I"),
    ("overhead_clusters", "I"),
    ("backup_bg0", "I"),
    ("backup_bg1", "I"),
    ("encrypt_algos", "4s"),
    ("encrypt_pw_salt", "16s"),
    ("lpf_ino", "I"),
    ("prj_quota_inum", "I"),
    ("checksum_seed", "I"),
    ("wtime_hi", "B"),
    ("mtime_hi", "B"),
    ("mkfs_time_hi", "B"),
    ("lastcheck_hi", "B"),
    ("first_error_time_hi", "B"),
    ("last_error_time_hi", "B"),
    ("first_error_errcode", "B"),
    ("last_error_errcode", "B"),
    ("encoding", "H"),
    ("encoding_flags", "H"),
    ("orphan_file_inum", "I"),
    (None, "376x"),
    ("checksum", "I"),
)

_STRUCT = struct.Struct("<" + "".join(fmt for _, fmt in _LAYOUT))
_FIELDS = tuple(name for name, fmt in _LAYOUT if name is not None)
CHECKSUM_OFFSET = SUPERBLOCK_SIZE - 4
assert _STRUCT.size == SUPERBLOCK_SIZE


def field_span(name: str) -> tuple[int, int]:
    """(offset, size) of raw field `name` in the 1024 superblock bytes (for code that
    edits a copy, such as a backup superblock, without re-encoding it)."""
    offset = 0
    for field, fmt in _LAYOUT:
        size = struct.calcsize("<" + fmt)
        if field == name:
            return offset, size
        offset += size
    raise KeyError(f"no superblock field {name!r}")


@dataclass(frozen=True, slots=True)
class Superblock:
    """Every superblock field, as stored, plus derived geometry (see `parse`)."""

    raw: bytes
    fields: dict[str, int | bytes]
    block_size: int
    cluster_size: int
    blocks_count: int
    r_blocks_count: int
    free_blocks_count: int
    group_count: int
    desc_size: int
    csum_seed: int | None  # filesystem-wide seed when metadata_csum is on
    hash_seed: tuple[int, int, int, int]

    def __getattr__(self, name: str) -> int | bytes:
        # Raw fields by name (sb.inodes_per_group...), without a property each.
        try:
            return object.__getattribute__(self, "fields")[name]
        except KeyError:
            raise AttributeError(name) from None

    # Feature predicates the rest of the engine asks about.
    def has_incompat(self, mask: int) -> bool:
        return bool(self.fields["feature_incompat"] & mask)

    def has_ro_compat(self, mask: int) -> bool:
        return bool(self.fields["feature_ro_compat"] & mask)

    def has_compat(self, mask: int) -> bool:
        return bool(self.fields["feature_compat"] & mask)

    @property
    def metadata_csum(self) -> bool:
        return self.has_ro_compat(F.RO_COMPAT_METADATA_CSUM)

    @property
    def gdt_csum(self) -> bool:
        return self.has_ro_compat(F.RO_COMPAT_GDT_CSUM) and not self.metadata_csum

    @property
    def is_64bit(self) -> bool:
        return self.has_incompat(F.INCOMPAT_64BIT)

    @property
    def unsigned_hash(self) -> bool:
        return bool(self.fields["flags"] & FLAG_UNSIGNED_HASH)

    @property
    def inodes_per_group(self) -> int:
        return int(self.fields["inodes_per_group"])

    @property
    def inode_size(self) -> int:
        return int(self.fields["inode_size"])

    @property
    def first_data_block(self) -> int:
        return int(self.fields["first_data_block"])

    @property
    def blocks_per_group(self) -> int:
        return int(self.fields["blocks_per_group"])

    @property
    def inodes_count(self) -> int:
        return int(self.fields["inodes_count"])

    @property
    def free_inodes_count(self) -> int:
        return int(self.fields["free_inodes_count"])

    @property
    def first_ino(self) -> int:
        return int(self.fields["first_ino"])

    @property
    def uuid(self) -> bytes:
        return bytes(self.fields["uuid"])  # type: ignore[arg-type]

    @property
    def volume_name(self) -> str:
        raw = bytes(self.fields["volume_name"])  # type: ignore[arg-type]
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def incompat_unsupported(self) -> list[str]:
        bits = int(self.fields["feature_incompat"]) & ~F.INCOMPAT_READ_SUPPORTED
        return F.incompat_names(bits)

    def ro_compat_unknown(self) -> list[str]:
        bits = int(self.fields["feature_ro_compat"]) & ~F.RO_COMPAT_KNOWN
        return F.ro_compat_names(bits)

    def feature_names(self) -> list[str]:
        return (
            F.compat_names(int(self.fields["feature_compat"]))
            + F.incompat_names(int(self.fields["feature_incompat"]))
            + F.ro_compat_names(int(self.fields["feature_ro_compat"]))
        )

    def group_has_super(self, group: int) -> bool:
        """Whether `group` holds a superblock backup (and so a GDT copy)."""
        if group == 0:
            return True
        if self.has_compat(F.COMPAT_SPARSE_SUPER2):
            return group in (self.fields["backup_bg0"], self.fields["backup_bg1"])
        if group <= 1 or not self.has_ro_compat(F.RO_COMPAT_SPARSE_SUPER):
            return True
        if not group & 1:
            return False
        return _is_power_of(group, 3) or _is_power_of(group, 5) or _is_power_of(group, 7)

    @classmethod
    def parse(cls, raw: bytes) -> Superblock:
        """Parse and validate the 1024 bytes at offset 1024 of the device."""
        if len(raw) < SUPERBLOCK_SIZE:
            raise NotExt4("device too small to hold an ext4 superblock")
        raw = bytes(raw[:SUPERBLOCK_SIZE])
        fields: dict[str, int | bytes] = dict(zip(_FIELDS, _STRUCT.unpack(raw), strict=True))
        if fields["magic"] != EXT4_MAGIC:
            raise NotExt4(f"no ext2/3/4 superblock (magic 0x{fields['magic']:04x})")

        def bad(why: str) -> Corrupt:
            return Corrupt("superblock", "block 0 offset 1024", why)

        ro_compat = int(fields["feature_ro_compat"])
        incompat = int(fields["feature_incompat"])
        if ro_compat & F.RO_COMPAT_METADATA_CSUM:
            if fields["checksum_type"] != CHECKSUM_TYPE_CRC32C:
                raise bad(f"unknown checksum type {fields['checksum_type']}")
            want = crc32c_raw(0xFFFFFFFF, raw[:CHECKSUM_OFFSET])
            if want != fields["checksum"]:
                raise bad(f"checksum 0x{fields['checksum']:08x} != computed 0x{want:08x}")
        if incompat & F.INCOMPAT_JOURNAL_DEV:
            raise Unsupported(
                "journal_dev", detail="this is an external journal device, not a filesystem"
            )

        log_block = int(fields["log_block_size"])
        if log_block > 6:
            raise bad(f"block size 2^(10+{log_block}) outside 1 KiB..64 KiB")
        block_size = 1024 << log_block
        if ro_compat & F.RO_COMPAT_BIGALLOC:
            log_cluster = int(fields["log_cluster_size"])
            if log_cluster < log_block or log_cluster > log_block + 16:
                raise bad(f"cluster size log {log_cluster} invalid for block size log {log_block}")
            cluster_size = 1024 << log_cluster
        else:
            cluster_size = block_size

        rev = int(fields["rev_level"])
        if rev > DYNAMIC_REV:
            raise bad(f"revision {rev} unknown")
        if rev == 0:
            fields["inode_size"] = GOOD_OLD_INODE_SIZE
            fields["first_ino"] = GOOD_OLD_FIRST_INO
        inode_size = int(fields["inode_size"])
        if (
            inode_size < GOOD_OLD_INODE_SIZE
            or inode_size > block_size
            or inode_size & (inode_size - 1)
        ):
            raise bad(f"inode size {inode_size} invalid")
        if int(fields["first_ino"]) < GOOD_OLD_FIRST_INO:
            raise bad(f"first inode {fields['first_ino']} below 11")

        is_64 = bool(incompat & F.INCOMPAT_64BIT)
        blocks_count = int(fields["blocks_count_lo"])
        r_blocks = int(fields["r_blocks_count_lo"])
        free_blocks = int(fields["free_blocks_count_lo"])
        if is_64:
            blocks_count |= int(fields["blocks_count_hi"]) << 32
            r_blocks |= int(fields["r_blocks_count_hi"]) << 32
            free_blocks |= int(fields["free_blocks_count_hi"]) << 32
            desc_size = int(fields["desc_size"])
            if desc_size < 64 or desc_size > 1024 or desc_size & (desc_size - 1):
                raise bad(f"group descriptor size {desc_size} invalid for 64bit")
        else:
            desc_size = 32

        first_data_block = int(fields["first_data_block"])
        if first_data_block > (1 if block_size == 1024 else 0):
            raise bad(f"first data block {first_data_block} wrong for block size {block_size}")
        if blocks_count <= first_data_block:
            raise bad(f"block count {blocks_count} too small")

        blocks_per_group = int(fields["blocks_per_group"])
        clusters_per_group = int(fields["clusters_per_group"])
        ipg = int(fields["inodes_per_group"])
        bits_per_block = block_size * 8
        if cluster_size == block_size:
            if blocks_per_group == 0 or blocks_per_group > bits_per_block:
                raise bad(f"blocks per group {blocks_per_group} invalid")
        elif clusters_per_group == 0 or clusters_per_group > bits_per_block:
            raise bad(f"clusters per group {clusters_per_group} invalid")
        if ipg < block_size // inode_size or ipg > bits_per_block:
            raise bad(f"inodes per group {ipg} invalid")
        group_count = -(-(blocks_count - first_data_block) // blocks_per_group)
        if group_count * ipg != fields["inodes_count"]:
            raise bad(
                f"inode count {fields['inodes_count']} != {group_count} groups x {ipg} per group"
            )
        if int(fields["free_inodes_count"]) > int(fields["inodes_count"]):
            raise bad("more free inodes than inodes")

        if incompat & F.INCOMPAT_CSUM_SEED:
            csum_seed: int | None = int(fields["checksum_seed"])
        else:
            csum_seed = ext4_csum_seed(bytes(fields["uuid"]))  # type: ignore[arg-type]
        if not ro_compat & F.RO_COMPAT_METADATA_CSUM:
            csum_seed = None
        hash_seed: tuple[int, int, int, int] = struct.unpack("<4I", fields["hash_seed"])  # type: ignore[arg-type, assignment]

        return cls(
            raw=raw,
            fields=fields,
            block_size=block_size,
            cluster_size=cluster_size,
            blocks_count=blocks_count,
            r_blocks_count=r_blocks,
            free_blocks_count=free_blocks,
            group_count=group_count,
            desc_size=desc_size,
            csum_seed=csum_seed,
            hash_seed=hash_seed,
        )


def _is_power_of(value: int, base: int) -> bool:
    while value % base == 0 and value > 1:
        value //= base
    return value == 1


# Values wider than one on-disk field: name -> (low field, high field, low bits).
_SPLIT_FIELDS: dict[str, tuple[str, str, int]] = {
    "blocks_count": ("blocks_count_lo", "blocks_count_hi", 32),
    "r_blocks_count": ("r_blocks_count_lo", "r_blocks_count_hi", 32),
    "free_blocks_count": ("free_blocks_count_lo", "free_blocks_count_hi", 32),
    "mtime": ("mtime_lo", "mtime_hi", 32),
    "wtime": ("wtime_lo", "wtime_hi", 32),
    "mkfs_time": ("mkfs_time_lo", "mkfs_time_hi", 32),
    "lastcheck": ("lastcheck_lo", "lastcheck_hi", 32),
}


def encode_superblock(sb: Superblock, changes: dict[str, int | bytes]) -> bytes:
    """The 1024 superblock bytes of `sb` with `changes` applied and the checksum set.

    `changes` names raw fields (`state`, `mnt_count`...) or the split values
    `free_blocks_count`, `wtime`, `mtime`... which are spread over their lo/hi
    fields (the hi half only on 64bit for block counts). Everything else is
    taken from `sb.raw` unchanged, so the encoding of an unchanged superblock
    is byte-identical to what was read.
    """
    fields: dict[str, int | bytes] = dict(zip(_FIELDS, _STRUCT.unpack(sb.raw), strict=True))
    for name, value in changes.items():
        split = _SPLIT_FIELDS.get(name)
        if split is None:
            if name not in fields:
                raise KeyError(f"no superblock field {name!r}")
            fields[name] = value
            continue
        lo_name, hi_name, lo_bits = split
        assert isinstance(value, int)
        is_count = name.endswith("_count")
        hi_bits = 32 if is_count else 8
        if is_count and not sb.is_64bit:
            hi_bits = 0
        if value < 0 or value >> (lo_bits + hi_bits):
            raise ValueError(f"superblock {name} {value} does not fit its fields")
        fields[lo_name] = value & ((1 << lo_bits) - 1)
        if hi_bits:
            fields[hi_name] = value >> lo_bits
    raw = bytearray(_STRUCT.pack(*(fields[name] for name in _FIELDS)))
    if sb.metadata_csum:
        struct.pack_into("<I", raw, CHECKSUM_OFFSET, crc32c_raw(0xFFFFFFFF, raw[:CHECKSUM_OFFSET]))
    return bytes(raw)


def mount_changes(sb: Superblock, now: int) -> dict[str, int | bytes]:
    """What a read-write mount without a journal records, as the kernel does:
    the filesystem is marked not clean until unmount, and the mount counted."""
    max_mnt = int(sb.fields["max_mnt_count"])
    changes: dict[str, int | bytes] = {
        "state": int(sb.fields["state"]) & ~STATE_VALID,
        "mnt_count": (int(sb.fields["mnt_count"]) + 1) & 0xFFFF,
        "mtime": now,
        "wtime": now,
    }
    if max_mnt == 0:
        changes["max_mnt_count"] = -1  # "no limit", as the kernel sets it
    return changes


def clean_unmount_changes(sb: Superblock, now: int) -> dict[str, int | bytes]:
    """Mark the filesystem clean again (unless an error was recorded meanwhile)."""
    state = int(sb.fields["state"])
    if not state & STATE_ERROR:
        state |= STATE_VALID
    return {"state": state, "wtime": now}
