"""FUSE_INIT: which protocol features ext4box asks the kernel for, and why.

`WANTED` is the whole policy, one line of reason per flag; `negotiate` takes
the kernel's fuse_init_in and returns the reply and what was agreed (the
flags both sides have). Flags left out on purpose are listed in `DECLINED`
with their reason, so the choice is visible in one place and in the log.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ext4box.fuse import protocol
from ext4box.fuse.errors import FuseError
from ext4box.fuse.protocol import InitFlag

PAGE_SIZE = 4096
# 1 MiB READ and WRITE requests (the kernel's default cap is 256 pages).
MAX_PAGES = 256
MAX_WRITE = MAX_PAGES * PAGE_SIZE
# Readahead and async direct I/O requests the kernel may have queued at once.
MAX_BACKGROUND = 16
CONGESTION_THRESHOLD = 12
# Timestamps are exact to the nanosecond (ext4's extra time fields).
TIME_GRAN_NS = 1

# Names-only READDIR. Measured here (server CPU per entry, 30 directories of
# 100 files, cold dentries, native loop): a bare listing costs 3.3 µs per
# entry names-only against 6.7 µs with READDIRPLUS_AUTO (the kernel takes plus
# for the first batch of every directory), and lists 170-220k entries/s
# against 87-99k; `ls -l` (listing, then lstat of each) costs 23-47 µs per
# entry names-only (a LOOKUP each) against 7-10 µs with plus. The readdir
# target (>= fuse2fs, which lists 70-150k/s here) is met only names-only, and
# find, rm -r and globs never stat every entry: names-only it is. Flip to
# trade bare listings for `ls -l`.
USE_READDIRPLUS = False

WANTED: tuple[tuple[InitFlag, str], ...] = (
    (InitFlag.ASYNC_READ, "readahead READs may be queued without waiting for each other"),
    (InitFlag.ATOMIC_O_TRUNC, "O_TRUNC comes with OPEN, not as a separate SETATTR"),
    (InitFlag.BIG_WRITES, "WRITEs larger than one page (implied by max_write on new kernels)"),
    (InitFlag.ASYNC_DIO, "large O_DIRECT I/O is split into queued requests, as today"),
    (InitFlag.AUTO_INVAL_DATA, "cached pages are dropped when size/mtime change, as today"),
    (InitFlag.DONT_MASK, "the umask reaches us: applied unless a default ACL replaces it, "
                         "as ext4's posix_acl_create does"),
    (InitFlag.HANDLE_KILLPRIV_V2, "we clear suid/sgid/capabilities on write, truncate and chown "
                                  "as the kernel's KILL_SUIDGID flags say: no GETXATTR("
                                  "security.capability) before every write"),
    (InitFlag.MAX_PAGES, "1 MiB READ and WRITE requests"),
    (InitFlag.PARALLEL_DIROPS, "the kernel need not serialise lookups and readdirs per "
                               "directory"),
    (InitFlag.CACHE_SYMLINKS, "symlink targets never change in place: one READLINK each"),
    (InitFlag.NO_OPENDIR_SUPPORT, "directories need no handle: READDIR names the node, so "
                                  "OPENDIR/RELEASEDIR are answered ENOSYS and stop"),
    (InitFlag.POSIX_ACL, "the kernel enforces POSIX ACLs from system.posix_acl_* as ext4 "
                         "does (default_permissions alone ignores them)"),
    (InitFlag.SETXATTR_EXT, "SETXATTR carries FUSE_SETXATTR_ACL_KILL_SGID"),
    (InitFlag.EXPORT_SUPPORT, "file handles outlive cache drops and remounts: '.' and '..' "
                              "lookups by node id (export.py)"),
    (InitFlag.INIT_EXT, "flags2 (bits 32-63) is read"),
    (InitFlag.HAS_IOCTL_DIR, "ioctls on directories: chattr/lsattr of a directory, the "
                             "label and FITRIM on the mountpoint"),
    *(((InitFlag.DO_READDIRPLUS, "READDIRPLUS: listings carry attributes"),
        (InitFlag.READDIRPLUS_AUTO, "plus only where lookups follow the listing"))
      if USE_READDIRPLUS else ()),
)  # fmt: skip

# Only with `-o writeback_cache` (Operations.writeback_cache; fs_options.py says
# what it trades away).
WRITEBACK: tuple[InitFlag, str] = (
    InitFlag.WRITEBACK_CACHE, "buffered writes collect in the kernel's page cache and reach "
                              "us as page-sized WRITEs at writeback; the kernel owns size, "
                              "mtime and ctime of regular files and sends them by SETATTR")

DECLINED: tuple[tuple[InitFlag, str], ...] = (
    (InitFlag.WRITEBACK_CACHE, "without -o writeback_cache, writes stay write-through: "
                               "each write(2) is one WRITE and the server owns size and times"),
    (InitFlag.POSIX_LOCKS, "locks are the kernel's own (one mount, one server)"),
    (InitFlag.FLOCK_LOCKS, "as POSIX_LOCKS"),
    (InitFlag.SPLICE_READ, "requests are read into one preallocated buffer"),
    (InitFlag.SPLICE_WRITE, "READ replies come from the device into one aligned buffer "
                            "(O_DIRECT, iomap/direct_io.py): measured cheaper than a spliced "
                            "reply, which cannot carry 1 MiB through an unprivileged pipe"),
    (InitFlag.SPLICE_MOVE, "as SPLICE_WRITE"),
    (InitFlag.READDIRPLUS_AUTO, "names-only READDIR: cheaper for bare listings (USE_READDIRPLUS)"),
    (InitFlag.NO_OPEN_SUPPORT, "an open handle records writability, O_DIRECT and the opener"),
    (InitFlag.HANDLE_KILLPRIV, "superseded by HANDLE_KILLPRIV_V2"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Agreed:
    """What both sides have after INIT."""

    major: int
    minor: int
    flags: int  # flags | flags2 << 32, as in InitFlag
    max_write: int
    max_readahead: int

    def has(self, flag: InitFlag) -> bool:
        return bool(self.flags & flag)


def wanted_flags(*, writeback_cache: bool = False) -> int:
    out = WRITEBACK[0] if writeback_cache else 0
    for flag, _ in WANTED:
        out |= flag
    return out


def negotiate(body: bytes, also: int = 0, *, writeback_cache: bool = False,
              time_gran_ns: int = TIME_GRAN_NS) -> tuple[bytes, Agreed | None]:
    """The INIT reply payload for the kernel's fuse_init_in `body`, and the agreement.

    `also`: flags outside WANTED that the session takes if offered (the
    transport's choice of FUSE_OVER_IO_URING, uring_transport.choose).
    `writeback_cache`: ask for FUSE_WRITEBACK_CACHE too (`-o writeback_cache`).
    `time_gran_ns`: the granularity of the times the kernel stamps itself.

    Agreement None: the kernel speaks a newer major version; the reply names
    ours and the kernel sends INIT again. A major older than 7 is EPROTO.
    """
    if len(body) < protocol.INIT_IN_COMPAT_SIZE:
        raise FuseError(errno.EINVAL)
    # Kernels before 7.36 send the first 16 bytes only: the rest reads as zeros.
    padded = bytes(body[: protocol.INIT_IN.size]).ljust(protocol.INIT_IN.size, b"\0")
    major, minor, max_readahead, flags, flags2 = protocol.INIT_IN.unpack_from(padded)
    if major > protocol.KERNEL_VERSION:
        return protocol.INIT_OUT.pack(protocol.KERNEL_VERSION, protocol.KERNEL_MINOR_VERSION,
                                      0, 0, 0, 0, 0, 0, 0, 0, 0), None
    if major < protocol.KERNEL_VERSION:
        raise FuseError(errno.EPROTO)
    offered = flags | (flags2 << 32 if flags & InitFlag.INIT_EXT else 0)
    agreed_flags = offered & (wanted_flags(writeback_cache=writeback_cache) | also)
    agreed = Agreed(
        major=protocol.KERNEL_VERSION,
        minor=min(minor, protocol.KERNEL_MINOR_VERSION),
        flags=agreed_flags,
        max_write=MAX_WRITE,
        max_readahead=max_readahead,
    )
    reply = protocol.INIT_OUT.pack(
        agreed.major, agreed.minor, max_readahead, agreed_flags & 0xFFFFFFFF,
        MAX_BACKGROUND, CONGESTION_THRESHOLD, MAX_WRITE, time_gran_ns,
        MAX_PAGES, 0, agreed_flags >> 32,
    )  # fmt: skip
    return reply, agreed


def missing_wanted(agreed: Agreed) -> list[str]:
    """Wanted flags the kernel did not offer (logged: behaviour falls back)."""
    return [str(flag.name) for flag, _ in WANTED if not agreed.flags & flag]
