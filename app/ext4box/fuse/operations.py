"""What each FUSE request does to an ext4 filesystem, whichever transport carries it.

Plain synchronous methods: arguments are node ids, names, modes and a
`Context`; results are `Attributes`, `OpenResult`, bytes; failures are one
exception, `FuseError(errno)`. The native session (session.py, dispatch.py)
and the pyfuse3 backend (pyfuse3_backend.py) both call this class, and the
ext4 side never learns which one is in use.

The state kept here is what FUSE itself defines (lookup counts, open
handles, open counts per inode) plus the POSIX rules the VFS leaves to a
FUSE server; namespace changes and setattr are in changes.py.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.format.inode import FL_APPEND, Inode
from ext4box.ext4.read.filesystem import Filesystem, StatFs
from ext4box.ext4.write.caller import Caller, acting_as
from ext4box.fuse import cached_writes, ioctls, kernel_times
from ext4box.fuse.atime import RELATIME, AtimePolicy, stored_time
from ext4box.fuse.attrs import (
    ATTR_TIMEOUT,
    ENTRY_TIMEOUT,
    RW_ATTR_TIMEOUT,
    RW_ENTRY_TIMEOUT,
    Attributes,
    check_child_ino,
    entry_attributes,
    ext4_ino,
    placeholder_attributes,
)
from ext4box.fuse.changes import NamespaceChanges, check_name
from ext4box.fuse.errors import FuseError, fuse_errors, to_fuse_error
from ext4box.fuse.export import ExportLookups
from ext4box.fuse.file_ops import FileRangeOps
from ext4box.fuse.killpriv import killpriv_mode, may_have_xattrs, now_ns
from ext4box.fuse.request_records import Context, OpenFile, OpenResult
from ext4box.iomap.engine import IOMapEngine, ReadPlan
from ext4box.log import get_logger

if TYPE_CHECKING:
    from ext4box.ext4.write.writable import WritableFilesystem

log = get_logger("ext4box.fuse")

_DOT_NAMES = (b".", b"..")
_GOOD_OLD_INODE_SIZE = 128  # no extra time fields: times in whole seconds
SECURITY_CAPABILITY = b"security.capability"
_S_ISUID_SGID = stat.S_ISUID | stat.S_ISGID


# emit(name, ino, file_type, attributes or None, cookie) -> False when the reply is full.
EmitEntry = Callable[[bytes, int, int, Attributes | None, int], bool]


class Operations(NamespaceChanges, FileRangeOps, ExportLookups):
    """The transport-neutral FUSE operations on one filesystem (see module doc)."""

    def __init__(self, fs: Filesystem, engine: IOMapEngine,
                 atime: AtimePolicy = RELATIME, *, writeback_cache: bool = False) -> None:
        self.fs = fs
        self.engine = engine
        # When reads move atime (-o relatime|strictatime|noatime|nodiratime).
        self.atime = atime
        self.block_size = fs.block_size
        self.writable = not getattr(fs, "readonly", True)
        # `-o writeback_cache` (fs_options.py): a read-only mount never asks for it.
        self.writeback_cache = writeback_cache and self.writable
        # The kernel then stamps regular files' times itself: to the second
        # where 128-byte inodes have no room for nanoseconds, or stat would
        # show nanoseconds the image never keeps.
        self.time_gran_ns = (1_000_000_000 if self.writeback_cache
                             and fs.sb.inode_size <= _GOOD_OLD_INODE_SIZE else 1)  # fmt: skip
        self.timeouts = (
            (RW_ENTRY_TIMEOUT, RW_ATTR_TIMEOUT) if self.writable else (ENTRY_TIMEOUT, ATTR_TIMEOUT)
        )
        self.lookup_counts: dict[int, int] = {}
        self._open_files: dict[int, OpenFile] = {}
        self._open_dirs: dict[int, int] = {}
        self._handle_ids = itertools.count(1)
        # Open handles per inode: an unlinked inode stays (on the orphan list)
        # until its last release.
        self._open_counts: dict[int, int] = {}
        self._orphans: set[int] = set()
        # Last attributes of inodes already freed while the kernel still holds
        # a lookup reference (a removed directory someone's cwd is in): answer
        # getattr with nlink 0 as ext4 does, until forget.
        self._dead: dict[int, Attributes] = {}
        # Set by every change; the commit timer commits only when set.
        self.dirty = False
        # Inodes whose attributes changed without the kernel asking for it
        # (suid/sgid cleared or capabilities dropped by a write): a transport
        # that can tell the kernel (FUSE_NOTIFY_INVAL_INODE) drains this.
        self.changed_behind_kernel: list[int] = []
        # Directories whose cached listing the kernel must drop (pages too),
        # so that the next listing reaches us and can move atime (strictatime):
        # the native transport drains this, pyfuse3's kernel caches no listing.
        self.listings_to_drop: list[int] = []
        if self.writable:
            # rename() asks this when the target it replaces loses its last link.
            self.rw.is_open = lambda ino: self._open_counts.get(ino, 0) > 0

    # -- names and attributes ------------------------------------------------

    @property
    def rw(self) -> WritableFilesystem:
        """The facade's read-write side (only reached after `_require_writable`)."""
        return cast("WritableFilesystem", self.fs)

    def _attributes(self, ino: int) -> Attributes:
        dead = self._dead.get(ino)
        if dead is not None:
            return dead
        return entry_attributes(self.fs.inode(ino), self.block_size, timeouts=self.timeouts)

    def _inode_attributes(self, inode: Inode) -> Attributes:
        return entry_attributes(inode, self.block_size, timeouts=self.timeouts)

    def remember(self, ino: int) -> None:
        """The kernel took one more lookup reference on `ino`."""
        self.lookup_counts[ino] = self.lookup_counts.get(ino, 0) + 1

    @fuse_errors("lookup")
    def lookup(self, parent: int, name: bytes) -> Attributes:
        # Path walks never send these: only the kernel decoding a file handle (export.py).
        if name == b".":
            return self.lookup_self(parent)
        if name == b"..":
            return self.lookup_parent(parent)
        check_name(name)
        dir_ino = ext4_ino(parent)
        ino = self.fs.find(dir_ino, name)
        if ino is None:
            # Straight to the errno: a missing name is an answer, not an incident.
            raise FuseError(errno.ENOENT)
        check_child_ino(ino, dir_ino, name)
        attr = self._attributes(ino)
        self.remember(ino)
        return attr

    def forget(self, node_id: int, nlookup: int) -> None:
        counts = self.lookup_counts
        left = counts.get(node_id, 0) - nlookup
        if left > 0:
            counts[node_id] = left
        else:
            counts.pop(node_id, None)
            self._dead.pop(node_id, None)

    @fuse_errors("getattr")
    def getattr(self, node_id: int) -> Attributes:
        return self._attributes(ext4_ino(node_id))

    @fuse_errors("readlink")
    def readlink(self, node_id: int) -> bytes:
        ino = ext4_ino(node_id)
        target = self.fs.readlink(ino)
        self._accessed(ino)
        return target

    # -- access times ------------------------------------------------------------

    def _atime_due(self, inode: Inode) -> bool:
        """Whether a read of `inode` now would move its atime (atime.py)."""
        return self.writable and self.atime.needs_update(inode, stored_time(inode, now_ns()))

    def _accessed(self, ino: int) -> bool:
        """A READ, READDIR or READLINK reached us: move atime where ext4 would.
        True when every later access must reach us too (strictatime).

        A dirty inode for the next commit, as the kernel's touch_atime makes
        it: no transaction of its own. A failure is logged, never the read's.
        """
        if not self.writable:
            return False  # a read-only mount never writes
        try:
            node = self.fs.inode(ino)
            now = stored_time(node, now_ns())
            if self.atime.needs_update(node, now):
                self.rw.touch_atime(ino, now)
                self.dirty = True
        except Ext4Error as err:
            log.warning("atime_not_updated", ino=ino, why=str(err))
            return False
        return self.atime.always_moves(node)

    # -- files -------------------------------------------------------------------

    @fuse_errors("open")
    def open(self, node_id: int, flags: int, ctx: Context,
             kill_suidgid: bool | None = None) -> OpenResult:
        """Open a file; O_TRUNC truncates here (FUSE_ATOMIC_O_TRUNC).

        `kill_suidgid`: the kernel's FUSE_OPEN_KILL_SUIDGID, or None to decide
        by the caller (not root) as the VFS would.
        """
        wants_write = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if wants_write and not self.writable:
            raise FuseError(errno.EROFS)
        ino = ext4_ino(node_id)
        node = self.fs.inode(ino)
        if node.is_dir:
            raise FuseError(errno.EISDIR)
        if self.writable:
            # may_open's immutable/append-only rules (the kernel cannot see the flags).
            self.rw.check_open(ino, flags)
        if flags & os.O_TRUNC and node.is_reg:
            # The truncate comes with the open, not as a separate setattr;
            # times as for truncate(2).
            now = now_ns()
            kill = ctx.uid != 0 if kill_suidgid is None else kill_suidgid
            mode = killpriv_mode(node.mode) if kill else None
            self.rw.setattr(ino, size=0, mode=mode, mtime_ns=now, ctime_ns=now)
            if self.writeback_cache:  # the kernel stamps the times (kernel_times.py)
                kernel_times.keep_times(self.rw, ino, (node.mtime_ns, node.ctime_ns))
            self.engine.invalidate(ino)
            self.dirty = True
        result = self.new_handle(ino, writable=wants_write, uid=ctx.uid, gid=ctx.gid,
                                 direct=bool(flags & os.O_DIRECT), flags=flags)
        if flags & os.O_ACCMODE != os.O_WRONLY and self._atime_due(node):
            # A read served from the page cache never reaches us, so it could
            # not move atime: drop the cache when the next read must.
            result = OpenResult(fh=result.fh, keep_cache=False)
        return result

    def new_handle(self, ino: int, *, writable: bool, uid: int, gid: int = 0,
                   direct: bool = False, flags: int = os.O_RDONLY) -> OpenResult:
        fh = next(self._handle_ids)
        # With the writeback cache, a write to an append-only file must still
        # reach us with the file's flags (fcntl may clear O_APPEND, and the
        # kernel cannot see the inode flag): its opens for writing bypass the cache.
        uncached = (self.writeback_cache and writable
                    and bool(self.fs.inode(ino).flags & FL_APPEND))  # fmt: skip
        self._open_files[fh] = OpenFile(ino, writable, uid, gid=gid, direct=direct,
                                        readable=flags & os.O_ACCMODE != os.O_WRONLY,
                                        append=bool(flags & os.O_APPEND), uncached=uncached)
        self._open_counts[ino] = self._open_counts.get(ino, 0) + 1
        # Read-only: the image never changes, so cached pages stay valid.
        # Read-write: this server is the only writer and every write, truncate
        # and mmap store goes through this kernel's page cache (which FUSE
        # keeps coherent for buffered writes), so the pages are still valid.
        return OpenResult(fh=fh, keep_cache=True, direct_io=uncached)

    @fuse_errors("read")
    def read_plan(self, fh: int, off: int, size: int) -> tuple[ReadPlan, bool]:
        """The plan of a read, and whether the handle was opened O_DIRECT."""
        handle = self._open_files.get(fh)
        if handle is None:
            raise FuseError(errno.EBADF)
        # The current inode: its size may have changed since the open.
        plan = self.engine.plan_read(self.fs.inode(handle.ino), off, size)
        if handle.readable:
            # A READ through a write-only open is the writeback cache filling
            # a page for a partial write, not a read: ext4 moves no atime there.
            self._accessed(handle.ino)
        return plan, handle.direct

    @fuse_errors("read")
    def execute_read(self, plan: ReadPlan) -> bytes:
        return self.engine.execute(plan)

    def read(self, fh: int, off: int, size: int) -> bytes:
        plan, _ = self.read_plan(fh, off, size)
        return self.execute_read(plan)

    @fuse_errors("read")
    def read_into(self, fh: int, off: int, size: int, buffer: memoryview) -> memoryview:
        """A read made in `buffer` (page-aligned, reused: see IOMapEngine.execute_into)."""
        plan, _ = self.read_plan(fh, off, size)
        return self.engine.execute_into(plan, buffer)

    @fuse_errors("write")
    def write(self, fh: int, off: int, data: bytes | memoryview,
              kill_suidgid: bool | None = None, *, file_flags: int | None = None,
              cached: bool = False) -> int:
        """Write through handle `fh`; `kill_suidgid` as for open (None: by the opener).
        `file_flags`: the file's open flags now (FUSE_WRITE carries them), so a
        write to an append-only file from an fd whose O_APPEND fcntl cleared is
        refused here, as the kernel refuses that fcntl.
        `cached`: writeback of the kernel's page cache (FUSE_WRITE_CACHE): its
        write(2)s were accepted long ago and it carries no file flags.
        Under the writeback cache every write but those of an uncached handle
        keeps the kernel's times (it stamped them itself), and a writeback
        leaves ext4's holes (cached_writes.py)."""
        handle = self._open_files.get(fh)
        if handle is None or not handle.writable:
            raise FuseError(errno.EBADF)
        ino = handle.ino
        if file_flags is not None and not cached:
            self.rw.check_open(ino, file_flags)
        node = self.fs.inode(ino)
        kernel_times = (node.mtime_ns, node.ctime_ns)
        # Synchronous from write_begin to write_end: no other request may
        # truncate (and free) the blocks between allocation and the data write.
        self.dirty = True
        kill = handle.uid != 0 if kill_suidgid is None else kill_suidgid
        if kill and node.mode & _S_ISUID_SGID:
            mode = killpriv_mode(node.mode)
            if mode is not None:
                node = self.rw.setattr(ino, mode=mode, ctime_ns=now_ns())
                self.changed_behind_kernel.append(ino)
        # A write drops file capabilities whoever writes, as file_remove_privs
        # does. (With HANDLE_KILLPRIV_V2 the kernel still removes them itself
        # unless it has marked the inode S_NOSEC; this keeps the rule either way.)
        if may_have_xattrs(node) and self.fs.find_xattr(ino, SECURITY_CAPABILITY) is not None:
            self.rw.removexattr(ino, SECURITY_CAPABILITY)
            node = self.fs.inode(ino)
            self.changed_behind_kernel.append(ino)
        # Fewer bytes than asked when the file's size limit cuts the write short.
        with acting_as(Caller(handle.uid, handle.gid)):
            if not self.writeback_cache or handle.uncached:
                return self.engine.write(node, off, data, now_ns=now_ns())
            return cached_writes.store(self.engine, self.rw, node, off, data,
                                       times=kernel_times, page_granular=cached)

    @fuse_errors("ioctl")
    def ioctl(self, node_id: int, cmd: int, data: bytes, out_size: int, ctx: Context) -> bytes:
        """FUSE_IOCTL: the few ioctls ext4 answers that make sense here (ioctls.py)."""
        ino = ext4_ino(node_id)
        result = ioctls.answer(self.fs, ioctls.IoctlCall(ino, cmd, data, out_size, ctx.uid))
        if result.changed_inode:
            self.dirty = True
            self.engine.invalidate(ino)  # an EXTENTS change rewrote the mapping
            self.changed_behind_kernel.append(ino)  # ctime, and attributes cached
        return result.out

    @fuse_errors("fsync")
    def fsync(self, node_id: int | None = None) -> None:
        """fsync(2) (of `node_id`, when the transport says) or syncfs(2)."""
        self.commit(durable=True)
        if node_id is not None:
            # The kernel sent the file's pages first: st_blocks is known now.
            self._blocks_changed(ext4_ino(node_id))

    def commit(self, *, durable: bool) -> None:
        if not self.writable:
            return
        self.dirty = False
        self.rw.commit(durable=durable)

    def commit_tick(self) -> None:
        """The periodic commit (ext4's commit interval): make changes durable."""
        if self.writable and self.dirty:
            self.commit(durable=True)

    @fuse_errors("release")
    def release(self, fh: int) -> None:
        handle = self._open_files.pop(fh, None)
        if handle is None:
            return
        ino = handle.ino
        left = self._open_counts.get(ino, 0) - 1
        if left > 0:
            self._open_counts[ino] = left
            return
        self._open_counts.pop(ino, None)
        if ino in self._orphans:
            self._orphans.discard(ino)
            self.engine.invalidate(ino)
            self.dirty = True
            self.rw.release_orphan(ino)

    # -- directories ---------------------------------------------------------

    @fuse_errors("opendir")
    def opendir(self, node_id: int) -> int:
        """A handle for readdir (backends whose kernel sends OPENDIR)."""
        dir_ino = ext4_ino(node_id)
        if not self.fs.inode(dir_ino).is_dir:
            raise FuseError(errno.ENOTDIR)
        fh = next(self._handle_ids)
        self._open_dirs[fh] = dir_ino
        return fh

    def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)

    def dir_of_handle(self, fh: int) -> int:
        """The node id a directory handle was opened on."""
        dir_ino = self._open_dirs.get(fh)
        if dir_ino is None:
            raise FuseError(errno.EBADF)
        return dir_ino

    @fuse_errors("readdir")
    def readdir(self, node_id: int, offset: int, emit: EmitEntry, *, plus: bool) -> None:
        """List directory `node_id` from cookie `offset` through `emit` until it is full.

        With `plus`, each entry carries its attributes and counts as a lookup
        (except "." and "..", which the kernel never links).
        """
        dir_ino = ext4_ino(node_id)
        emitted = 0
        if self._accessed(dir_ino):
            self.listings_to_drop.append(dir_ino)
        try:
            for item in self.fs.readdir(dir_ino, offset):
                is_dot = item.name in _DOT_NAMES
                if not is_dot:
                    check_child_ino(item.ino, dir_ino, item.name)
                attr = (self._listing_attributes(item.ino, item.file_type)
                        if plus else None)  # fmt: skip
                if not emit(item.name, item.ino, item.file_type, attr, item.cookie):
                    return
                emitted += 1
                if plus and not is_dot:
                    self.remember(item.ino)
        except Exception as err:
            if not emitted:
                raise
            # Hand back what was listed; the kernel asks again from the last
            # cookie and gets the error then, with nothing half-counted.
            to_fuse_error(err, "readdir")

    def _listing_attributes(self, ino: int, file_type: int) -> Attributes:
        try:
            return self._attributes(ino)
        except Exception as err:
            # One unreadable inode must not hide its siblings: list the name,
            # let lookup/getattr of it report the error.
            to_fuse_error(err, "readdir")
            return placeholder_attributes(ino, file_type)

    # -- filesystem-wide -----------------------------------------------------

    @fuse_errors("statfs")
    def statfs(self) -> StatFs:
        return self.fs.statfs()

    # -- extended attributes -------------------------------------------------

    @fuse_errors("getxattr")
    def getxattr(self, node_id: int, name: bytes) -> bytes:
        value = self.fs.find_xattr(ext4_ino(node_id), name)
        if value is None:
            # Most files have no security.selinux or ACL, and `ls -l` asks for both.
            raise FuseError(errno.ENODATA)
        return value

    @fuse_errors("listxattr")
    def listxattr(self, node_id: int) -> list[bytes]:
        return self.fs.listxattr(ext4_ino(node_id))

    @fuse_errors("setxattr")
    def setxattr(self, node_id: int, name: bytes, value: bytes, flags: int = 0,
                 kill_sgid: bool = False) -> None:
        """Set an xattr; `flags` XATTR_CREATE / XATTR_REPLACE (0 when already checked).

        `kill_sgid`: the kernel's FUSE_SETXATTR_ACL_KILL_SGID (setting an
        access ACL by a caller outside the file's group).
        """
        self._require_writable()
        ino = ext4_ino(node_id)
        if flags & (os.XATTR_CREATE | os.XATTR_REPLACE):
            exists = self.fs.find_xattr(ino, name) is not None
            if flags & os.XATTR_CREATE and exists:
                raise FuseError(errno.EEXIST)
            if flags & os.XATTR_REPLACE and not exists:
                raise FuseError(errno.ENODATA)
        with kernel_times.kept(self.rw, ino, writeback_cache=self.writeback_cache):
            self.rw.setxattr(ino, name, value)
        self._blocks_changed(ino)
        if kill_sgid:
            node = self.fs.inode(ino)
            if node.mode & stat.S_ISGID:
                self.rw.setattr(ino, mode=node.mode & ~stat.S_ISGID, ctime_ns=now_ns())

    @fuse_errors("removexattr")
    def removexattr(self, node_id: int, name: bytes) -> None:
        self._require_writable()
        ino = ext4_ino(node_id)
        with kernel_times.kept(self.rw, ino, writeback_cache=self.writeback_cache):
            self.rw.removexattr(ino, name)
        self._blocks_changed(ino)

    def _blocks_changed(self, ino: int) -> None:
        """st_blocks of `ino` changed (an xattr block; written-back data, at
        fsync). Under the writeback cache the kernel refetches attributes it
        does not own only when told: it owns size and times of regular files
        and takes the rest (st_blocks) from a GETATTR after
        FUSE_NOTIFY_INVAL_INODE. (Not after each writeback WRITE: the kernel
        refetches at close, and a notification racing a close's writeback made
        the next open of the file by another user fail EACCES on 6.18.)"""
        if self.writeback_cache:
            self.changed_behind_kernel.append(ino)

    def _require_writable(self) -> None:
        if not self.writable:
            raise FuseError(errno.EROFS)
        self.dirty = True

    # -- permissions ---------------------------------------------------------

    @fuse_errors("access")
    def access(self, node_id: int, mode: int, ctx: Context, groups: Callable[[], list[int]]
               ) -> bool:  # fmt: skip
        """Only reached without default_permissions (which serve always sets);
        kept correct for mounts that drop it. `groups`: the caller's groups."""
        node = self.fs.inode(ext4_ino(node_id))
        if mode & os.W_OK and not self.writable:
            raise FuseError(errno.EROFS)
        if ctx.uid == 0:
            # root may read anything, and execute anything with some x bit.
            return not (mode & os.X_OK) or node.is_dir or bool(node.mode & 0o111)
        if ctx.uid == node.uid:
            granted = (node.mode >> 6) & 0o7
        elif node.gid == ctx.gid or node.gid in groups():
            granted = (node.mode >> 3) & 0o7
        else:
            granted = node.mode & 0o7
        return mode & granted == mode
