"""Inode attributes: setattr (mode, owner, size, times) and extended attributes.

ctime follows the kernel: any change sets it to now unless the caller gives
one; a size change also sets mtime (ext4_setattr touches both only when the
size really changes). chmod of an inode with an access ACL rewrites the ACL's
owner/group-or-mask/other entries to match, as posix_acl_chmod does.
"""

from __future__ import annotations

import dataclasses
import stat
import struct
from typing import TYPE_CHECKING

from ext4box.ext4 import features as F
from ext4box.ext4.acl import ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER, ACL_USER_OBJ, acl_disk_to_xattr
from ext4box.ext4.errors import inode_where
from ext4box.ext4.file_data import truncate
from ext4box.ext4.inode import Inode
from ext4box.ext4.xattr_writer import (
    ACL_ACCESS,
    XattrState,
    XattrUpdate,
    apply_block_update,
    remove_xattr,
    set_xattr,
    xattr_state,
)

if TYPE_CHECKING:
    from ext4box.ext4.writable import WritableFilesystem

_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")


def _state(fs: WritableFilesystem, inode: Inode) -> XattrState:
    return xattr_state(
        inode, read_meta=fs.writer.read, block_size=fs.block_size, csum_seed=fs.sb.csum_seed,
        goal=fs.group_goal(inode.ino), ea_inode=fs.sb.has_incompat(F.INCOMPAT_EA_INODE),
        cluster_size=fs.sb.cluster_size, read_ea_inode=fs._read_ea_inode)


def _apply(fs: WritableFilesystem, inode: Inode, state: XattrState, update: XattrUpdate,
           now: int) -> Inode:
    """Carry out a planned xattr change: the block part first, then the inode."""
    if not update.changed:
        return inode
    outcome = apply_block_update(
        update, state, read_meta=fs.writer.read, write_meta=fs.writer.write,
        alloc_block=fs.alloc_meta_block, free_block=fs.free_block)
    raw = bytearray(inode.raw)
    if update.ibody is not None:
        area = inode.ibody_xattr_area
        raw[len(raw) - len(area):] = update.ibody
    mode = inode.mode
    if update.mode_bits is not None:
        mode = (mode & ~0o777) | update.mode_bits
    return dataclasses.replace(
        inode, raw=bytes(raw), file_acl=outcome.file_acl, mode=mode, ctime_ns=now,
        blocks_512=inode.blocks_512 + outcome.blocks_512_delta)


def setxattr(fs: WritableFilesystem, ino: int, name: bytes, value: bytes, flags: int) -> Inode:
    inode = fs.inode(ino)
    state = _state(fs, inode)
    update = set_xattr(state, name, value, flags)
    return fs.store(_apply(fs, inode, state, update, fs.now_ns()))


def removexattr(fs: WritableFilesystem, ino: int, name: bytes) -> Inode:
    inode = fs.inode(ino)
    state = _state(fs, inode)
    update = remove_xattr(state, name)
    return fs.store(_apply(fs, inode, state, update, fs.now_ns()))


def _chmod_acl(fs: WritableFilesystem, inode: Inode, mode: int, now: int) -> Inode:
    """posix_acl_chmod: keep a stored access ACL in step with the new permission bits."""
    state = _state(fs, inode)
    stored = next((e for e in (*state.ibody_entries, *state.block_entries)
                   if e.name == ACL_ACCESS), None)
    if stored is None:
        return inode
    value = bytearray(acl_disk_to_xattr(stored.value, where=inode_where(inode.ino)))
    has_mask = any(tag == ACL_MASK for tag, _, _ in
                   _ACL_ENTRY.iter_unpack(bytes(value[_ACL_HEADER.size:])))
    for offset in range(_ACL_HEADER.size, len(value), _ACL_ENTRY.size):
        tag, perm, ident = _ACL_ENTRY.unpack_from(value, offset)
        if tag == ACL_USER_OBJ:
            perm = (mode >> 6) & 7
        elif tag == ACL_MASK or (tag == ACL_GROUP_OBJ and not has_mask):
            perm = (mode >> 3) & 7
        elif tag == ACL_OTHER:
            perm = mode & 7
        _ACL_ENTRY.pack_into(value, offset, tag, perm, ident)
    update = set_xattr(state, ACL_ACCESS, bytes(value))
    changed = _apply(fs, inode, state, update, now)
    return dataclasses.replace(changed, mode=inode.mode)  # the caller sets the mode


def setattr(fs: WritableFilesystem, ino: int, *, mode: int | None, uid: int | None,
            gid: int | None, size: int | None, atime_ns: int | None, mtime_ns: int | None,
            ctime_ns: int | None) -> Inode:
    inode = fs.inode(ino)
    now = fs.now_ns()
    before = inode
    if size is not None and size != inode.size:
        inode = truncate(fs, inode, size, now)
    if mode is not None:
        new_mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
        if new_mode != inode.mode and not inode.is_symlink:
            inode = _chmod_acl(fs, inode, new_mode, now)
        inode = dataclasses.replace(inode, mode=new_mode)
    if uid is not None:
        inode = dataclasses.replace(inode, uid=uid)
    if gid is not None:
        inode = dataclasses.replace(inode, gid=gid)
    if atime_ns is not None:
        inode = dataclasses.replace(inode, atime_ns=atime_ns)
    if mtime_ns is not None:
        inode = dataclasses.replace(inode, mtime_ns=mtime_ns)
    # Like notify_change, any attribute change stamps ctime (even one to the same value).
    asked = (mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns)
    if all(value is None for value in asked):
        return inode
    inode = dataclasses.replace(inode, ctime_ns=now if ctime_ns is None else ctime_ns)
    if inode == before:
        return inode
    return fs.store(inode)
