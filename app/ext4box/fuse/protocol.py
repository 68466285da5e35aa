"""What the FUSE kernel protocol's messages look like on /dev/fuse.

Our own declarations of the structures, opcodes and flags of linux/fuse.h
(protocol 7.38, what the installed header describes; the 6.18 kernel speaks a
newer minor and answers in the older one we name in INIT). Each structure is
declared once as a `Layout`: its C name, its fields in order, and a
precompiled little-endian `struct.Struct`. tests/fuse/test_protocol_layouts.py
compiles a C program against /usr/include/linux/fuse.h and checks every size
and field offset declared here.

Nested structures (fuse_entry_out's `attr`) are flattened into dotted field
names, so one unpack yields every scalar. Padding and reserved arrays are
named fields whose format ends in "x": they are checked for their offset and
skipped by pack/unpack.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38
ROOT_ID = 1
# The kernel refuses a read buffer smaller than this.
MIN_READ_BUFFER = 8192
# The longest name the kernel passes in a request (fs/fuse: FUSE_NAME_MAX).
KERNEL_NAME_MAX = 1024


class Layout:
    """One C structure: `name`, ordered (field, format) pairs, a compiled Struct."""

    __slots__ = ("fields", "name", "pack", "pack_into", "size", "struct", "unpack_from")

    def __init__(self, name: str, fields: tuple[tuple[str, str], ...]) -> None:
        self.name = name
        self.fields = fields
        self.struct = struct.Struct("<" + "".join(fmt for _, fmt in fields))
        self.size = self.struct.size
        # Bound once: the request loop calls these for every message.
        self.pack = self.struct.pack
        self.pack_into = self.struct.pack_into
        self.unpack_from = self.struct.unpack_from

    def offsets(self) -> dict[str, int]:
        """Field name → byte offset (every field naturally aligned, as in C)."""
        out, prefix = {}, "<"
        for field, fmt in self.fields:
            out[field] = struct.calcsize(prefix)
            prefix += fmt
        return out

    def value_names(self) -> tuple[str, ...]:
        """Names of the values pack takes and unpack returns (padding left out)."""
        return tuple(field for field, fmt in self.fields if not fmt.endswith("x"))


def _nested(prefix: str, layout: Layout) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}.{field}", fmt) for field, fmt in layout.fields)


# -- shared pieces -----------------------------------------------------------

ATTR = Layout("fuse_attr", (
    ("ino", "Q"), ("size", "Q"), ("blocks", "Q"),
    ("atime", "Q"), ("mtime", "Q"), ("ctime", "Q"),
    ("atimensec", "I"), ("mtimensec", "I"), ("ctimensec", "I"),
    ("mode", "I"), ("nlink", "I"), ("uid", "I"), ("gid", "I"), ("rdev", "I"),
    ("blksize", "I"), ("flags", "I"),
))  # fmt: skip
KSTATFS = Layout("fuse_kstatfs", (
    ("blocks", "Q"), ("bfree", "Q"), ("bavail", "Q"), ("files", "Q"), ("ffree", "Q"),
    ("bsize", "I"), ("namelen", "I"), ("frsize", "I"), ("padding", "4x"), ("spare", "24x"),
))  # fmt: skip

# -- headers -----------------------------------------------------------------

IN_HEADER = Layout("fuse_in_header", (
    ("len", "I"), ("opcode", "I"), ("unique", "Q"), ("nodeid", "Q"),
    ("uid", "I"), ("gid", "I"), ("pid", "I"), ("total_extlen", "H"), ("padding", "2x"),
))  # fmt: skip
OUT_HEADER = Layout("fuse_out_header", (("len", "I"), ("error", "i"), ("unique", "Q")))

# -- replies carrying attributes ---------------------------------------------

ENTRY_OUT = Layout("fuse_entry_out", (
    ("nodeid", "Q"), ("generation", "Q"), ("entry_valid", "Q"), ("attr_valid", "Q"),
    ("entry_valid_nsec", "I"), ("attr_valid_nsec", "I"), *_nested("attr", ATTR),
))  # fmt: skip
ATTR_OUT = Layout("fuse_attr_out", (
    ("attr_valid", "Q"), ("attr_valid_nsec", "I"), ("dummy", "4x"), *_nested("attr", ATTR),
))  # fmt: skip
OPEN_OUT = Layout("fuse_open_out", (("fh", "Q"), ("open_flags", "I"), ("padding", "4x")))
WRITE_OUT = Layout("fuse_write_out", (("size", "I"), ("padding", "4x")))
STATFS_OUT = Layout("fuse_statfs_out", _nested("st", KSTATFS))
GETXATTR_OUT = Layout("fuse_getxattr_out", (("size", "I"), ("padding", "4x")))
LSEEK_OUT = Layout("fuse_lseek_out", (("offset", "Q"),))

# Directory listings: a fixed part, then the name padded to 8 bytes.
DIRENT = Layout("fuse_dirent", (("ino", "Q"), ("off", "Q"), ("namelen", "I"), ("type", "I")))
DIRENTPLUS = Layout("fuse_direntplus", (
    *_nested("entry_out", ENTRY_OUT), *_nested("dirent", DIRENT),
))  # fmt: skip

# -- requests ----------------------------------------------------------------

INIT_IN = Layout("fuse_init_in", (
    ("major", "I"), ("minor", "I"), ("max_readahead", "I"), ("flags", "I"), ("flags2", "I"),
    ("unused", "44x"),
))  # fmt: skip
# Kernels before 7.36 send only major, minor, max_readahead and flags.
INIT_IN_COMPAT_SIZE = 16
INIT_OUT = Layout("fuse_init_out", (
    ("major", "I"), ("minor", "I"), ("max_readahead", "I"), ("flags", "I"),
    ("max_background", "H"), ("congestion_threshold", "H"), ("max_write", "I"),
    ("time_gran", "I"), ("max_pages", "H"), ("map_alignment", "H"), ("flags2", "I"),
    ("unused", "28x"),
))  # fmt: skip
FORGET_IN = Layout("fuse_forget_in", (("nlookup", "Q"),))
FORGET_ONE = Layout("fuse_forget_one", (("nodeid", "Q"), ("nlookup", "Q")))
BATCH_FORGET_IN = Layout("fuse_batch_forget_in", (("count", "I"), ("dummy", "4x")))
GETATTR_IN = Layout("fuse_getattr_in", (("getattr_flags", "I"), ("dummy", "4x"), ("fh", "Q")))
SETATTR_IN = Layout("fuse_setattr_in", (
    ("valid", "I"), ("padding", "4x"), ("fh", "Q"), ("size", "Q"), ("lock_owner", "Q"),
    ("atime", "Q"), ("mtime", "Q"), ("ctime", "Q"),
    ("atimensec", "I"), ("mtimensec", "I"), ("ctimensec", "I"), ("mode", "I"),
    ("unused4", "4x"), ("uid", "I"), ("gid", "I"), ("unused5", "4x"),
))  # fmt: skip
MKNOD_IN = Layout("fuse_mknod_in", (
    ("mode", "I"), ("rdev", "I"), ("umask", "I"), ("padding", "4x"),
))  # fmt: skip
MKDIR_IN = Layout("fuse_mkdir_in", (("mode", "I"), ("umask", "I")))
RENAME_IN = Layout("fuse_rename_in", (("newdir", "Q"),))
RENAME2_IN = Layout("fuse_rename2_in", (("newdir", "Q"), ("flags", "I"), ("padding", "4x")))
LINK_IN = Layout("fuse_link_in", (("oldnodeid", "Q"),))
OPEN_IN = Layout("fuse_open_in", (("flags", "I"), ("open_flags", "I")))
CREATE_IN = Layout("fuse_create_in", (
    ("flags", "I"), ("mode", "I"), ("umask", "I"), ("open_flags", "I"),
))  # fmt: skip
RELEASE_IN = Layout("fuse_release_in", (
    ("fh", "Q"), ("flags", "I"), ("release_flags", "I"), ("lock_owner", "Q"),
))  # fmt: skip
FLUSH_IN = Layout("fuse_flush_in", (
    ("fh", "Q"), ("unused", "4x"), ("padding", "4x"), ("lock_owner", "Q"),
))  # fmt: skip
READ_IN = Layout("fuse_read_in", (
    ("fh", "Q"), ("offset", "Q"), ("size", "I"), ("read_flags", "I"), ("lock_owner", "Q"),
    ("flags", "I"), ("padding", "4x"),
))  # fmt: skip
WRITE_IN = Layout("fuse_write_in", (
    ("fh", "Q"), ("offset", "Q"), ("size", "I"), ("write_flags", "I"), ("lock_owner", "Q"),
    ("flags", "I"), ("padding", "4x"),
))  # fmt: skip
FSYNC_IN = Layout("fuse_fsync_in", (("fh", "Q"), ("fsync_flags", "I"), ("padding", "4x")))
SETXATTR_IN = Layout("fuse_setxattr_in", (
    ("size", "I"), ("flags", "I"), ("setxattr_flags", "I"), ("padding", "4x"),
))  # fmt: skip
# Without FUSE_SETXATTR_EXT the kernel sends only size and flags.
SETXATTR_IN_COMPAT_SIZE = 8
GETXATTR_IN = Layout("fuse_getxattr_in", (("size", "I"), ("padding", "4x")))
ACCESS_IN = Layout("fuse_access_in", (("mask", "I"), ("padding", "4x")))
INTERRUPT_IN = Layout("fuse_interrupt_in", (("unique", "Q"),))
FALLOCATE_IN = Layout("fuse_fallocate_in", (
    ("fh", "Q"), ("offset", "Q"), ("length", "Q"), ("mode", "I"), ("padding", "4x"),
))  # fmt: skip
LSEEK_IN = Layout("fuse_lseek_in", (
    ("fh", "Q"), ("offset", "Q"), ("whence", "I"), ("padding", "4x"),
))  # fmt: skip
COPY_FILE_RANGE_IN = Layout("fuse_copy_file_range_in", (
    ("fh_in", "Q"), ("off_in", "Q"), ("nodeid_out", "Q"), ("fh_out", "Q"), ("off_out", "Q"),
    ("len", "Q"), ("flags", "Q"),
))  # fmt: skip
SYNCFS_IN = Layout("fuse_syncfs_in", (("padding", "8x"),))
IOCTL_IN = Layout("fuse_ioctl_in", (
    ("fh", "Q"), ("flags", "I"), ("cmd", "I"), ("arg", "Q"), ("in_size", "I"),
    ("out_size", "I"),
))  # fmt: skip
IOCTL_OUT = Layout("fuse_ioctl_out", (
    ("result", "i"), ("flags", "I"), ("in_iovs", "I"), ("out_iovs", "I"),
))  # fmt: skip

# -- newer than the installed header (7.38) ----------------------------------
# The 6.18 kernel sends STATX (7.39) and COPY_FILE_RANGE_64 (7.45) whatever
# minor INIT answered. These layouts are left out of LAYOUTS (the header cannot
# check them); the kernel checks them instead: it takes a reply only if its
# length is exactly the structure's, and tests/rw/test_rw_file_ranges.py compares
# what it then reports with the kernel's own ext4.

# fuse_copy_file_range_out: the bytes copied, as a u64.
COPY_FILE_RANGE_OUT = Layout("fuse_copy_file_range_out", (("bytes_copied", "Q"),))
STATX_IN = Layout("fuse_statx_in", (
    ("getattr_flags", "I"), ("reserved", "4x"), ("fh", "Q"), ("sx_flags", "I"), ("sx_mask", "I"),
))  # fmt: skip
SX_TIME = Layout("fuse_sx_time", (("tv_sec", "q"), ("tv_nsec", "I"), ("reserved", "4x")))
STATX = Layout("fuse_statx", (
    ("mask", "I"), ("blksize", "I"), ("attributes", "Q"), ("nlink", "I"), ("uid", "I"),
    ("gid", "I"), ("mode", "H"), ("spare0", "2x"), ("ino", "Q"), ("size", "Q"),
    ("blocks", "Q"), ("attributes_mask", "Q"), *_nested("atime", SX_TIME),
    *_nested("btime", SX_TIME), *_nested("ctime", SX_TIME), *_nested("mtime", SX_TIME),
    ("rdev_major", "I"), ("rdev_minor", "I"), ("dev_major", "I"), ("dev_minor", "I"),
    ("spare2", "112x"),
))  # fmt: skip
STATX_OUT = Layout("fuse_statx_out", (
    ("attr_valid", "Q"), ("attr_valid_nsec", "I"), ("flags", "I"), ("spare", "16x"),
    *_nested("stat", STATX),
))  # fmt: skip
NEWER_LAYOUTS = (COPY_FILE_RANGE_OUT, STATX_IN, SX_TIME, STATX, STATX_OUT)

# -- notifications (unique 0, error = the notify code) -----------------------

NOTIFY_INVAL_INODE_OUT = Layout("fuse_notify_inval_inode_out", (
    ("ino", "Q"), ("off", "q"), ("len", "q"),
))  # fmt: skip
NOTIFY_INVAL_ENTRY_OUT = Layout("fuse_notify_inval_entry_out", (
    ("parent", "Q"), ("namelen", "I"), ("flags", "I"),
))  # fmt: skip

# Every layout, for the header check.
LAYOUTS: tuple[Layout, ...] = tuple(
    value for value in list(globals().values())
    if isinstance(value, Layout) and value not in NEWER_LAYOUTS
)


class Opcode(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52  # protocol 7.39, newer than the installed header
    # Protocol 7.45, newer than the installed header (see NEWER_THAN_HEADER):
    # the 6.18 kernel sends it first for every copy_file_range, and falls
    # back to COPY_FILE_RANGE for good once answered ENOSYS.
    COPY_FILE_RANGE_64 = 53


# Opcodes this module names that /usr/include/linux/fuse.h (7.38) does not.
NEWER_THAN_HEADER = frozenset({Opcode.STATX, Opcode.COPY_FILE_RANGE_64})


class NotifyCode(IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6


# -- INIT flags (fuse_init_in/out.flags; bits 32..63 travel in flags2) ------


class InitFlag(IntFlag):
    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    HAS_EXPIRE_ONLY = 1 << 35


def flag_names(flags: int) -> list[str]:
    """The INIT flag names set in `flags`, lowest bit first (unknown bits as hex)."""
    out = []
    for bit in range(64):
        if flags >> bit & 1:
            name = InitFlag(1 << bit).name
            out.append(name if name is not None else hex(1 << bit))
    return out


# -- per-request flags ---------------------------------------------------------

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5

# fuse_open_in.open_flags / fuse_create_in.open_flags
OPEN_KILL_SUIDGID = 1 << 0
# fuse_write_in.write_flags
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
# fuse_setxattr_in.setxattr_flags
SETXATTR_ACL_KILL_SGID = 1 << 0
# fuse_getattr_in.getattr_flags
GETATTR_FH = 1 << 0
# fuse_fsync_in.fsync_flags
FSYNC_FDATASYNC = 1 << 0

# fuse_ioctl_in.flags
IOCTL_COMPAT = 1 << 0
IOCTL_UNRESTRICTED = 1 << 1
IOCTL_RETRY = 1 << 2
IOCTL_32BIT = 1 << 3
IOCTL_DIR = 1 << 4

# statx(2) mask bits (linux/stat.h) a STATX reply sets.
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800
