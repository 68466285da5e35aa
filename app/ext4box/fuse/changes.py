"""The requests that change the namespace or an inode's attributes.

Part of the transport-neutral operations (operations.Operations inherits
this class): create, mknod, mkdir, symlink, link, unlink, rmdir, rename and
setattr, with the rules the VFS leaves to a FUSE server: names longer than
ext4 holds, the umask when the kernel passes it (FUSE_DONT_MASK), ownership
of new inodes in set-group-ID directories, and suid/sgid clearing on
truncate and chown.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ext4box.ext4.format.errors import NotFound
from ext4box.ext4.format.inode import Inode
from ext4box.ext4.read.filesystem import Filesystem
from ext4box.fuse import kernel_times
from ext4box.fuse.attrs import Attributes, ext4_ino
from ext4box.fuse.errors import FuseError, fuse_errors
from ext4box.fuse.killpriv import killpriv_mode, may_have_xattrs, now_ns
from ext4box.iomap.engine import IOMapEngine

if TYPE_CHECKING:
    from ext4box.ext4.write.writable import WritableFilesystem
    from ext4box.fuse.request_records import Context, OpenResult

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2
POSIX_ACL_DEFAULT = b"system.posix_acl_default"
_PERMISSION_BITS = 0o7777
NAME_MAX = 255


def check_name(name: bytes) -> None:
    """ENAMETOOLONG for a name ext4 cannot hold, as the kernel's ext4 answers.

    (The kernel passes FUSE names up to 1024 bytes; ext4's limit is 255.)
    """
    if len(name) > NAME_MAX:
        raise FuseError(errno.ENAMETOOLONG)


@dataclass(frozen=True, slots=True)
class SetattrRequest:
    """The attributes a SETATTR changes (None: unchanged), times already resolved.

    `kill_suidgid` is the kernel's FATTR_KILL_SUIDGID, or None when the
    transport cannot say (then: chown of a non-directory always, truncate by
    anyone but root, as the VFS decides).
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    kill_suidgid: bool | None = None
    # The given times are "now" (utimes(NULL), UTIME_NOW: FATTR_*TIME_NOW), which
    # an append-only inode allows; False when the transport cannot say.
    times_now: bool = False

    def changes_nothing(self) -> bool:
        return (self.mode is None and self.uid is None and self.gid is None
                and self.size is None and self.atime_ns is None and self.mtime_ns is None
                and self.ctime_ns is None)  # fmt: skip


class NamespaceChanges:
    """Mixin of operations.Operations: the state it uses is declared there."""

    fs: Filesystem
    engine: IOMapEngine
    lookup_counts: dict[int, int]
    _open_counts: dict[int, int]
    _orphans: set[int]
    _dead: dict[int, Attributes]

    # Provided by Operations.
    rw: WritableFilesystem
    writeback_cache: bool

    def _require_writable(self) -> None: ...
    def _attributes(self, ino: int) -> Attributes: ...
    def _inode_attributes(self, inode: Inode) -> Attributes: ...
    def remember(self, ino: int) -> None: ...
    def new_handle(self, ino: int, *, writable: bool, uid: int, gid: int = 0,
                   direct: bool = False, flags: int = os.O_RDONLY) -> OpenResult: ...  # fmt: skip

    # -- new inodes ------------------------------------------------------------

    def _new_owner(self, parent: int, mode: int, ctx: Context) -> tuple[int, int]:
        """(mode, gid) of a new inode, as the kernel's inode_init_owner decides.

        The umask first, when the kernel left it to us (FUSE_DONT_MASK): not
        under a default ACL, which replaces it (ext4's posix_acl_create), and
        never for a symlink. In a set-group-ID directory the new inode takes
        the directory's group, and a new subdirectory inherits the bit. (The
        VFS has already stripped an S_ISGID the caller may not set.)
        """
        parent_node = self.fs.inode(parent)
        if ctx.umask is not None and not stat.S_ISLNK(mode) and not (
            may_have_xattrs(parent_node)
            and self.fs.find_xattr(parent, POSIX_ACL_DEFAULT) is not None
        ):
            mode &= ~ctx.umask
        if parent_node.mode & stat.S_ISGID:
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
            return mode, parent_node.gid
        return mode, ctx.gid

    def _entry(self, inode: Inode) -> Attributes:
        self.engine.invalidate(inode.ino)  # an inode number may be reused
        self._dead.pop(inode.ino, None)
        attr = self._inode_attributes(inode)
        self.remember(inode.ino)
        return attr

    @fuse_errors("create")
    def create(self, parent_id: int, name: bytes, mode: int, flags: int, ctx: Context
               ) -> tuple[OpenResult, Attributes]:  # fmt: skip
        check_name(name)
        self._require_writable()
        parent = ext4_ino(parent_id)
        mode, gid = self._new_owner(parent, stat.S_IFREG | (mode & _PERMISSION_BITS), ctx)
        node = self.rw.create(parent, name, mode, ctx.uid, gid)
        attr = self._entry(node)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        handle = self.new_handle(node.ino, writable=writable, uid=ctx.uid, gid=ctx.gid,
                                 direct=bool(flags & os.O_DIRECT), flags=flags)
        return handle, attr

    @fuse_errors("tmpfile")
    def tmpfile(self, parent_id: int, mode: int, flags: int, ctx: Context
                ) -> tuple[OpenResult, Attributes]:  # fmt: skip
        """open(O_TMPFILE): a regular file with no name and no links, on the orphan
        list as ext4_tmpfile leaves it, until linkat gives it a name or its last
        handle closes (then it is freed, as any unlinked file)."""
        self._require_writable()
        parent = ext4_ino(parent_id)
        mode, gid = self._new_owner(parent, stat.S_IFREG | (mode & _PERMISSION_BITS), ctx)
        node = self.rw.tmpfile(parent, mode, ctx.uid, gid)
        attr = self._entry(node)
        self._orphans.add(node.ino)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        handle = self.new_handle(node.ino, writable=writable, uid=ctx.uid, gid=ctx.gid,
                                 direct=bool(flags & os.O_DIRECT), flags=flags)
        return handle, attr

    @fuse_errors("mknod")
    def mknod(self, parent_id: int, name: bytes, mode: int, rdev: int, ctx: Context
              ) -> Attributes:  # fmt: skip
        check_name(name)
        self._require_writable()
        parent = ext4_ino(parent_id)
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        mode, gid = self._new_owner(parent, mode, ctx)
        is_device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        node = self.rw.create(parent, name, mode, ctx.uid, gid, rdev=rdev if is_device else 0)
        return self._entry(node)

    @fuse_errors("mkdir")
    def mkdir(self, parent_id: int, name: bytes, mode: int, ctx: Context) -> Attributes:
        check_name(name)
        self._require_writable()
        parent = ext4_ino(parent_id)
        mode, gid = self._new_owner(parent, stat.S_IFDIR | (mode & _PERMISSION_BITS), ctx)
        node = self.rw.mkdir(parent, name, mode, ctx.uid, gid)
        return self._entry(node)

    @fuse_errors("symlink")
    def symlink(self, parent_id: int, name: bytes, target: bytes, ctx: Context) -> Attributes:
        check_name(name)
        self._require_writable()
        parent = ext4_ino(parent_id)
        _, gid = self._new_owner(parent, stat.S_IFLNK, ctx)
        node = self.rw.symlink(parent, name, target, ctx.uid, gid)
        return self._entry(node)

    @fuse_errors("link")
    def link(self, node_id: int, new_parent_id: int, new_name: bytes) -> Attributes:
        check_name(new_name)
        self._require_writable()
        ino = ext4_ino(node_id)
        with kernel_times.kept(self.rw, ino, writeback_cache=self.writeback_cache):
            node = self.rw.link(ino, ext4_ino(new_parent_id), new_name)
        self._orphans.discard(node.ino)  # an O_TMPFILE inode: named now, kept at close
        attr = self._inode_attributes(node)
        self.remember(node.ino)
        return attr

    # -- removing names ------------------------------------------------------

    def _bury(self, ino: int, before: Inode) -> None:
        """`ino` lost its last name: keep answering getattr (nlink 0) while looked up."""
        if ino in self.lookup_counts:
            attr = self._inode_attributes(before)
            attr.nlink = 0
            self._dead[ino] = attr

    @fuse_errors("unlink")
    def unlink(self, parent_id: int, name: bytes) -> None:
        check_name(name)
        self._require_writable()
        parent = ext4_ino(parent_id)
        # Which inode the name holds matters before the unlink only when some
        # file is open, or under the writeback cache (its times before); else
        # (the common case) the directory is not searched twice.
        still_open = False
        before: Inode | None = None
        if self._open_counts or self.writeback_cache:
            target = self.fs.lookup(parent, name)
            still_open = self._open_counts.get(target, 0) > 0
            before = self.fs.inode(target) if self.writeback_cache else None
        node = self.rw.unlink(parent, name, still_open=still_open)
        ino = node.ino
        if before is not None and before.is_reg and node.links_count:
            # A name left: its ctime is the kernel's (kernel_times.py).
            kernel_times.keep_times(self.rw, ino, (before.mtime_ns, before.ctime_ns), node)
        if node.links_count == 0:
            if still_open:
                self._orphans.add(ino)
            else:
                self.engine.invalidate(ino)
                self._bury(ino, node)

    @fuse_errors("rmdir")
    def rmdir(self, parent_id: int, name: bytes) -> None:
        check_name(name)
        self._require_writable()
        parent = ext4_ino(parent_id)
        ino = self.fs.lookup(parent, name)
        before = self.fs.inode(ino)
        self.rw.rmdir(parent, name)
        self.engine.invalidate(ino)
        self._bury(ino, before)

    @fuse_errors("rename")
    def rename(self, old_parent_id: int, old_name: bytes, new_parent_id: int,
               new_name: bytes, flags: int, ctx: Context | None = None) -> None:  # fmt: skip
        """rename(2) and renameat2's flags. RENAME_WHITEOUT needs `ctx`: the
        whiteout left at the old name is a new inode the caller owns."""
        check_name(old_name)
        check_name(new_name)
        self._require_writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT):
            raise FuseError(errno.EINVAL)
        old_parent = ext4_ino(old_parent_id)
        new_parent = ext4_ino(new_parent_id)
        whiteout_owner: tuple[int, int] | None = None
        if flags & RENAME_WHITEOUT:
            if ctx is None:
                raise FuseError(errno.EINVAL)
            _, gid = self._new_owner(old_parent, stat.S_IFCHR, ctx)
            whiteout_owner = (ctx.uid, gid)
        source = self.fs.lookup(old_parent, old_name)
        try:
            target: int | None = self.fs.lookup(new_parent, new_name)
        except NotFound:
            target = None
        victim = self.fs.inode(target) if target is not None else None
        exchanged = target is not None and bool(flags & RENAME_EXCHANGE)
        wb = self.writeback_cache
        with (kernel_times.kept(self.rw, source, writeback_cache=wb),
              kernel_times.kept(self.rw, target or source, writeback_cache=wb and exchanged)):
            self.rw.rename(old_parent, old_name, new_parent, new_name, flags,
                           whiteout_owner=whiteout_owner)
        if whiteout_owner is not None:
            # The whiteout is a new inode; its number may be one the kernel still holds.
            whiteout = self.fs.lookup(old_parent, old_name)
            self.engine.invalidate(whiteout)
            self._dead.pop(whiteout, None)
        if victim is not None and victim.ino != source and not flags & RENAME_EXCHANGE:
            # The replaced inode lost a name; if that was its last, it is
            # gone, or (still open) on the orphan list until its last release.
            remaining = 0 if victim.is_dir else victim.links_count - 1
            if remaining <= 0:
                if self._open_counts.get(victim.ino, 0) > 0:
                    self._orphans.add(victim.ino)
                else:
                    self.engine.invalidate(victim.ino)
                    self._bury(victim.ino, victim)

    # -- attributes ----------------------------------------------------------

    @fuse_errors("setattr")
    def setattr(self, node_id: int, req: SetattrRequest, ctx: Context) -> Attributes:
        ino = ext4_ino(node_id)
        dead = self._dead.get(ino)
        if dead is not None:
            # Freed by its last unlink while the kernel still holds it: no fd
            # and no name can reach it, only the writeback cache's flush of
            # the ctime that unlink stamped (fuse_update_ctime_in_cache).
            return dead
        if req.changes_nothing() and not self.writable:
            return self._attributes(ino)
        # A SETATTR naming no field is chown(path, -1, -1) (FATTR_CTIME comes only
        # with the writeback cache): ctime still becomes now below, as on ext4.
        self._require_writable()
        node = self.fs.inode(ino)
        changes: dict[str, int] = {}
        mode = node.mode
        if req.mode is not None:
            mode = stat.S_IFMT(node.mode) | (req.mode & _PERMISSION_BITS)
        if req.uid is not None and req.uid != node.uid:
            changes["uid"] = req.uid
        if req.gid is not None and req.gid != node.gid:
            changes["gid"] = req.gid
        # An empty SETATTR is chown(path, -1, -1): a chown all the same. Under
        # the writeback cache it names the kernel's ctime, and nothing else does
        # (the kernel's own time flush brings mtime too).
        empty = req.changes_nothing() or (
            self.writeback_cache and req.ctime_ns is not None
            and dataclasses.replace(req, ctime_ns=None).changes_nothing())
        chown = req.uid is not None or req.gid is not None or empty
        if req.kill_suidgid is None:
            # chown(2) clears suid (always) and sgid (with group-exec), even
            # for root, as notify_change does for ATTR_KILL_SUID/SGID; a
            # truncate only for a caller without CAP_FSETID.
            kill = (chown and not node.is_dir) or (req.size is not None and ctx.uid != 0)
        else:
            # The kernel's FATTR_KILL_SUIDGID comes with a chown that names an
            # owner, never with chown(-1, -1), which clears the bits on ext4 too.
            kill = (req.kill_suidgid or empty) and not node.is_dir
        if kill and req.mode is None:
            mode = killpriv_mode(mode) or mode
        if req.size is not None:
            if not node.is_reg:
                raise FuseError(errno.EISDIR if node.is_dir else errno.EINVAL)
            if req.size > node.size:
                # Bytes past the old EOF in its last block must read as zeros.
                self.engine.zero_tail(node, req.size)
            changes["size"] = req.size
        if mode != node.mode:
            changes["mode"] = mode
        if req.atime_ns is not None:
            changes["atime_ns"] = req.atime_ns
        if req.mtime_ns is not None:
            changes["mtime_ns"] = req.mtime_ns
        # Every attribute change moves ctime to now, as notify_change does.
        changes["ctime_ns"] = req.ctime_ns if req.ctime_ns is not None else now_ns()
        node = self.rw.setattr(ino, **changes, times_now=req.times_now)
        if "size" in changes:
            self.engine.invalidate(ino)
        return self._inode_attributes(node)
