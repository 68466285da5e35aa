"""Setting and removing extended attributes: where each one goes, and what the block becomes.

Planning is pure: `set_xattr` / `remove_xattr` take an `XattrState` (the
attributes as they are now, in the inode and in its xattr block) and return an
`XattrUpdate` (the new in-inode area, the new block contents and what must
happen to the block). `apply_block_update` then carries out the block part
through the shared write-path callbacks; the caller writes the inode.

Placement follows the kernel's ext4_xattr_set_handle, so that a sequence of
calls leaves attributes where the kernel would and fails with the same errno:

- a new or changed value goes into the inode if it fits there, else into the
  block; an attribute that moves (its new value no longer fits in the inode, or
  now fits there while it lived in the block) is removed from its old place;
  nothing else moves;
- in-inode entries keep their order, new ones are appended; block entries are
  sorted (the builder does that);
- setting a value equal to the stored one changes nothing (not even ctime);
- a block with refcount 1 is rewritten in place, or freed when it empties; a
  shared block (refcount > 1) is never changed except for its refcount: the new
  contents go to a freshly allocated block (copy-on-write), and the old block is
  rewritten with refcount - 1 and a new checksum.

With the ea_inode feature, a value goes to an EA inode as the kernel decides:
at once when its padded size exceeds EXT4_XATTR_MIN_LARGE_EA_SIZE, or after it
fits neither in the inode nor in the block as a plain value (then the entry,
name only, is placed by the same rules). The plan names such a value's inode
NEW_EA_INODE; `with_ea_inode` puts the real number in once the caller has one
(ea_inode_writer finds or creates it). `ea_ref_changes` says which EA inode
references a plan takes and drops, `ea_charge_delta` what it changes in the
owner's i_blocks (the kernel charges each EA value to its owner, rounded up to
clusters). A value stored in an EA inode is never "the same" as a new one: the
kernel re-sets it (same EA inode, new ctime).

The kernel's mbcache sharing (pointing an inode at an existing identical block
instead of writing its own) is not done: every new block is private.
"""

from __future__ import annotations

import errno
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum

from ext4box.ext4.format.acl import (
    ACL_GROUP_OBJ,
    ACL_MASK,
    ACL_OTHER,
    ACL_USER_OBJ,
    POSIX_ACL_XATTR_VERSION,
    InvalidAcl,
    acl_xattr_to_disk,
)
from ext4box.ext4.format.errors import Ext4Error, NoData, inode_where
from ext4box.ext4.format.inode import GOOD_OLD_INODE_SIZE, Inode
from ext4box.ext4.format.xattr import (
    XattrEntry,
    XattrNameError,
    XattrNoSpace,
    build_ibody_xattrs,
    build_xattr_block,
    parse_ibody_xattrs,
    parse_xattr_block,
    split_name,
    unread_ea_value,
    xattr_block_checksum,
)

XATTR_CREATE = 1
XATTR_REPLACE = 2
# The VFS limits every filesystem sees (linux/limits.h): longer names are ERANGE,
# larger values E2BIG, before ext4 is asked.
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536

ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
# Namespaces ext4 has a handler for on Linux; any other name (system.data,
# system.richacl, foo.bar) is EOPNOTSUPP, as the VFS answers without a handler.
_SETTABLE_PREFIXES = (b"user.", b"trusted.", b"security.", b"gnu.")

_HEADER_BYTES = 4  # the in-inode magic
_BLOCK_HEADER_BYTES = 32
_END_MARKER_BYTES = 4
_ENTRY_BYTES = 16
_ACL_HEADER = struct.Struct("<I")
_ACL_XATTR_ENTRY = struct.Struct("<HHI")
_WORD = struct.Struct("<I")
_REFCOUNT_OFFSET = 4  # h_refcount in the block header
_CHECKSUM_OFFSET = 16  # h_checksum
# value_inum of a planned entry whose value goes to an EA inode not chosen yet.
NEW_EA_INODE = -1

ReadMeta = Callable[[int], bytes]
WriteMeta = Callable[[int, bytes], None]
AllocBlock = Callable[[int], int]
FreeBlock = Callable[[int], None]
ReadEaInode = Callable[[int, int], bytes]


class XattrError(Ext4Error):
    """A set/remove the kernel refuses, carrying the kernel's errno."""

    def __init__(self, why: str, code: int) -> None:
        super().__init__(why)
        self.errno = code


@dataclass(frozen=True, slots=True)
class XattrState:
    """One inode's attributes and the facts that decide where new ones go."""

    ino: int
    ibody_entries: tuple[XattrEntry, ...]  # in on-disk order (includes system.data)
    ibody_size: int  # usable in-inode area (inode_size - 128 - i_extra_isize), 0 if none
    block_entries: tuple[XattrEntry, ...]
    block_nr: int  # i_file_acl; 0 = no block
    block_refcount: int  # h_refcount of that block (0 when there is none)
    block_size: int
    csum_seed: int | None  # filesystem checksum seed with metadata_csum, else None
    goal: int  # where a new xattr block should go: first block of the inode's group
    is_dir: bool
    ea_inode: bool = False  # the ea_inode feature is on
    cluster_size: int = 0  # 0: same as block_size; i_blocks counts one cluster per block
    ea_seed: int | None = None  # seed of EA-inode value hashes (set with ea_inode)

    @property
    def block_sectors(self) -> int:
        """What one xattr block adds to i_blocks, in 512-byte units."""
        return (self.cluster_size or self.block_size) // 512


class BlockAction(Enum):
    KEEP = "keep"  # the block (or its absence) stays as it is
    REWRITE = "rewrite"  # refcount 1: write new contents to the same block
    FREE = "free"  # refcount 1 and no entries left: free it, i_file_acl = 0
    ALLOCATE = "allocate"  # no block before: allocate one, write the contents
    COPY = "copy"  # shared: decrement the old block's refcount, allocate + write a new one
    DETACH = "detach"  # shared and no entries left for us: decrement, i_file_acl = 0


@dataclass(frozen=True, slots=True)
class XattrUpdate:
    changed: bool  # False: nothing at all to write (ctime stays too); True with mode_bits
    ibody: bytes | None  # new in-inode area (ibody_size bytes); None = unchanged
    ibody_entries: tuple[XattrEntry, ...]
    block_action: BlockAction
    block_entries: tuple[XattrEntry, ...]  # contents of the inode's block after the call
    # For a set of system.posix_acl_access: the permission bits (0o777) the ACL
    # implies; the caller puts them in i_mode (kernel: posix_acl_update_mode).
    mode_bits: int | None = None
    # The value to store in an EA inode: the entry naming NEW_EA_INODE. Until
    # `with_ea_inode` resolves it, `ibody` is None even when the inode changes.
    new_ea_value: bytes | None = None

    @property
    def ibody_changed(self) -> bool:
        return self.ibody is not None or _names_new_ea_inode(self.ibody_entries)


@dataclass(frozen=True, slots=True)
class BlockOutcome:
    file_acl: int  # the new i_file_acl
    blocks_512_delta: int  # add to i_blocks (in 512-byte sectors)


# ---------------------------------------------------------------- loading


def xattr_state(
    inode: Inode,
    *,
    read_meta: ReadMeta,
    block_size: int,
    csum_seed: int | None,
    goal: int,
    ea_inode: bool = False,
    cluster_size: int = 0,
    read_ea_inode: ReadEaInode | None = None,
    ea_seed: int | None = None,
) -> XattrState:
    """Read an inode's attributes into the state the planners take."""
    area = inode.ibody_xattr_area
    # The kernel's EXT4_INODE_HAS_XATTR_SPACE: room for the magic and one end marker.
    has_space = (
        len(inode.raw) > GOOD_OLD_INODE_SIZE
        and inode.extra_isize != 0
        and len(area) >= _HEADER_BYTES + _END_MARKER_BYTES
    )
    ibody = (
        parse_ibody_xattrs(area, ino=inode.ino, read_ea_inode=read_ea_inode) if has_space else []
    )
    block_entries: list[XattrEntry] = []
    refcount = 0
    if inode.file_acl:
        parsed = parse_xattr_block(
            read_meta(inode.file_acl),
            blkno=inode.file_acl,
            ino=inode.ino,
            csum_seed=csum_seed,
            read_ea_inode=read_ea_inode,
        )
        block_entries = parsed.entries
        refcount = parsed.refcount
    return XattrState(
        ino=inode.ino,
        ibody_entries=tuple(ibody),
        ibody_size=len(area) if has_space else 0,
        block_entries=tuple(block_entries),
        block_nr=inode.file_acl,
        block_refcount=refcount,
        block_size=block_size,
        csum_seed=csum_seed,
        goal=goal,
        is_dir=inode.is_dir,
        ea_inode=ea_inode,
        cluster_size=cluster_size,
        ea_seed=ea_seed,
    )


# ---------------------------------------------------------------- planning


def set_xattr(state: XattrState, name: bytes, value: bytes, flags: int = 0) -> XattrUpdate:
    """Plan setxattr(name, value, flags); raises XattrError/NoData/... with the kernel's errno."""
    _check_vfs_name(name)
    if len(value) > XATTR_SIZE_MAX:
        raise XattrError(
            f"value of {len(value)} bytes is larger than {XATTR_SIZE_MAX}", errno.E2BIG
        )
    _check_settable(name)
    if name in (ACL_ACCESS, ACL_DEFAULT):
        return _set_acl(state, name, value)
    return _set(state, name, value, flags)


def remove_xattr(state: XattrState, name: bytes) -> XattrUpdate:
    """Plan removexattr(name); ENODATA when absent (but not for ACLs, as the kernel)."""
    _check_vfs_name(name)
    _check_settable(name)
    if name in (ACL_ACCESS, ACL_DEFAULT):
        return _remove(state, name, missing_ok=True)
    return _remove(state, name, missing_ok=False)


def _check_vfs_name(name: bytes) -> None:
    if not name or len(name) > XATTR_NAME_MAX:
        raise XattrError(f"xattr name of {len(name)} bytes", errno.ERANGE)


def _check_settable(name: bytes) -> None:
    if name in (ACL_ACCESS, ACL_DEFAULT):
        return
    for prefix in _SETTABLE_PREFIXES:
        if name.startswith(prefix):
            if name == prefix:
                raise XattrError(f"xattr name {name!r} is empty after its prefix", errno.EINVAL)
            try:
                split_name(name)
            except XattrNameError as error:
                raise XattrError(str(error), error.errno) from error
            return
    raise XattrError(f"no xattr handler for {name!r}", errno.EOPNOTSUPP)


def _set_acl(state: XattrState, name: bytes, value: bytes) -> XattrUpdate:
    """ACLs as the kernel's set_acl path: flags ignored, an empty ACL removes,
    a default ACL only on directories, an access ACL folded into the mode bits."""
    if not value:
        return _remove(state, name, missing_ok=True)
    if len(value) < _ACL_HEADER.size or (len(value) - _ACL_HEADER.size) % _ACL_XATTR_ENTRY.size:
        raise InvalidAcl(f"ACL of {len(value)} bytes is not a header plus 8-byte entries")
    (version,) = _ACL_HEADER.unpack_from(value)
    if version != POSIX_ACL_XATTR_VERSION:
        raise InvalidAcl(f"ACL version {version}", errno.EOPNOTSUPP)
    if len(value) == _ACL_HEADER.size:
        return _remove(state, name, missing_ok=True)
    if name == ACL_DEFAULT and not state.is_dir:
        raise XattrError("a default ACL on a non-directory", errno.EACCES)
    disk = acl_xattr_to_disk(value)
    if name != ACL_ACCESS:
        return _set(state, name, disk, 0)
    mode_bits, equivalent = _acl_mode(value)
    # The kernel drops an access ACL that says no more than the mode bits.
    update = _remove(state, name, missing_ok=True) if equivalent else _set(state, name, disk, 0)
    return _with_mode(update, mode_bits)


def _acl_mode(value: bytes) -> tuple[int, bool]:
    """posix_acl_equiv_mode: the rwx bits an ACL implies, and whether the mode says it all."""
    mode = 0
    equivalent = True
    for tag, perm, _id in _ACL_XATTR_ENTRY.iter_unpack(memoryview(value)[_ACL_HEADER.size :]):
        perm &= 0o7
        if tag == ACL_USER_OBJ:
            mode |= perm << 6
        elif tag == ACL_GROUP_OBJ:
            mode |= perm << 3
        elif tag == ACL_OTHER:
            mode |= perm
        elif tag == ACL_MASK:
            mode = (mode & ~0o070) | (perm << 3)
            equivalent = False
        else:
            equivalent = False
    return mode, equivalent


def _with_mode(update: XattrUpdate, mode_bits: int) -> XattrUpdate:
    # The kernel sets the mode from an access ACL even when the stored ACL does
    # not change (e.g. one equal to the mode bits, with no ACL stored before).
    return XattrUpdate(
        changed=True,
        ibody=update.ibody,
        ibody_entries=update.ibody_entries,
        block_action=update.block_action,
        block_entries=update.block_entries,
        mode_bits=mode_bits,
        new_ea_value=update.new_ea_value,
    )


def _find(entries: tuple[XattrEntry, ...], name: bytes) -> int | None:
    for position, entry in enumerate(entries):
        if entry.name == name:
            return position
    return None


def _set(state: XattrState, name: bytes, value: bytes, flags: int) -> XattrUpdate:
    in_ibody = _find(state.ibody_entries, name)
    # Like the kernel, the block is only consulted when the inode lacks the name.
    in_block = _find(state.block_entries, name) if in_ibody is None else None
    if in_ibody is None and in_block is None:
        if flags & XATTR_REPLACE:
            raise NoData(f"{name!r} on {inode_where(state.ino)}")
    elif flags & XATTR_CREATE:
        raise XattrError(f"{name!r} exists on {inode_where(state.ino)}", errno.EEXIST)
    old = (
        state.ibody_entries[in_ibody]
        if in_ibody is not None
        else state.block_entries[in_block]
        if in_block is not None
        else None
    )
    if old is not None and not old.value_inum and old.value == value:
        return _unchanged(state)
    large = state.ea_inode and _padded(len(value)) > _min_large_ea_size(state.block_size)
    update = _place(state, XattrEntry(name, value, NEW_EA_INODE if large else 0),
                    in_ibody, in_block)
    if update is None and state.ea_inode and value and not large:
        # As the kernel: a value that fits nowhere as it is goes to an EA inode.
        update = _place(state, XattrEntry(name, value, NEW_EA_INODE), in_ibody, in_block)
    if update is None:
        raise XattrNoSpace(f"no room for {name!r} ({len(value)} bytes) on {inode_where(state.ino)}")
    return update


def _place(
    state: XattrState, new_entry: XattrEntry, in_ibody: int | None, in_block: int | None
) -> XattrUpdate | None:
    """`new_entry` in the inode if it fits there, else in the block; None if neither."""
    ibody = _ibody_with(state, new_entry, in_ibody)
    if ibody is not None:
        block = _without(state.block_entries, in_block) if in_block is not None else None
        return _update(state, ibody, block)
    block = _block_with(state, new_entry, in_block)
    if block is None:
        return None
    ibody_left = _without(state.ibody_entries, in_ibody) if in_ibody is not None else None
    return _update(state, ibody_left, block)


def _remove(state: XattrState, name: bytes, *, missing_ok: bool) -> XattrUpdate:
    in_ibody = _find(state.ibody_entries, name)
    in_block = _find(state.block_entries, name) if in_ibody is None else None
    if in_ibody is None and in_block is None:
        if missing_ok:
            return _unchanged(state)
        raise NoData(f"{name!r} on {inode_where(state.ino)}")
    if in_ibody is not None:
        return _update(state, _without(state.ibody_entries, in_ibody), None)
    return _update(state, None, _without(state.block_entries, in_block))  # type: ignore[arg-type]


def _ibody_with(
    state: XattrState, entry: XattrEntry, position: int | None
) -> tuple[XattrEntry, ...] | None:
    """The in-inode entries with `entry` set, or None if they do not fit (ENOSPC)."""
    if state.ibody_size == 0:
        return None
    entries = list(state.ibody_entries)
    if position is None:
        entries.append(entry)
    else:
        entries[position] = entry
    used = _HEADER_BYTES + _table_and_values(entries) + _END_MARKER_BYTES
    return tuple(entries) if used <= state.ibody_size else None


def _block_with(
    state: XattrState, entry: XattrEntry, position: int | None
) -> tuple[XattrEntry, ...] | None:
    """The block entries with `entry` set, or None if they do not fit (ENOSPC)."""
    entries = list(state.block_entries)
    old_value_bytes = 0
    if position is None:
        entries.append(entry)
    else:
        old_value_bytes = _value_bytes(entries[position])
        entries[position] = entry
    used = _BLOCK_HEADER_BYTES + _table_and_values(entries) + _END_MARKER_BYTES
    if used > state.block_size:
        return None
    if state.ea_inode and _value_bytes(entry):
        # With ea_inode the kernel keeps min(block/8, 1024) bytes of a block free
        # of values, so a long value cannot crowd out further names.
        values = sum(_padded(len(e.value)) for e in state.block_entries if not e.value_inum)
        lowest_value = state.block_size - values
        reserve = min(state.block_size // 8, 1024)
        if lowest_value + old_value_bytes - _value_bytes(entry) < reserve:
            return None
    return tuple(entries)


def _value_bytes(entry: XattrEntry) -> int:
    """What an entry's value takes in its area: nothing when it lives in an EA inode."""
    return 0 if entry.value_inum else _padded(len(entry.value))


def _without(entries: tuple[XattrEntry, ...], position: int) -> tuple[XattrEntry, ...]:
    return entries[:position] + entries[position + 1 :]


def _table_and_values(entries: list[XattrEntry]) -> int:
    total = 0
    for entry in entries:
        _index, suffix = split_name(entry.name)
        total += _padded(_ENTRY_BYTES + len(suffix))
        if not entry.value_inum:
            total += _padded(len(entry.value))
    return total


def _unchanged(state: XattrState) -> XattrUpdate:
    return XattrUpdate(
        changed=False,
        ibody=None,
        ibody_entries=state.ibody_entries,
        block_action=BlockAction.KEEP,
        block_entries=state.block_entries,
    )


def _update(
    state: XattrState,
    ibody: tuple[XattrEntry, ...] | None,
    block: tuple[XattrEntry, ...] | None,
) -> XattrUpdate:
    """Turn new entry lists (None = that place unchanged) into an update."""
    ibody_bytes = None
    new_ea_value = next((e.value for e in (*(ibody or ()), *(block or ()))
                         if e.value_inum == NEW_EA_INODE), None)
    if ibody is not None and not _names_new_ea_inode(ibody):
        ibody_bytes = build_ibody_xattrs(ibody, state.ibody_size, ea_inode_seed=state.ea_seed)
    if block is None:
        action = BlockAction.KEEP
        block = state.block_entries
    elif not state.block_nr:
        action = BlockAction.ALLOCATE if block else BlockAction.KEEP
    elif state.block_refcount <= 1:
        action = BlockAction.REWRITE if block else BlockAction.FREE
    else:
        action = BlockAction.COPY if block else BlockAction.DETACH
    return XattrUpdate(
        changed=True,
        ibody=ibody_bytes,
        ibody_entries=ibody if ibody is not None else state.ibody_entries,
        block_action=action,
        block_entries=block,
        new_ea_value=new_ea_value,
    )


def _names_new_ea_inode(entries: Iterable[XattrEntry]) -> bool:
    return any(entry.value_inum == NEW_EA_INODE for entry in entries)


def with_ea_inode(update: XattrUpdate, state: XattrState, ea_ino: int) -> XattrUpdate:
    """The plan with its NEW_EA_INODE entry naming `ea_ino`, and the inode area built."""
    if update.new_ea_value is None:
        return update

    def resolved(entries: tuple[XattrEntry, ...]) -> tuple[XattrEntry, ...]:
        return tuple(replace(e, value_inum=ea_ino) if e.value_inum == NEW_EA_INODE else e
                     for e in entries)

    ibody = update.ibody
    ibody_entries = resolved(update.ibody_entries)
    if _names_new_ea_inode(update.ibody_entries):
        ibody = build_ibody_xattrs(ibody_entries, state.ibody_size, ea_inode_seed=state.ea_seed)
    return replace(update, ibody=ibody, ibody_entries=ibody_entries,
                   block_entries=resolved(update.block_entries), new_ea_value=None)


def ea_ref_changes(state: XattrState, update: XattrUpdate) -> dict[int, int]:
    """EA inode -> references the update takes (> 0) or drops (< 0).

    Each entry naming an EA inode holds one reference, whether it sits in an
    inode or in a block; a block shared by several inodes holds its references
    once (a copy takes its own, the shared original keeps its own). The entry
    naming NEW_EA_INODE is not counted: its reference comes with the inode.
    """
    changes: Counter[int] = Counter()

    def count(entries: Iterable[XattrEntry], step: int) -> None:
        for entry in entries:
            if entry.value_inum > 0:
                changes[entry.value_inum] += step

    if update.changed and update.ibody_changed:
        count(state.ibody_entries, -1)
        count(update.ibody_entries, +1)
    action = update.block_action
    if action in (BlockAction.REWRITE, BlockAction.FREE):
        count(state.block_entries, -1)
    if action in (BlockAction.REWRITE, BlockAction.ALLOCATE, BlockAction.COPY):
        count(update.block_entries, +1)
    return {ino: step for ino, step in changes.items() if step}


def ea_charge(entries: Iterable[XattrEntry], cluster_bytes: int) -> int:
    """512-byte sectors the values in EA inodes add to their owner's i_blocks."""
    clusters = sum(-(-len(e.value) // cluster_bytes) for e in entries if e.value_inum)
    return clusters * cluster_bytes // 512


def ea_charge_delta(state: XattrState, update: XattrUpdate) -> int:
    """How the owner's i_blocks changes for the EA values it gains and loses."""
    if not state.ea_inode or not update.changed:
        return 0
    cluster = state.cluster_size or state.block_size
    before = ea_charge((*state.ibody_entries, *state.block_entries), cluster)
    return ea_charge((*update.ibody_entries, *update.block_entries), cluster) - before


def _min_large_ea_size(block_size: int) -> int:
    """EXT4_XATTR_MIN_LARGE_EA_SIZE: values this large go to an EA inode."""
    return block_size - _padded(_ENTRY_BYTES + 3) - _BLOCK_HEADER_BYTES - _END_MARKER_BYTES


def _padded(size: int) -> int:
    return (size + 3) & ~3


# ---------------------------------------------------------------- applying


def apply_block_update(
    update: XattrUpdate,
    state: XattrState,
    *,
    read_meta: ReadMeta,
    write_meta: WriteMeta,
    alloc_block: AllocBlock,
    free_block: FreeBlock,
) -> BlockOutcome:
    """Carry out the block part of `update`; the caller then writes the inode with
    the returned i_file_acl and i_blocks change (and `update.ibody`).

    The new block is allocated first (so NoSpace leaves everything untouched) and
    written before the old one is released, as data before the pointer to it.
    """
    action = update.block_action
    sectors = state.block_sectors
    if action is BlockAction.KEEP:
        return BlockOutcome(state.block_nr, 0)
    if action is BlockAction.REWRITE:
        write_meta(state.block_nr, _block_bytes(update, state, state.block_nr))
        return BlockOutcome(state.block_nr, 0)
    if action is BlockAction.FREE:
        free_block(state.block_nr)
        return BlockOutcome(0, -sectors)
    if action is BlockAction.DETACH:
        _decrement_refcount(state, read_meta, write_meta)
        return BlockOutcome(0, -sectors)
    new_block = alloc_block(state.goal)
    write_meta(new_block, _block_bytes(update, state, new_block))
    if action is BlockAction.ALLOCATE:
        return BlockOutcome(new_block, sectors)
    # COPY: the kernel releases the shared block (quota -1) and charges the new one (+1).
    _decrement_refcount(state, read_meta, write_meta)
    return BlockOutcome(new_block, 0)


def _block_bytes(update: XattrUpdate, state: XattrState, blkno: int) -> bytes:
    return build_xattr_block(
        update.block_entries,
        blkno=blkno,
        block_size=state.block_size,
        refcount=1,
        csum_seed=state.csum_seed,
        ea_inode_seed=state.ea_seed,
    )


def _decrement_refcount(state: XattrState, read_meta: ReadMeta, write_meta: WriteMeta) -> None:
    """Rewrite the shared block with one reference less and its checksum redone.

    Other inodes still point at the block, so only h_refcount (and h_checksum)
    change; the bytes are patched rather than rebuilt so nothing else moves,
    not even entries whose name index we do not know.
    """
    raw = read_meta(state.block_nr)
    current = parse_xattr_block(raw, blkno=state.block_nr, ino=state.ino, csum_seed=state.csum_seed,
                                read_ea_inode=unread_ea_value if state.ea_inode else None)
    block = bytearray(raw)
    _WORD.pack_into(block, _REFCOUNT_OFFSET, max(current.refcount - 1, 1))
    if state.csum_seed is not None:
        _WORD.pack_into(block, _CHECKSUM_OFFSET, 0)
        csum = xattr_block_checksum(bytes(block), state.block_nr, state.csum_seed)
        _WORD.pack_into(block, _CHECKSUM_OFFSET, csum)
    write_meta(state.block_nr, bytes(block))
