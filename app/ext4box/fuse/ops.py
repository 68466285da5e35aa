"""pyfuse3 Operations for an ext4 filesystem (read-only or read-write): a thin adapter.

Each handler translates FUSE arguments, calls the facade or the iomap engine,
and lets `fuse_errors` map failures to errno values. The state kept here is
what FUSE itself defines (lookup counts, open handles, open counts per inode)
plus the POSIX rules the VFS leaves to a FUSE server: ownership of new inodes
in set-group-ID directories, and clearing suid/sgid on write, truncate and
chown (the INIT reply libfuse 3.14 sends here has no FUSE_HANDLE_KILLPRIV, so
the kernel clears them too, by a SETATTR; doing it here keeps the rule whatever
is negotiated).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import pyfuse3
import trio

from ext4box.ext4.errors import NotFound
from ext4box.ext4.filesystem import Filesystem
from ext4box.ext4.inode import Inode
from ext4box.fuse.attrs import (
    ATTR_TIMEOUT,
    ENTRY_TIMEOUT,
    RW_ATTR_TIMEOUT,
    RW_ENTRY_TIMEOUT,
    check_child_ino,
    entry_attributes,
    ext4_ino,
    placeholder_attributes,
)
from ext4box.fuse.errors import fuse_errors, to_fuse_error
from ext4box.iomap.engine import IOMapEngine, ReadPlan
from ext4box.log import get_logger

if TYPE_CHECKING:
    from ext4box.ext4.writable import WritableFilesystem

log = get_logger("ext4box.fuse")

# Plans with at least this many device bytes are executed in a worker thread:
# the trio loop keeps accepting requests (and the kernel's parallel
# readahead gets parallel preads) while the thread waits on the device.
# Not for O_DIRECT handles: there the thread hand-off only adds latency
# (bench, 1 MiB O_DIRECT reads of 256 MiB: 78-88% -> 90-93% of the kernel).
THREADED_READ_BYTES = 64 * 1024

_DOT_NAMES = (b".", b"..")

_S_ISUID_SGID = stat.S_ISUID | stat.S_ISGID
_PERMISSION_BITS = 0o7777


@dataclass(slots=True)
class OpenFile:
    """One open file handle: which inode, and who opened it how."""

    ino: int
    writable: bool
    # The opener's uid decides suid/sgid clearing on write: FUSE_WRITE
    # carries no credentials, and root (CAP_FSETID) keeps the bits.
    uid: int
    # Opened O_DIRECT: each read is the application's own, one at a time for
    # a synchronous reader, so it is executed inline (no thread hand-off).
    direct: bool = False


def _now_ns() -> int:
    return time.time_ns()


def _killpriv_mode(mode: int) -> int | None:
    """The mode after clearing suid/sgid as the kernel does for a write or truncate.

    S_ISUID always goes; S_ISGID only with group-exec (without it, it marks
    mandatory locking, not a privilege). None when nothing changes.
    """
    new = mode & ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        new &= ~stat.S_ISGID
    return new if new != mode else None


class Ext4Operations(pyfuse3.Operations):
    # No "." / ".." lookups: the kernel only sends them for NFS export, and
    # answering ".." of a top-level directory would need node id 1 with
    # st_ino 2, which pyfuse3 cannot express.
    supports_dot_lookup = False
    # The kernel enforces POSIX ACLs (with default_permissions), as ext4 does.
    enable_acl = True

    def __init__(self, fs: Filesystem, engine: IOMapEngine) -> None:
        super().__init__()
        self.fs = fs
        self.engine = engine
        self.block_size = fs.block_size
        self.writable = not getattr(fs, "readonly", True)
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
        self._dead: dict[int, pyfuse3.EntryAttributes] = {}
        # Set by every change; the commit timer commits only when set.
        self.dirty = False
        if self.writable:
            # rename() asks this when the target it replaces loses its last link.
            self.rw.is_open = lambda ino: self._open_counts.get(ino, 0) > 0

    # -- names and attributes ------------------------------------------------

    def _attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        dead = self._dead.get(ino)
        if dead is not None:
            return dead
        return entry_attributes(self.fs.inode(ino), self.block_size, timeouts=self.timeouts)

    @property
    def rw(self) -> WritableFilesystem:
        """The facade's read-write side (only reached after `_require_writable`)."""
        return cast("WritableFilesystem", self.fs)

    def _inode_attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        return entry_attributes(inode, self.block_size, timeouts=self.timeouts)

    def _remember(self, ino: int) -> None:
        self.lookup_counts[ino] = self.lookup_counts.get(ino, 0) + 1

    @fuse_errors("lookup")
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        dir_ino = ext4_ino(parent_inode)
        ino = self.fs.find(dir_ino, name)
        if ino is None:
            # Straight to the errno: a missing name is an answer, not an incident.
            raise pyfuse3.FUSEError(errno.ENOENT)
        check_child_ino(ino, dir_ino, name)
        attr = self._attributes(ino)
        self._remember(ino)
        return attr

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        counts = self.lookup_counts
        for node_id, nlookup in inode_list:
            left = counts.get(node_id, 0) - nlookup
            if left > 0:
                counts[node_id] = left
            else:
                counts.pop(node_id, None)
                self._dead.pop(node_id, None)

    @fuse_errors("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(ext4_ino(inode))

    @fuse_errors("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(ext4_ino(inode))

    # -- files -------------------------------------------------------------------

    @fuse_errors("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        wants_write = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if wants_write and not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        ino = ext4_ino(inode)
        node = self.fs.inode(ino)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and node.is_reg:
            # FUSE_CAP_ATOMIC_O_TRUNC: the truncate comes with the open, not
            # as a separate setattr; times as for truncate(2).
            now = _now_ns()
            mode = _killpriv_mode(node.mode) if ctx.uid != 0 else None
            self.rw.setattr(ino, size=0, mode=mode, mtime_ns=now, ctime_ns=now)
            self.engine.invalidate(ino)
            self.dirty = True
        return self._new_handle(ino, writable=wants_write, uid=ctx.uid,
                                direct=bool(flags & os.O_DIRECT))

    def _new_handle(self, ino: int, *, writable: bool, uid: int,
                    direct: bool = False) -> pyfuse3.FileInfo:
        fh = next(self._handle_ids)
        self._open_files[fh] = OpenFile(ino, writable, uid, direct)
        self._open_counts[ino] = self._open_counts.get(ino, 0) + 1
        # Read-only: the image never changes, so cached pages stay valid.
        # Read-write: this server is the only writer and every write, truncate
        # and mmap store goes through this kernel's page cache (which FUSE
        # keeps coherent for buffered writes), so the pages are still valid.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_errors("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._open_files.get(fh)
        if handle is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        # The current inode: its size may have changed since the open.
        plan = self.engine.plan_read(self.fs.inode(handle.ino), off, size)
        if not handle.direct and _device_bytes(plan) >= THREADED_READ_BYTES:
            return await trio.to_thread.run_sync(self.engine.execute, plan)
        return self.engine.execute(plan)

    @fuse_errors("write")
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._open_files.get(fh)
        if handle is None or not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        node = self.fs.inode(handle.ino)
        # Synchronous from write_begin to write_end: no other request may
        # truncate (and free) the blocks between allocation and the data write.
        self.dirty = True
        if handle.uid != 0 and node.mode & _S_ISUID_SGID:
            mode = _killpriv_mode(node.mode)
            if mode is not None:
                node = self.rw.setattr(handle.ino, mode=mode, ctime_ns=_now_ns())
        # Fewer bytes than asked when the file's size limit cuts the write short.
        return self.engine.write(node, off, buf, now_ns=_now_ns())

    async def flush(self, fh: int) -> None:
        # close(2) is not a durability point on ext4 either, and there is
        # nothing else to do at a close: ENOSYS makes the kernel stop sending
        # FLUSH for good (one request less per close).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors("fsync")
    async def fsync(self, fh: int, datasync: bool) -> None:
        self._commit(durable=True)

    @fuse_errors("fsyncdir")
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._commit(durable=True)

    def _commit(self, *, durable: bool) -> None:
        if not self.writable:
            return
        self.dirty = False
        self.rw.commit(durable=durable)

    def commit_tick(self) -> None:
        """The periodic commit (ext4's commit interval): make changes durable."""
        if self.writable and self.dirty:
            self._commit(durable=True)

    @fuse_errors("release")
    async def release(self, fh: int) -> None:
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
            self._forget_inode(ino)
            self.dirty = True
            self.rw.release_orphan(ino)

    # -- directories ---------------------------------------------------------

    @fuse_errors("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        dir_ino = ext4_ino(inode)
        if not self.fs.inode(dir_ino).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = next(self._handle_ids)
        self._open_dirs[fh] = dir_ino
        return fh

    @fuse_errors("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        dir_ino = self._open_dirs.get(fh)
        if dir_ino is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        emitted = 0
        try:
            for item in self.fs.readdir(dir_ino, start_id):
                is_dot = item.name in _DOT_NAMES
                if not is_dot:
                    check_child_ino(item.ino, dir_ino, item.name)
                attr = self._listing_attributes(item.ino, item.file_type, dir_ino, item.name)
                if not pyfuse3.readdir_reply(token, item.name, attr, item.cookie):
                    return
                emitted += 1
                # The kernel takes a reference on every entry it links, except
                # "." and "..", which it never links from readdirplus.
                if not is_dot:
                    self._remember(item.ino)
        except Exception as err:
            if not emitted:
                raise
            # Hand back what was listed; the kernel asks again from the last
            # cookie and gets the error then, with nothing half-counted.
            to_fuse_error(err, "readdir")

    def _listing_attributes(
        self, ino: int, file_type: int, dir_ino: int, name: bytes
    ) -> pyfuse3.EntryAttributes:
        try:
            return self._attributes(ino)
        except Exception as err:
            # One unreadable inode must not hide its siblings: list the name,
            # let lookup/getattr of it report the error.
            to_fuse_error(err, "readdir")
            return placeholder_attributes(ino, file_type)

    async def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)

    # -- namespace changes ---------------------------------------------------

    def _require_writable(self) -> None:
        if not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        self.dirty = True

    def _new_owner(self, parent: int, mode: int, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """(mode, gid) of a new inode, as the kernel's inode_init_owner decides.

        In a set-group-ID directory the new inode takes the directory's group,
        and a new subdirectory inherits the set-group-ID bit. (The VFS has
        already applied the umask and stripped S_ISGID the caller may not set.)
        """
        parent_node = self.fs.inode(parent)
        if parent_node.mode & stat.S_ISGID:
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
            return mode, parent_node.gid
        return mode, ctx.gid

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        self.engine.invalidate(inode.ino)  # an inode number may be reused
        self._dead.pop(inode.ino, None)
        attr = self._inode_attributes(inode)
        self._remember(inode.ino)
        return attr

    @fuse_errors("create")
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._require_writable()
        parent = ext4_ino(parent_inode)
        mode, gid = self._new_owner(parent, stat.S_IFREG | (mode & _PERMISSION_BITS), ctx)
        node = self.rw.create(parent, name, mode, ctx.uid, gid)
        attr = self._entry(node)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        direct = bool(flags & os.O_DIRECT)
        return self._new_handle(node.ino, writable=writable, uid=ctx.uid, direct=direct), attr

    @fuse_errors("mknod")
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._require_writable()
        parent = ext4_ino(parent_inode)
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        mode, gid = self._new_owner(parent, mode, ctx)
        is_device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        node = self.rw.create(parent, name, mode, ctx.uid, gid, rdev=rdev if is_device else 0)
        return self._entry(node)

    @fuse_errors("mkdir")
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._require_writable()
        parent = ext4_ino(parent_inode)
        mode, gid = self._new_owner(parent, stat.S_IFDIR | (mode & _PERMISSION_BITS), ctx)
        node = self.rw.mkdir(parent, name, mode, ctx.uid, gid)
        return self._entry(node)

    @fuse_errors("symlink")
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._require_writable()
        parent = ext4_ino(parent_inode)
        _, gid = self._new_owner(parent, stat.S_IFLNK, ctx)
        node = self.rw.symlink(parent, name, target, ctx.uid, gid)
        return self._entry(node)

    @fuse_errors("link")
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._require_writable()
        node = self.rw.link(ext4_ino(inode), ext4_ino(new_parent_inode), new_name)
        attr = self._inode_attributes(node)
        self._remember(node.ino)
        return attr

    def _forget_inode(self, ino: int) -> None:
        """An inode was freed (or is about to be): drop what is cached about it."""
        self.engine.invalidate(ino)

    def _bury(self, ino: int, before: Inode) -> None:
        """`ino` lost its last name: keep answering getattr (nlink 0) while looked up."""
        if ino in self.lookup_counts:
            attr = self._inode_attributes(before)
            attr.st_nlink = 0
            self._dead[ino] = attr

    @fuse_errors("unlink")
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._require_writable()
        parent = ext4_ino(parent_inode)
        ino = self.fs.lookup(parent, name)
        still_open = self._open_counts.get(ino, 0) > 0
        node = self.rw.unlink(parent, name, still_open=still_open)
        if node.links_count == 0:
            if still_open:
                self._orphans.add(ino)
            else:
                self._forget_inode(ino)
                self._bury(ino, node)

    @fuse_errors("rmdir")
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._require_writable()
        parent = ext4_ino(parent_inode)
        ino = self.fs.lookup(parent, name)
        before = self.fs.inode(ino)
        self.rw.rmdir(parent, name)
        self._forget_inode(ino)
        self._bury(ino, before)

    @fuse_errors("rename")
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._require_writable()
        if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        old_parent = ext4_ino(parent_inode_old)
        new_parent = ext4_ino(parent_inode_new)
        target_source = self.fs.lookup(old_parent, name_old)
        try:
            target: int | None = self.fs.lookup(new_parent, name_new)
        except NotFound:
            target = None
        victim = self.fs.inode(target) if target is not None else None
        self.rw.rename(old_parent, name_old, new_parent, name_new, flags)
        if (
            victim is not None
            and victim.ino != target_source
            and not flags & pyfuse3.RENAME_EXCHANGE
        ):
            # The replaced inode lost a name; if that was its last, it is
            # gone, or (still open) on the orphan list until its last release.
            remaining = 0 if victim.is_dir else victim.links_count - 1
            if remaining <= 0:
                if self._open_counts.get(victim.ino, 0) > 0:
                    self._orphans.add(victim.ino)
                else:
                    self._forget_inode(victim.ino)
                    self._bury(victim.ino, victim)

    # -- attributes ----------------------------------------------------------

    @fuse_errors("setattr")
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        ino = ext4_ino(inode)
        changes: dict[str, int] = {}
        if not (
            fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_size
            or fields.update_atime
            or fields.update_mtime
            or fields.update_ctime
        ):
            return self._attributes(ino)
        self._require_writable()
        node = self.fs.inode(ino)
        now = _now_ns()
        mode = node.mode
        if fields.update_mode:
            mode = stat.S_IFMT(node.mode) | (attr.st_mode & _PERMISSION_BITS)
        if fields.update_uid and attr.st_uid != node.uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid and attr.st_gid != node.gid:
            changes["gid"] = attr.st_gid
        if (fields.update_uid or fields.update_gid) and not fields.update_mode and not node.is_dir:
            # chown(2) clears suid (always) and sgid (with group-exec), even
            # for root, as notify_change does for ATTR_KILL_SUID/SGID.
            mode = _killpriv_mode(mode) or mode
        if fields.update_size:
            if not node.is_reg:
                raise pyfuse3.FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)
            if ctx.uid != 0 and not fields.update_mode:
                mode = _killpriv_mode(mode) or mode
            size = attr.st_size
            if size > node.size:
                # Bytes past the old EOF in its last block must read as zeros.
                self.engine.zero_tail(node, size)
            changes["size"] = size
        if mode != node.mode:
            changes["mode"] = mode
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        # Every attribute change moves ctime to now, as notify_change does.
        changes["ctime_ns"] = attr.st_ctime_ns if fields.update_ctime else now
        node = self.rw.setattr(ino, **changes)
        if "size" in changes:
            self.engine.invalidate(ino)
        return self._inode_attributes(node)

    # -- filesystem-wide -----------------------------------------------------

    @fuse_errors("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        info = self.fs.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = info.block_size
        data.f_frsize = info.block_size
        data.f_blocks = info.blocks
        data.f_bfree = info.blocks_free
        data.f_bavail = info.blocks_avail
        data.f_files = info.files
        data.f_ffree = info.files_free
        data.f_favail = info.files_free
        data.f_namemax = info.namelen
        return data

    # -- extended attributes -------------------------------------------------

    @fuse_errors("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # pyfuse3 answers size-0 probes and ERANGE from the returned value.
        value = self.fs.find_xattr(ext4_ino(inode), name)
        if value is None:
            # Most files have no security.selinux or ACL, and `ls -l` asks for both.
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @fuse_errors("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.fs.listxattr(ext4_ino(inode))

    @fuse_errors("setxattr")
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        # pyfuse3 has already checked XATTR_CREATE / XATTR_REPLACE with getxattr.
        self._require_writable()
        self.rw.setxattr(ext4_ino(inode), name, value)

    @fuse_errors("removexattr")
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._require_writable()
        self.rw.removexattr(ext4_ino(inode), name)

    # -- permissions ---------------------------------------------------------

    @fuse_errors("access")
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Only called without default_permissions (which serve always sets);
        # kept correct for mounts that drop it.
        node = self.fs.inode(ext4_ino(inode))
        if mode & os.W_OK and not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if ctx.uid == 0:
            # root may read anything, and execute anything with some x bit.
            return not (mode & os.X_OK) or node.is_dir or bool(node.mode & 0o111)
        if ctx.uid == node.uid:
            granted = (node.mode >> 6) & 0o7
        elif node.gid == ctx.gid or node.gid in pyfuse3.get_sup_groups(ctx.pid):
            granted = (node.mode >> 3) & 0o7
        else:
            granted = node.mode & 0o7
        return mode & granted == mode


def _device_bytes(plan: ReadPlan) -> int:
    return sum(segment.length for segment in plan.segments)
