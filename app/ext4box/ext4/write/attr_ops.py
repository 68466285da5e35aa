"""Inode attributes: setattr (mode, owner, size, times) and extended attributes.

ctime follows the kernel: any change sets it to now unless the caller gives
one; a size change also sets mtime (ext4_setattr touches both only when the
size really changes). chmod of an inode with an access ACL rewrites the ACL's
owner/group-or-mask/other entries to match, as posix_acl_chmod does. A new
inode in a directory with a default ACL inherits it (`inherit_acls`), as
posix_acl_create + ext4_init_acl do.
"""

from __future__ import annotations

import stat
import struct
from typing import TYPE_CHECKING

from ext4box.ext4.format import features as F
from ext4box.ext4.format.acl import (
    ACL_GROUP,
    ACL_GROUP_OBJ,
    ACL_MASK,
    ACL_OTHER,
    ACL_USER,
    ACL_USER_OBJ,
    acl_disk_to_xattr,
)
from ext4box.ext4.format.errors import Corrupt, NoData, inode_where
from ext4box.ext4.format.inode import Inode, replace_inode
from ext4box.ext4.write import ea_inode_writer, flag_guards
from ext4box.ext4.write.file_data import truncate
from ext4box.ext4.write.quota import ea_values_held
from ext4box.ext4.write.xattr_writer import (
    ACL_ACCESS,
    ACL_DEFAULT,
    BlockAction,
    XattrState,
    XattrUpdate,
    apply_block_update,
    ea_charge_delta,
    remove_xattr,
    set_xattr,
    xattr_state,
)

if TYPE_CHECKING:
    from ext4box.ext4.write.context import WriteContext

_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")


def _state(fs: WriteContext, inode: Inode) -> XattrState:
    ea_inode = fs.sb.has_incompat(F.INCOMPAT_EA_INODE)
    return xattr_state(
        inode, read_meta=fs.writer.read, block_size=fs.block_size, csum_seed=fs.sb.csum_seed,
        goal=fs.group_goal(inode.ino), ea_inode=ea_inode,
        cluster_size=fs.sb.cluster_size, read_ea_inode=fs._read_ea_inode,
        ea_seed=ea_inode_writer.ea_hash_seed(fs.sb) if ea_inode else None)


def _apply(fs: WriteContext, inode: Inode, state: XattrState, update: XattrUpdate,
           now: int) -> Inode:
    """Carry out a planned xattr change: the new value's EA inode (if any) first, then
    the block, the other EA inode reference counts, and last the inode."""
    if not update.changed:
        return inode
    update, ref_changes, new_ea_inode = ea_inode_writer.begin_update(fs, inode, state, update)
    try:
        outcome = apply_block_update(
            update, state, read_meta=fs.writer.read, write_meta=fs.writer.write,
            alloc_block=fs.alloc_meta_block, free_block=fs.free_block)
    except BaseException:
        if new_ea_inode is not None:
            ea_inode_writer.abandon(fs, new_ea_inode)
        raise
    ea_inode_writer.apply_changes(fs, ref_changes)
    if fs.quota is not None and state.ea_inode:  # one inode per value in an EA inode
        fs.quota.charge_inodes(inode, ea_values_held(
            (*update.ibody_entries, *update.block_entries)) - ea_values_held(
            (*state.ibody_entries, *state.block_entries)))
    raw = bytearray(inode.raw)
    if update.ibody is not None:
        area = inode.ibody_xattr_area
        raw[len(raw) - len(area):] = update.ibody
    mode = inode.mode
    if update.mode_bits is not None:
        mode = (mode & ~0o777) | update.mode_bits
    return replace_inode(
        inode, raw=bytes(raw), file_acl=outcome.file_acl, mode=mode, ctime_ns=now,
        blocks_512=inode.blocks_512 + outcome.blocks_512_delta + ea_charge_delta(state, update))


def _check_quota(fs: WriteContext, inode: Inode, state: XattrState,
                 update: XattrUpdate) -> None:
    """EDQUOT before a change that charges the owner more: a new xattr block, and
    values moved to EA inodes (their blocks and one inode each)."""
    if fs.quota is None or not update.changed:
        return
    blocks = 1 if update.block_action is BlockAction.ALLOCATE else 0
    inodes = 0
    if state.ea_inode:
        blocks += ea_charge_delta(state, update) * 512 // fs.block_size
        inodes = ea_values_held((*update.ibody_entries, *update.block_entries)) - (
            ea_values_held((*state.ibody_entries, *state.block_entries)))
    fs.check_quota(inode, blocks=blocks, inodes=inodes)


def setxattr(fs: WriteContext, ino: int, name: bytes, value: bytes, flags: int) -> Inode:
    inode = fs.inode(ino)
    flag_guards.check_xattr_change(inode)
    state = _state(fs, inode)
    update = set_xattr(state, name, value, flags)
    _check_quota(fs, inode, state, update)
    return fs.store(_apply(fs, inode, state, update, fs.now_ns()))


def removexattr(fs: WriteContext, ino: int, name: bytes) -> Inode:
    inode = fs.inode(ino)
    flag_guards.check_xattr_change(inode)
    state = _state(fs, inode)
    update = remove_xattr(state, name)
    return fs.store(_apply(fs, inode, state, update, fs.now_ns()))


def _chmod_acl(fs: WriteContext, inode: Inode, mode: int, now: int) -> Inode:
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
    return replace_inode(changed, mode=inode.mode)  # the caller sets the mode


def _create_masq(default: bytes, mode: int, where: str) -> tuple[bytes, int, bool]:
    """posix_acl_create_masq: the access ACL a new inode of `mode` gets from its
    directory's default ACL (xattr form), the mode that ACL leaves, and whether
    the ACL says more than the mode (else the kernel stores none)."""
    acl = bytearray(default)
    group_obj = mask = None
    extended = False
    for offset in range(_ACL_HEADER.size, len(acl), _ACL_ENTRY.size):
        tag, perm, ident = _ACL_ENTRY.unpack_from(acl, offset)
        perm &= 0o7
        if tag == ACL_USER_OBJ:
            perm &= (mode >> 6) & 0o7
            mode &= (perm << 6) | ~0o700
        elif tag == ACL_OTHER:
            perm &= mode & 0o7
            mode &= perm | ~0o007
        elif tag == ACL_GROUP_OBJ:
            group_obj = offset
        elif tag == ACL_MASK:
            mask = offset
            extended = True
        elif tag in (ACL_USER, ACL_GROUP):
            extended = True
        _ACL_ENTRY.pack_into(acl, offset, tag, perm, ident)
    # The group class bits: the mask's when there is one, else the owning group's.
    group_class = mask if mask is not None else group_obj
    if group_class is None:
        raise Corrupt("default ACL", where, "no group or mask entry")
    tag, perm, ident = _ACL_ENTRY.unpack_from(acl, group_class)
    perm &= (mode >> 3) & 0o7
    mode &= (perm << 3) | ~0o070
    _ACL_ENTRY.pack_into(acl, group_class, tag, perm, ident)
    return bytes(acl), mode, extended


def inherit_acls(fs: WriteContext, parent: Inode, inode: Inode) -> Inode:
    """A new inode (not yet stored) in directory `parent`, with the ACLs and mode it
    inherits from the directory's default ACL (posix_acl_create, ext4_init_acl):
    the access ACL is the default masked by the create mode, and the mode bits
    follow it; a new directory also inherits the default ACL itself. Symlinks
    and inodes of a directory without a default ACL are returned unchanged.

    The create mode comes from the FUSE layer: the kernel has already applied
    the umask unless the connection asked it not to (FUSE_DONT_MASK)."""
    if inode.is_symlink:
        return inode
    try:
        default = fs.getxattr(parent.ino, ACL_DEFAULT)
    except NoData:
        return inode
    access, mode, extended = _create_masq(default, inode.mode, inode_where(parent.ino))
    now = inode.ctime_ns
    # The kernel stores the default ACL first, then the access ACL.
    if inode.is_dir:
        state = _state(fs, inode)
        inode = _apply(fs, inode, state, set_xattr(state, ACL_DEFAULT, default), now)
    if extended:
        state = _state(fs, inode)
        try:
            inode = _apply(fs, inode, state, set_xattr(state, ACL_ACCESS, access), now)
        except BaseException:
            fs.drop_xattr_block(inode)  # the block the default ACL may have taken
            raise
    return replace_inode(inode, mode=mode)


def setattr(fs: WriteContext, ino: int, *, mode: int | None, uid: int | None,
            gid: int | None, size: int | None, atime_ns: int | None, mtime_ns: int | None,
            ctime_ns: int | None, times_now: bool = False) -> Inode:
    inode = fs.inode(ino)
    flag_guards.check_setattr(
        inode, owner_or_mode=mode is not None or uid is not None or gid is not None,
        size=size is not None, times=atime_ns is not None or mtime_ns is not None,
        times_now=times_now)
    now = fs.now_ns()
    before = inode
    if fs.quota is not None and (uid is not None or gid is not None):
        fs.quota.check_transfer(inode, uid=uid, gid=gid)  # EDQUOT before any change
    if size is not None and size != inode.size:
        inode = truncate(fs, inode, size, now)
    # One dataclasses.replace for all fields: each costs as much as a small request.
    changes: dict[str, int] = {}
    if mode is not None:
        new_mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
        if new_mode != inode.mode and not inode.is_symlink:
            inode = _chmod_acl(fs, inode, new_mode, now)
        changes["mode"] = new_mode
    if uid is not None:
        changes["uid"] = uid
    if gid is not None:
        changes["gid"] = gid
    if atime_ns is not None:
        changes["atime_ns"] = atime_ns
    if mtime_ns is not None:
        changes["mtime_ns"] = mtime_ns
    # Like notify_change, any attribute change stamps ctime (even one to the same value).
    asked = (mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns)
    if all(value is None for value in asked):
        return inode
    changes["ctime_ns"] = now if ctime_ns is None else ctime_ns
    inode = replace_inode(inode, **changes)
    if inode == before:
        return inode
    return fs.store(inode)
