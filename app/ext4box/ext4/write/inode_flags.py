"""Which inode flags a caller sees and may change: FS_IOC_GETFLAGS/SETFLAGS and
FS_IOC_FSGETXATTR/FSSETXATTR (chattr, lsattr, xfs_io), as Linux decides for ext4.

The rules are the VFS's vfs_fileattr_set/fileattr_set_prepare followed by
ext4_fileattr_set, ext4_ioctl_check_immutable, ext4_ioctl_setflags and
ext4_ioctl_setproject (Linux 6.18):

- only the owner or root may change anything (EPERM);
- changing IMMUTABLE or APPEND needs CAP_LINUX_IMMUTABLE, JOURNAL_DATA needs
  CAP_SYS_RESOURCE: through FUSE we know only the caller's uid, so uid 0 has
  them and nobody else (EPERM);
- a flag outside EXT4_FL_USER_VISIBLE is EOPNOTSUPP; visible flags that may not
  be changed (INDEX, INLINE_DATA, ENCRYPT, VERITY, ...) are silently kept as
  they are, because chattr sends back what lsattr read;
- a flag that does not apply to the file type (DIRSYNC/TOPDIR/CASEFOLD/
  PROJINHERIT on a non-directory, anything but NODUMP/NOATIME on a special
  file) is EOPNOTSUPP;
- while IMMUTABLE stays set, nothing else may change, compared against the
  raw i_flags (so even `chattr +i` again fails on an htree directory, as in
  the kernel) and the project id (EPERM);
- DAX is exclusive with JOURNAL_DATA (and VERITY/ENCRYPT/INLINE_DATA on files):
  EOPNOTSUPP; CASEFOLD changes need the feature (EOPNOTSUPP), a directory
  (ENOTDIR) that is empty (ENOTEMPTY);
- the flags are stored with a new ctime; then JOURNAL_DATA (recorded only when
  the filesystem has a journal, as ext4_change_inode_journal_flag does; the
  data itself stays in ordered mode here) and the EXTENTS change: clearing it
  converts a file of one written depth-0 extent within the first 12 blocks back
  to a block map (ext4_ind_migrate), else EOPNOTSUPP; setting it converts the
  block map into an extent tree (ext4_ext_migrate; EINVAL without the extents
  feature or for inline data). Like the kernel, a refused EXTENTS change
  leaves the other flag changes in place;
- the project id (FSSETXATTR): EOPNOTSUPP without the project feature (unless
  0) or when the inode has no room for i_projid; the new ctime.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ext4box.ext4.format import features as F
from ext4box.ext4.format.blockmap import BlockMapMapper
from ext4box.ext4.format.errors import (
    InvalidArgument,
    NotADirectory,
    NotEmpty,
    NotPermitted,
    Unsupported,
    inode_where,
)
from ext4box.ext4.format.inode import FL_EXTENTS, FL_IMMUTABLE, Inode, replace_inode
from ext4box.ext4.write.dir_access import DirHandle
from ext4box.ext4.write.inline_writer import empty_extent_root

if TYPE_CHECKING:
    from ext4box.ext4.read.filesystem import Filesystem
    from ext4box.ext4.write.context import WriteContext

# i_flags bits (EXT4_*_FL, the same values as FS_*_FL).
SECRM, UNRM, COMPR, SYNC = 0x1, 0x2, 0x4, 0x8
IMMUTABLE, APPEND, NODUMP, NOATIME = 0x10, 0x20, 0x40, 0x80
DIRTY, COMPRBLK, NOCOMPR, ENCRYPT = 0x100, 0x200, 0x400, 0x800
INDEX, IMAGIC, JOURNAL_DATA, NOTAIL = 0x1000, 0x2000, 0x4000, 0x8000
DIRSYNC, TOPDIR, HUGE_FILE, EXTENTS = 0x10000, 0x20000, 0x40000, 0x80000
VERITY, EA_INODE, EOFBLOCKS, DAX = 0x100000, 0x200000, 0x400000, 0x2000000
INLINE_DATA, PROJINHERIT, CASEFOLD = 0x10000000, 0x20000000, 0x40000000

USER_MODIFIABLE = (SECRM | UNRM | COMPR | SYNC | IMMUTABLE | APPEND | NODUMP | NOATIME
                   | JOURNAL_DATA | NOTAIL | DIRSYNC | TOPDIR | EXTENTS | EOFBLOCKS | DAX
                   | PROJINHERIT | CASEFOLD)
USER_VISIBLE = (USER_MODIFIABLE | DIRTY | COMPRBLK | NOCOMPR | ENCRYPT | INDEX | VERITY
                | INLINE_DATA)
_REG_MASK = ~(DIRSYNC | TOPDIR | CASEFOLD | PROJINHERIT)
_OTHER_MASK = NODUMP | NOATIME
_DAX_EXCLUSIVE = VERITY | ENCRYPT | JOURNAL_DATA | INLINE_DATA
# Flags the FSSETXATTR interface carries; SETFLAGS through it keeps the others.
_COMMON = SYNC | IMMUTABLE | APPEND | NODUMP | NOATIME | DAX | PROJINHERIT

# FS_XFLAG_* of struct fsxattr and the i_flags bit each stands for.
XFLAG_IMMUTABLE, XFLAG_APPEND, XFLAG_SYNC, XFLAG_NOATIME = 0x8, 0x10, 0x20, 0x40
XFLAG_NODUMP, XFLAG_PROJINHERIT, XFLAG_EXTSIZE = 0x80, 0x200, 0x800
XFLAG_EXTSZINHERIT, XFLAG_DAX, XFLAG_COWEXTSIZE = 0x1000, 0x8000, 0x10000
_XFLAG_OF_FLAG = ((SYNC, XFLAG_SYNC), (IMMUTABLE, XFLAG_IMMUTABLE), (APPEND, XFLAG_APPEND),
                  (NODUMP, XFLAG_NODUMP), (NOATIME, XFLAG_NOATIME), (DAX, XFLAG_DAX),
                  (PROJINHERIT, XFLAG_PROJINHERIT))

# struct fsxattr: xflags, extsize, nextents, projid, cowextsize, 8 bytes of padding.
FSXATTR = struct.Struct("<IIIII8x")
_PROJID_INVALID = 0xFFFFFFFF  # (projid_t)-1
# A block map can only take back an extent that lies in its 12 direct pointers.
_DIRECT_BLOCKS = 12
_EXTENT_MAX_WRITTEN = 32768  # ee_len above this marks an unwritten extent
_ROOT = 0


@dataclass(frozen=True, slots=True)
class FsxAttr:
    """struct fsxattr as FS_IOC_FSGETXATTR answers it and FSSETXATTR takes it."""

    xflags: int
    extsize: int = 0
    nextents: int = 0
    projid: int = 0
    cowextsize: int = 0

    def pack(self) -> bytes:
        return FSXATTR.pack(self.xflags, self.extsize, self.nextents, self.projid,
                            self.cowextsize)

    @classmethod
    def unpack(cls, raw: bytes) -> FsxAttr:
        if len(raw) < FSXATTR.size:
            raise InvalidArgument(f"struct fsxattr of {len(raw)} bytes")
        return cls(*FSXATTR.unpack_from(raw))


def xflags_of(flags: int) -> int:
    return sum(xflag for flag, xflag in _XFLAG_OF_FLAG if flags & flag)


def flags_of(xflags: int) -> int:
    return sum(flag for flag, xflag in _XFLAG_OF_FLAG if xflags & xflag)


def visible_flags(inode: Inode) -> int:
    """What FS_IOC_GETFLAGS answers (ext4_fileattr_get)."""
    flags = inode.flags & USER_VISIBLE
    if inode.is_reg:
        flags &= ~PROJINHERIT
    return flags


def has_projid_field(fs: Filesystem, inode: Inode) -> bool:
    """Whether `inode` stores i_projid (i_extra_isize reaches it)."""
    return fs.sb.inode_size > 128 and inode.extra_isize >= 32


def get_fsxattr(fs: Filesystem, inode: Inode) -> FsxAttr:
    """What FS_IOC_FSGETXATTR answers: the flag subset, and the project id when the
    filesystem has the project feature."""
    projid = inode.projid if fs.sb.has_ro_compat(F.RO_COMPAT_PROJECT) else 0
    return FsxAttr(xflags=xflags_of(visible_flags(inode)), projid=projid)


def _mask_for_type(mode: int, flags: int) -> int:
    if stat.S_ISDIR(mode):
        return flags
    if stat.S_ISREG(mode):
        return flags & _REG_MASK
    return flags & _OTHER_MASK


def set_flags(fs: WriteContext, ino: int, flags: int, uid: int) -> Inode:
    """FS_IOC_SETFLAGS by a caller of `uid`: `flags` replace the visible flags."""
    inode = fs.inode(ino)
    _check_owner(inode, uid)
    old = get_fsxattr(fs, inode)
    return _set(fs, inode, flags & 0xFFFFFFFF, old.projid, uid)


def set_fsxattr(fs: WriteContext, ino: int, new: FsxAttr, uid: int) -> Inode:
    """FS_IOC_FSSETXATTR by a caller of `uid`: the common flags and the project id;
    the flags fsxattr cannot name keep their values."""
    inode = fs.inode(ino)
    _check_owner(inode, uid)
    old = get_fsxattr(fs, inode)
    if new.projid != old.projid and new.projid == _PROJID_INVALID:
        raise InvalidArgument("project id -1")
    xflags = new.xflags
    if xflags & XFLAG_EXTSIZE and not inode.is_reg:
        raise InvalidArgument("extent size hint on a non-regular file")
    if xflags & XFLAG_EXTSZINHERIT and not inode.is_dir:
        raise InvalidArgument("inherited extent size hint on a non-directory")
    if xflags & (XFLAG_COWEXTSIZE | XFLAG_DAX) and not (inode.is_reg or inode.is_dir):
        raise InvalidArgument("CoW extent size or DAX on a special file")
    flags = flags_of(xflags) | (visible_flags(inode) & ~_COMMON)
    return _set(fs, inode, flags, new.projid, uid)


def _check_owner(inode: Inode, uid: int) -> None:
    if uid != _ROOT and uid != inode.uid:
        raise NotPermitted(f"uid {uid} does not own inode {inode.ino}")


def _set(fs: WriteContext, inode: Inode, flags: int, projid: int, uid: int) -> Inode:
    """vfs_fileattr_set from fileattr_set_prepare on, then ext4_fileattr_set."""
    where = inode_where(inode.ino)
    old_visible = visible_flags(inode)
    if (flags ^ old_visible) & (APPEND | IMMUTABLE) and uid != _ROOT:
        raise NotPermitted(f"changing immutable/append-only of {where} needs root")
    if flags & ~USER_VISIBLE:
        raise Unsupported("inode flags", where, f"0x{flags & ~USER_VISIBLE:x} not settable")
    flags &= USER_MODIFIABLE
    if _mask_for_type(inode.mode, flags) != flags:
        raise Unsupported("inode flags", where, f"0x{flags:x} do not apply to this file type")
    project = fs.sb.has_ro_compat(F.RO_COMPAT_PROJECT)
    raw = inode.flags
    stays_immutable = bool(raw & FL_IMMUTABLE and flags & IMMUTABLE)
    if stays_immutable and ((raw & ~IMMUTABLE) != (flags & ~IMMUTABLE)
                            or (project and inode.projid != projid)):
        raise NotPermitted(f"{where} is immutable")
    changed = flags ^ raw
    if changed & JOURNAL_DATA and uid != _ROOT:
        raise NotPermitted(f"changing data journaling of {where} needs root")
    _check_dax(inode, raw, flags)
    if changed & CASEFOLD:
        _check_casefold(fs, inode)
    _check_project(fs, inode, projid)
    now = fs.now_ns()
    kept = JOURNAL_DATA | EXTENTS | ~USER_MODIFIABLE
    new_flags = (raw & kept) | (flags & ~kept & 0xFFFFFFFF)
    if changed & JOURNAL_DATA and fs.sb.has_compat(F.COMPAT_HAS_JOURNAL):
        new_flags = (new_flags & ~JOURNAL_DATA) | (flags & JOURNAL_DATA)
    stored = fs.store(replace_inode(inode, flags=new_flags, ctime_ns=now))
    if changed & EXTENTS:
        stored = _migrate(fs, stored, to_extents=bool(flags & EXTENTS))
    if projid != stored.projid and project:
        stored = fs.store(replace_inode(stored, projid=projid, ctime_ns=now))
    return stored


def _check_dax(inode: Inode, raw: int, flags: int) -> None:
    old = raw & ~INLINE_DATA if inode.is_dir else raw
    new = flags & ~INLINE_DATA if inode.is_dir else flags
    if (new & DAX and old & _DAX_EXCLUSIVE) or (new & _DAX_EXCLUSIVE and old & DAX):
        raise Unsupported("inode flags", inode_where(inode.ino), "DAX with data journaling")


def _check_casefold(fs: WriteContext, inode: Inode) -> None:
    where = inode_where(inode.ino)
    if not fs.sb.has_incompat(F.INCOMPAT_CASEFOLD):
        raise Unsupported("casefold", where, "the filesystem has no casefold feature")
    if not inode.is_dir:
        raise NotADirectory(f"casefold on non-directory {where}")
    if not DirHandle(fs, inode.ino).writer.is_empty():
        raise NotEmpty(f"casefold on non-empty directory {where}")


def _check_project(fs: WriteContext, inode: Inode, projid: int) -> None:
    where = inode_where(inode.ino)
    if not fs.sb.has_ro_compat(F.RO_COMPAT_PROJECT):
        if projid:
            raise Unsupported("project id", where, "the filesystem has no project feature")
        return
    if projid != inode.projid and not has_projid_field(fs, inode):
        raise Unsupported("project id", where, "the inode has no room for i_projid")


def _migrate(fs: WriteContext, inode: Inode, *, to_extents: bool) -> Inode:
    """The EXTENTS flag changed: convert the block tree (ext4_ext_migrate /
    ext4_ind_migrate), or refuse what we cannot convert."""
    where = inode_where(inode.ino)
    if to_extents:
        if not fs.has_extents or inode.has_inline_data:
            raise InvalidArgument(f"{where} cannot use extents")
        return _to_extents(fs, inode)
    if not fs.has_extents or not inode.flags & FL_EXTENTS:
        raise InvalidArgument(f"{where} has no extents to convert")
    runs = _single_extent(fs, inode)
    if runs is None:
        raise Unsupported("extent migration", where, "more than one extent or beyond block 11")
    pointers = [0] * 15
    for lblk, pblk, length in runs:
        for i in range(length):
            pointers[lblk + i] = pblk + i
    return fs.store(replace_inode(inode, flags=inode.flags & ~FL_EXTENTS,
                                  i_block=struct.pack("<15I", *pointers)))


def _to_extents(fs: WriteContext, inode: Inode) -> Inode:
    """ext4_ext_migrate: the block map's runs as an extent tree, its indirect blocks
    freed (at the next commit, as every free)."""
    mapper = fs.mapper_for(inode)
    assert isinstance(mapper, BlockMapMapper)
    runs = list(mapper.extents())
    indirect = mapper.tree_blocks()
    target = replace_inode(inode, flags=inode.flags | FL_EXTENTS, i_block=empty_extent_root())
    tree = fs.tree_writer(target)
    for run in runs:
        assert run.pblk is not None
        done = 0
        while done < run.length:
            piece = min(run.length - done, _EXTENT_MAX_WRITTEN)
            tree.insert(run.lblk + done, run.pblk + done, piece)
            done += piece
    for pblk in indirect:
        fs.free_block(pblk)
    return fs.store(fs.with_tree(target, tree, -len(indirect)))


def _single_extent(fs: WriteContext, inode: Inode) -> list[tuple[int, int, int]] | None:
    """The (lblk, pblk, length) of a depth-0 extent root with at most one extent
    that ends inside the direct pointers, or None."""
    depth = int.from_bytes(inode.i_block[6:8], "little")
    entries = int.from_bytes(inode.i_block[2:4], "little")
    if depth != 0 or entries > 1 or fs.sb.blocks_count > 0xFFFFFFFF:
        return None
    if entries == 0:
        return []
    lblk, raw_len, start_hi, start_lo = struct.unpack_from("<IHHI", inode.i_block, 12)
    if raw_len > _EXTENT_MAX_WRITTEN or lblk + raw_len > _DIRECT_BLOCKS:
        return None  # unwritten (a block map cannot say so), or past the direct pointers
    return [(lblk, (start_hi << 32) | start_lo, raw_len)]
