"""pyfuse3 Operations for a read-only ext4 filesystem: a thin adapter.

Each handler translates FUSE arguments, calls the facade or the iomap engine,
and lets `fuse_errors` map failures to errno values. The only state kept here
is what FUSE itself defines: lookup counts and open handles.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Sequence

import pyfuse3
import trio

from ext4box.ext4.filesystem import Filesystem
from ext4box.ext4.inode import Inode
from ext4box.fuse.attrs import (
    check_child_ino,
    entry_attributes,
    ext4_ino,
    placeholder_attributes,
)
from ext4box.fuse.errors import fuse_errors, to_fuse_error
from ext4box.iomap.engine import IOMapEngine, ReadPlan
from ext4box.log import get_logger

log = get_logger("ext4box.fuse")

# Plans with at least this many device bytes are executed in a worker thread:
# the trio loop keeps accepting requests (and the kernel's parallel
# readahead gets parallel preads) while the thread waits on the device.
THREADED_READ_BYTES = 64 * 1024

_DOT_NAMES = (b".", b"..")


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
        self.lookup_counts: dict[int, int] = {}
        self._open_files: dict[int, Inode] = {}
        self._open_dirs: dict[int, int] = {}
        self._handle_ids = itertools.count(1)

    # -- names and attributes ------------------------------------------------

    def _attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.fs.inode(ino), self.block_size)

    def _remember(self, ino: int) -> None:
        self.lookup_counts[ino] = self.lookup_counts.get(ino, 0) + 1

    @fuse_errors("lookup")
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        dir_ino = ext4_ino(parent_inode)
        ino = self.fs.lookup(dir_ino, name)
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

    @fuse_errors("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(ext4_ino(inode))

    @fuse_errors("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(ext4_ino(inode))

    # -- files -------------------------------------------------------------------

    @fuse_errors("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self.fs.inode(ext4_ino(inode))
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fh = next(self._handle_ids)
        self._open_files[fh] = node
        # The image never changes under a read-only mount, so pages cached by
        # an earlier open stay valid.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_errors("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._open_files.get(fh)
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        plan = self.engine.plan_read(node, off, size)
        if _device_bytes(plan) >= THREADED_READ_BYTES:
            return await trio.to_thread.run_sync(self.engine.execute, plan)
        return self.engine.execute(plan)

    async def release(self, fh: int) -> None:
        self._open_files.pop(fh, None)

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
        return self.fs.getxattr(ext4_ino(inode), name)

    @fuse_errors("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.fs.listxattr(ext4_ino(inode))

    # -- permissions ---------------------------------------------------------

    @fuse_errors("access")
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Only called without default_permissions (which serve always sets);
        # kept correct for mounts that drop it.
        node = self.fs.inode(ext4_ino(inode))
        if mode & os.W_OK:
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
