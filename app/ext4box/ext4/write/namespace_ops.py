"""Names: create, mkdir, symlink, link, unlink, rmdir and rename, as the kernel's ext4 does them.

Each operation checks everything that can be refused first, then does the one
step that can run out of space (adding a name, allocating a block), undoing
what it took when that fails, and only then the steps that cannot fail
(removing names, retargeting, link counts, times). Link counts follow the
kernel's ext4_inc_count/ext4_dec_count (dir_nlink: an indexed directory past
65000 subdirectories counts 1).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from typing import TYPE_CHECKING

from ext4box.ext4.format import features as F
from ext4box.ext4.format.dir_block import EXT4_FT_DIR
from ext4box.ext4.format.errors import (
    Corrupt,
    Exists,
    Ext4Error,
    IsADirectory,
    NameTooLong,
    NotADirectory,
    NotEmpty,
    NotFound,
    TooManyLinks,
    inode_where,
)
from ext4box.ext4.format.inline_data import INLINE_IBLOCK_SIZE, SYSTEM_DATA_NAME
from ext4box.ext4.format.inode import FL_EXTENTS, FL_INLINE_DATA, ROOT_INO, Inode, replace_inode
from ext4box.ext4.format.xattr import XattrEntry, parse_ibody_xattrs
from ext4box.ext4.write import (
    attr_ops,
    flag_guards,
    orphans,
)
from ext4box.ext4.write.dir_access import (
    LINK_MAX,
    DirHandle,
    _with_ibody,
    dec_dir_links,
    dir_link_max,
    inc_dir_links,
)
from ext4box.ext4.write.dir_writer import new_dir_block, new_inline_dir_body, validate_name
from ext4box.ext4.write.inline_writer import (
    FAST_SYMLINK_MAX,
    InlineState,
    empty_extent_root,
    fast_symlink_i_block,
    max_inline_size,
)

if TYPE_CHECKING:
    from ext4box.ext4.write.context import WriteContext

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_FILE_TYPES = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}
# Flags a new inode takes from its directory (EXT4_FL_INHERITED), and the
# masks for non-directories (EXT4_REG_FLMASK, EXT4_OTHER_FLMASK).
_FL_DIRSYNC, _FL_TOPDIR, _FL_PROJINHERIT, _FL_CASEFOLD = 0x10000, 0x20000, 0x20000000, 0x40000000
_FL_NODUMP, _FL_NOATIME = 0x40, 0x80
_FL_INHERITED = (0x1 | 0x2 | 0x4 | 0x8 | _FL_NODUMP | _FL_NOATIME | 0x400 | 0x4000 | 0x8000
                 | _FL_DIRSYNC | _FL_PROJINHERIT | _FL_CASEFOLD | 0x2000000)
_FL_REG_MASK = ~(_FL_DIRSYNC | _FL_TOPDIR | _FL_CASEFOLD | _FL_PROJINHERIT)
_FL_OTHER_MASK = _FL_NODUMP | _FL_NOATIME
_U32X2 = struct.Struct("<II")


class NotPermitted(Ext4Error):
    errno = errno.EPERM


class InvalidArgument(Ext4Error):
    errno = errno.EINVAL


def file_type(mode: int) -> int:
    return _FILE_TYPES.get(stat.S_IFMT(mode), 0)


def _inherit_flags(parent_flags: int, mode: int) -> int:
    flags = parent_flags & _FL_INHERITED
    if stat.S_ISDIR(mode):
        return flags
    if stat.S_ISREG(mode):
        return flags & _FL_REG_MASK
    return flags & _FL_OTHER_MASK


def _rdev_i_block(rdev: int) -> bytes:
    """i_block of a device inode: the old 16-bit encoding when it fits, else the new one."""
    major, minor = os.major(rdev), os.minor(rdev)
    if major < 256 and minor < 256:
        words = ((major << 8) | minor, 0)
    else:
        words = (0, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12))
    return _U32X2.pack(*words) + bytes(INLINE_IBLOCK_SIZE - _U32X2.size)


def _new_inode(fs: WriteContext, parent: Inode, ino: int, mode: int, uid: int, gid: int,
               now: int) -> Inode:
    inode = fs.table.blank(ino)
    flags = _inherit_flags(parent.flags, mode)
    i_block = bytes(INLINE_IBLOCK_SIZE)
    if fs.has_extents and (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        flags |= FL_EXTENTS
        i_block = empty_extent_root()
    return replace_inode(
        inode, mode=mode, uid=uid, gid=gid, links_count=1, atime_ns=now, mtime_ns=now,
        ctime_ns=now, crtime_ns=now, flags=flags, i_block=i_block,
        projid=parent.projid if parent.flags & _FL_PROJINHERIT else 0)


def _check_quota_new(fs: WriteContext, parent: Inode, uid: int, gid: int, *,
                     blocks: int = 0) -> None:
    """EDQUOT before anything is taken, as the kernel charges a new inode (and its
    first block) to its owners before it is linked."""
    if fs.quota is not None:
        projid = parent.projid if parent.flags & _FL_PROJINHERIT else 0
        fs.quota.check(uid, gid, projid, space=blocks * fs.block_size, inodes=1)


def _parent_for_new(fs: WriteContext, parent: int, name: bytes) -> DirHandle:
    validate_name(name)
    handle = DirHandle(fs, parent)
    if name in (b".", b"..") or handle.writer.lookup(name) is not None:
        raise Exists(f"{name!r} exists in directory inode {parent}")
    flag_guards.check_may_add(handle.inode)
    return handle


def _with_inherited_acls(fs: WriteContext, parent: Inode, inode: Inode) -> Inode:
    """The new inode with its directory's default ACL applied; on failure its number is
    given back (nothing else was taken yet)."""
    try:
        return attr_ops.inherit_acls(fs, parent, inode)
    except BaseException:
        fs.inodes.free(inode.ino, inode.is_dir)
        raise


def _discard_new(fs: WriteContext, inode: Inode) -> None:
    """Undo a new inode that never got a name: its xattr block, then its number."""
    fs.drop_xattr_block(inode)
    fs.inodes.free(inode.ino, inode.is_dir)


def _add_or_undo(handle: DirHandle, name: bytes, ino: int, ftype: int, undo) -> None:
    """Add the name; on failure keep what the directory became (it stays well formed,
    maybe a block larger), run `undo` and re-raise."""
    try:
        handle.writer.add(name, ino, ftype)
    except BaseException:
        handle.finish(0, touch=False)
        undo()
        raise


# ---- creating --------------------------------------------------------------------


def create(fs: WriteContext, parent: int, name: bytes, mode: int, uid: int, gid: int,
           rdev: int = 0) -> Inode:
    fmt = stat.S_IFMT(mode) or stat.S_IFREG
    if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
        raise InvalidArgument(f"create of file type 0o{fmt:o}")
    mode = fmt | (mode & 0o7777)
    handle = _parent_for_new(fs, parent, name)
    _check_quota_new(fs, handle.inode, uid, gid)
    now = fs.now_ns()
    ino = fs.inodes.alloc(parent, is_dir=False)
    inode = _new_inode(fs, handle.inode, ino, mode, uid, gid, now)
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        inode = replace_inode(inode, i_block=_rdev_i_block(rdev))
    inode = _with_inherited_acls(fs, handle.inode, inode)
    _add_or_undo(handle, name, ino, file_type(mode), lambda: _discard_new(fs, inode))
    stored = fs.store(inode)
    handle.finish(now)
    return stored


def tmpfile(fs: WriteContext, parent: int, mode: int, uid: int, gid: int) -> Inode:
    """open(O_TMPFILE), as ext4_tmpfile: a regular inode with no name and no links, on
    the orphan list until link() names it or its last close frees it (orphans.release).
    The directory itself does not change."""
    mode = stat.S_IFREG | (mode & 0o7777)
    handle = DirHandle(fs, parent)
    flag_guards.check_may_add(handle.inode)
    _check_quota_new(fs, handle.inode, uid, gid)
    ino = fs.inodes.alloc(parent, is_dir=False)
    inode = _new_inode(fs, handle.inode, ino, mode, uid, gid, fs.now_ns())
    inode = _with_inherited_acls(fs, handle.inode, inode)
    return fs.store(orphans.add(fs, replace_inode(inode, links_count=0)))


def _inline_dir_body(fs: WriteContext, inode: Inode, parent: int) -> Inode | None:
    """A new directory stored inline (inline_data), or None if the inode has no room."""
    area = inode.ibody_xattr_area
    # In-inode attributes already there (inherited ACLs) stay; system.data needs room too.
    entries = list(parse_ibody_xattrs(area, ino=inode.ino)) if area else []
    state = InlineState(ino=inode.ino, i_block=inode.i_block, size=0,
                        ibody_entries=tuple(entries), ibody_size=len(area))
    if max_inline_size(state) < INLINE_IBLOCK_SIZE:
        return None
    flags = (inode.flags & ~FL_EXTENTS) | FL_INLINE_DATA
    return _with_ibody(inode, [*entries, XattrEntry(SYSTEM_DATA_NAME, b"")],
                       i_block=new_inline_dir_body(parent), size=INLINE_IBLOCK_SIZE, flags=flags)


def mkdir(fs: WriteContext, parent: int, name: bytes, mode: int, uid: int,
          gid: int) -> Inode:
    handle = _parent_for_new(fs, parent, name)
    sb = fs.sb
    if dir_link_max(handle.inode.links_count, handle.is_dx,
                    sb.has_ro_compat(F.RO_COMPAT_DIR_NLINK)):
        raise TooManyLinks(f"directory inode {parent} has {handle.inode.links_count} links")
    _check_quota_new(fs, handle.inode, uid, gid,
                     blocks=0 if sb.has_incompat(F.INCOMPAT_INLINE_DATA) else 1)
    now = fs.now_ns()
    ino = fs.inodes.alloc(parent, is_dir=True)
    inode = _new_inode(fs, handle.inode, ino, stat.S_IFDIR | (mode & 0o7777), uid, gid, now)
    inode = _with_inherited_acls(fs, handle.inode, replace_inode(inode, links_count=2))
    with_acls = inode
    inline = None
    if sb.has_incompat(F.INCOMPAT_INLINE_DATA):
        inline = _inline_dir_body(fs, inode, parent)
    taken: list[int] = []

    def undo() -> None:
        for pblk in taken:
            fs.free_block(pblk)
        _discard_new(fs, with_acls)

    if inline is not None:
        inode = inline
    else:
        try:
            pblk = fs.alloc_meta_block(fs.group_goal(ino))
        except BaseException:
            _discard_new(fs, with_acls)
            raise
        taken.append(pblk)
        tree = fs.tree_writer(inode)
        try:
            tree.insert(0, pblk, 1)  # a depth-0 root: never needs a tree block
        except BaseException:
            undo()
            raise
        inode = replace_inode(fs.with_tree(inode, tree, 1), size=fs.block_size)
        fs.writer.write(pblk, new_dir_block(
            ino=ino, parent_ino=parent, block_size=fs.block_size,
            has_filetype=sb.has_incompat(F.INCOMPAT_FILETYPE),
            csum_seed=inode.csum_seed if sb.metadata_csum else None))
    _add_or_undo(handle, name, ino, EXT4_FT_DIR, undo)
    stored = fs.store(inode)
    handle.finish(now, links=inc_dir_links(handle.inode.links_count, handle.is_dx))
    return stored


def symlink(fs: WriteContext, parent: int, name: bytes, target: bytes, uid: int,
            gid: int) -> Inode:
    if not target:
        raise NotFound("empty symlink target")
    if b"\0" in target:
        raise InvalidArgument("symlink target with a NUL byte")
    if len(target) + 1 > fs.block_size:  # the kernel counts the terminating NUL
        raise NameTooLong(f"symlink target of {len(target)} bytes")
    handle = _parent_for_new(fs, parent, name)
    _check_quota_new(fs, handle.inode, uid, gid,
                     blocks=0 if len(target) <= FAST_SYMLINK_MAX else 1)
    now = fs.now_ns()
    ino = fs.inodes.alloc(parent, is_dir=False)
    inode = _new_inode(fs, handle.inode, ino, stat.S_IFLNK | 0o777, uid, gid, now)
    inode = replace_inode(inode, size=len(target))
    taken: list[int] = []

    def undo() -> None:
        for pblk in taken:
            fs.blocks.free(pblk, 1)
        fs.inodes.free(ino, False)

    if len(target) <= FAST_SYMLINK_MAX:
        inode = replace_inode(inode, i_block=fast_symlink_i_block(target),
                                    flags=inode.flags & ~FL_EXTENTS)
    else:
        try:
            pblk, _ = fs.blocks.alloc(fs.group_goal(ino), 1)
        except BaseException:
            fs.inodes.free(ino, False)
            raise
        taken.append(pblk)
        tree = fs.tree_writer(inode)
        try:
            tree.insert(0, pblk, 1)
        except BaseException:
            undo()
            raise
        # Data first: the target is on the device before anything points at it.
        fs.dev.pwrite(pblk * fs.block_size, target.ljust(fs.block_size, b"\0"))
        inode = fs.with_tree(inode, tree, 1)
    _add_or_undo(handle, name, ino, file_type(inode.mode), undo)
    stored = fs.store(inode)
    handle.finish(now)
    return stored


def link(fs: WriteContext, ino: int, new_parent: int, new_name: bytes) -> Inode:
    inode = fs.inode(ino)
    if inode.is_dir:
        raise NotPermitted(f"hard link to directory inode {ino}")
    if inode.links_count == 0 and ino not in fs.open_orphans:
        raise NotFound(f"inode {ino} has no name left to link")
    if inode.links_count >= LINK_MAX:
        raise TooManyLinks(f"inode {ino} has {inode.links_count} links")
    flag_guards.check_may_link(inode)
    handle = _parent_for_new(fs, new_parent, new_name)
    _add_or_undo(handle, new_name, ino, file_type(inode.mode), lambda: None)
    now = fs.now_ns()
    inode = fs.inode(ino)
    if inode.links_count == 0:  # an O_TMPFILE (or unlinked, open) inode gets a name
        inode = orphans.remove(fs, inode)
    stored = fs.store(replace_inode(inode, links_count=inode.links_count + 1,
                                          ctime_ns=now))
    handle.finish(now)
    return stored


# ---- removing --------------------------------------------------------------------


def _drop_link(fs: WriteContext, ino: int, now: int, *, still_open: bool) -> Inode:
    """One name less for a non-directory: orphan or free it when it was the last."""
    inode = fs.inode(ino)
    links = inode.links_count - 1 if inode.links_count else 0
    inode = replace_inode(inode, links_count=links, ctime_ns=now)
    if links:
        return fs.store(inode)
    if still_open:
        return fs.store(orphans.add(fs, inode))
    fs.evict(inode)
    return inode


def unlink(fs: WriteContext, parent: int, name: bytes, *, still_open: bool) -> Inode:
    validate_name(name)
    handle = DirHandle(fs, parent)
    entry = handle.writer.lookup(name)
    if entry is None or name in (b".", b".."):
        raise NotFound(f"{name!r} not in directory inode {parent}")
    target = fs.inode(entry.inode)
    flag_guards.check_may_delete(handle.inode, target)
    if target.is_dir:
        raise IsADirectory(f"{name!r} is a directory")
    if target.links_count <= 1 and not still_open:
        orphans.check_evictable(fs, target)
    handle.writer.remove(name)
    now = fs.now_ns()
    handle.finish(now)
    return _drop_link(fs, entry.inode, now, still_open=still_open)


def _empty_dir(fs: WriteContext, ino: int) -> bool:
    return DirHandle(fs, ino).writer.is_empty()


def rmdir(fs: WriteContext, parent: int, name: bytes) -> None:
    validate_name(name)
    if name == b".":
        raise InvalidArgument("rmdir of '.'")
    if name == b"..":
        raise NotEmpty("rmdir of '..'")
    handle = DirHandle(fs, parent)
    entry = handle.writer.lookup(name)
    if entry is None:
        raise NotFound(f"{name!r} not in directory inode {parent}")
    flag_guards.check_may_delete(handle.inode, fs.inode(entry.inode))
    if not fs.inode(entry.inode).is_dir:
        raise NotADirectory(f"{name!r} is not a directory")
    if not _empty_dir(fs, entry.inode):
        raise NotEmpty(f"directory {name!r} is not empty")
    orphans.check_evictable(fs, fs.inode(entry.inode))
    handle.writer.remove(name)
    now = fs.now_ns()
    handle.finish(now, links=dec_dir_links(handle.inode.links_count))
    fs.evict(replace_inode(fs.inode(entry.inode), links_count=0))


# ---- rename ----------------------------------------------------------------------


def _within(fs: WriteContext, dir_ino: int, start: int) -> bool:
    """Whether directory `start` is `dir_ino` or lies below it (walking up '..')."""
    current = start
    for _ in range(fs.sb.inodes_count):
        if current == dir_ino:
            return True
        if current == ROOT_INO:
            return False
        parent = fs.lookup(current, b"..")
        if parent == current:
            return False
        current = parent
    raise Corrupt("directory tree", inode_where(start), "'..' chain does not reach the root")


def _check_not_ancestor(fs: WriteContext, dir_ino: int, start: int) -> None:
    """EINVAL for a move of directory `dir_ino` into its own subtree (at `start`)."""
    if _within(fs, dir_ino, start):
        raise InvalidArgument(f"directory inode {dir_ino} would move into its own subtree")


def _set_dotdot(fs: WriteContext, dir_ino: int, parent: int) -> None:
    child = DirHandle(fs, dir_ino)
    child.writer.retarget(b"..", parent, EXT4_FT_DIR)
    child.finish(0, touch=False)


def _touch(fs: WriteContext, ino: int, now: int) -> None:
    fs.store(replace_inode(fs.inode(ino), ctime_ns=now))


def rename(fs: WriteContext, old_parent: int, old_name: bytes, new_parent: int,
           new_name: bytes, flags: int = 0, *,
           whiteout_owner: tuple[int, int] | None = None) -> None:
    """rename(2) with renameat2's flags; RENAME_WHITEOUT leaves a whiteout owned by
    `whiteout_owner` (uid, gid) at the old name, as ext4_rename does."""
    if (flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT)
            or (flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT))
            or bool(flags & RENAME_WHITEOUT) != (whiteout_owner is not None)):
        raise InvalidArgument(f"rename flags 0x{flags:x}")
    for name in (old_name, new_name):
        validate_name(name)
        if name in (b".", b".."):
            raise InvalidArgument("rename of '.' or '..'")
    same_dir = old_parent == new_parent
    src_dir = DirHandle(fs, old_parent)
    entry = src_dir.writer.lookup(old_name)
    if entry is None:
        raise NotFound(f"{old_name!r} not in directory inode {old_parent}")
    src = fs.inode(entry.inode)
    dst_dir = src_dir if same_dir else DirHandle(fs, new_parent)
    target = dst_dir.writer.lookup(new_name)
    dir_nlink = fs.sb.has_ro_compat(F.RO_COMPAT_DIR_NLINK)
    if flags & RENAME_EXCHANGE:
        if target is None:
            raise NotFound(f"{new_name!r} not in directory inode {new_parent}")
        _check_rename_flags(fs, src_dir, dst_dir, src, target.inode)
        _exchange(fs, src_dir, dst_dir, old_name, new_name, src, fs.inode(target.inode),
                  dir_nlink)
        return
    dst: Inode | None = None
    if target is not None and flags & RENAME_NOREPLACE:
        raise Exists(f"{new_name!r} exists in directory inode {new_parent}")
    _check_rename_flags(fs, src_dir, dst_dir, src, None if target is None else target.inode)
    # The VFS checks the tree shape before the file types (do_renameat2's traps).
    if src.is_dir and not same_dir:
        _check_not_ancestor(fs, src.ino, new_parent)
    if target is not None:
        if target.inode == src.ino:
            return  # two names of one inode: POSIX says do nothing
        dst = fs.inode(target.inode)
        if dst.is_dir and not same_dir and _within(fs, dst.ino, old_parent):
            raise NotEmpty(f"{new_name!r} is an ancestor of the source")
        if src.is_dir and not dst.is_dir:
            raise NotADirectory(f"{new_name!r} is not a directory")
        if not src.is_dir and dst.is_dir:
            raise IsADirectory(f"{new_name!r} is a directory")
        if dst.is_dir and not _empty_dir(fs, dst.ino):
            raise NotEmpty(f"directory {new_name!r} is not empty")
        if dst.is_dir or (dst.links_count <= 1 and not fs.is_open(dst.ino)):
            orphans.check_evictable(fs, dst)
    if src.is_dir and not same_dir and dst is None and dir_link_max(
            dst_dir.inode.links_count, dst_dir.is_dx, dir_nlink):
        raise TooManyLinks(f"directory inode {new_parent} has too many links")
    now = fs.now_ns()
    whiteout = (None if whiteout_owner is None
                else _new_whiteout(fs, src_dir.inode, whiteout_owner, now))

    def undo() -> None:
        if whiteout is not None:
            _discard_new(fs, whiteout)

    if dst is None:
        _add_or_undo(dst_dir, new_name, src.ino, file_type(src.mode), undo)
    else:
        dst_dir.writer.retarget(new_name, src.ino, file_type(src.mode))
    if whiteout is None:
        src_dir.writer.remove(old_name)
    else:  # the old entry now names the whiteout: no space needed
        src_dir.writer.retarget(old_name, whiteout.ino, file_type(whiteout.mode))
        fs.store(whiteout)
    if src.is_dir:
        new_links = dst_dir.inode.links_count
        if dst is None:
            new_links = inc_dir_links(new_links, dst_dir.is_dx)
        if same_dir:
            src_dir.finish(now, links=dec_dir_links(new_links))
        else:
            dst_dir.finish(now, links=new_links)
            src_dir.finish(now, links=dec_dir_links(src_dir.inode.links_count))
            _set_dotdot(fs, src.ino, new_parent)
    else:
        dst_dir.finish(now)
        if not same_dir:
            src_dir.finish(now)
    _touch(fs, src.ino, now)
    if dst is not None:
        if dst.is_dir:
            fs.evict(replace_inode(fs.inode(dst.ino), links_count=0))
        else:
            _drop_link(fs, dst.ino, now, still_open=fs.is_open(dst.ino))


def _new_whiteout(fs: WriteContext, parent: Inode, owner: tuple[int, int], now: int) -> Inode:
    """The whiteout ext4_whiteout_for_rename makes before the rename changes anything
    (so ENOSPC or EDQUOT refuse the rename whole): a character device 0:0, mode 0,
    owned as any new inode in `parent`."""
    uid, gid = owner
    _check_quota_new(fs, parent, uid, gid)
    ino = fs.inodes.alloc(parent.ino, is_dir=False)
    inode = _new_inode(fs, parent, ino, stat.S_IFCHR, uid, gid, now)
    return _with_inherited_acls(fs, parent, inode)


def _check_rename_flags(fs: WriteContext, src_dir: DirHandle, dst_dir: DirHandle,
                        src: Inode, target_ino: int | None) -> None:
    """vfs_rename's flag checks: nothing for two names of one inode; else may_delete
    of the source, then may_delete of the target or may_create in its directory."""
    if target_ino == src.ino:
        return
    flag_guards.check_may_delete(src_dir.inode, src)
    if target_ino is None:
        flag_guards.check_may_add(dst_dir.inode)
    else:
        flag_guards.check_may_delete(dst_dir.inode, fs.inode(target_ino))


def _exchange(fs: WriteContext, src_dir: DirHandle, dst_dir: DirHandle, old_name: bytes,
              new_name: bytes, src: Inode, dst: Inode, dir_nlink: bool) -> None:
    """RENAME_EXCHANGE: swap what two names point at (ext4_cross_rename)."""
    if src.ino == dst.ino:
        return
    old_parent, new_parent = src_dir.inode.ino, dst_dir.inode.ino
    same_dir = old_parent == new_parent
    if not same_dir:
        if src.is_dir:
            _check_not_ancestor(fs, src.ino, new_parent)
        if dst.is_dir:
            _check_not_ancestor(fs, dst.ino, old_parent)
        if src.is_dir and not dst.is_dir and dir_link_max(
                dst_dir.inode.links_count, dst_dir.is_dx, dir_nlink):
            raise TooManyLinks(f"directory inode {new_parent} has too many links")
        if dst.is_dir and not src.is_dir and dir_link_max(
                src_dir.inode.links_count, src_dir.is_dx, dir_nlink):
            raise TooManyLinks(f"directory inode {old_parent} has too many links")
    now = fs.now_ns()
    dst_dir.writer.retarget(new_name, src.ino, file_type(src.mode))
    src_dir.writer.retarget(old_name, dst.ino, file_type(dst.mode))
    if same_dir:
        src_dir.finish(now)
    else:
        old_links, new_links = src_dir.inode.links_count, dst_dir.inode.links_count
        if src.is_dir and not dst.is_dir:
            new_links = inc_dir_links(new_links, dst_dir.is_dx)
            old_links = dec_dir_links(old_links)
        elif dst.is_dir and not src.is_dir:
            old_links = inc_dir_links(old_links, src_dir.is_dx)
            new_links = dec_dir_links(new_links)
        dst_dir.finish(now, links=new_links)
        src_dir.finish(now, links=old_links)
        if src.is_dir:
            _set_dotdot(fs, src.ino, new_parent)
        if dst.is_dir:
            _set_dotdot(fs, dst.ino, old_parent)
    _touch(fs, src.ino, now)
    _touch(fs, dst.ino, now)
