"""Values in EA inodes on a read-write mount: which inode holds a value, and who holds it.

With the ea_inode feature an xattr value too large for the inode or the xattr
block lives in an inode of its own (EXT4_EA_INODE_FL, a regular file of
i_size = the value's length, mode 0600, the owner's uid and gid, one link,
named by no directory). The entry keeps the inode number in e_value_inum and
e_value_size; e_hash folds the entry name with the value's hash. The EA inode
keeps, as the kernel does:

- the value's hash, crc32c(filesystem seed, value), in i_atime's 32 bits;
- its reference count, 64 bits: the high half in i_ctime's 32 bits, the low
  half in l_i_version (osd1). Every entry naming it holds one reference, be it
  in an inode body or in an xattr block; a block shared by several inodes
  holds one per entry, not one per inode.

Equal values share one EA inode: the kernel remembers the EA inodes it has
read or written (its mbcache, keyed by value hash) and takes another reference
on one whose hash and content match instead of writing a new one. `EaInodeIndex`
(ea_inode_index.py)
is that memory here: filled as values are read and written, bounded, and
never trusted (a candidate is re-checked, content included, before reuse).
An EA inode whose count reaches 0 is freed with its blocks.

Nothing read from an EA inode is trusted: its number, flag, type, use and
count are checked before anything changes, and a change that would take a
count below 0 is Corrupt (naming the EA inode), refused before any write.
Old Lustre-style EA inodes (a parent back-reference in i_mtime, no stored
count) are not recognised: their i_ctime reads as a huge count, so dropping
a reference to one leaves it allocated (e2fsck's to reclaim), never freed
early.

The value's blocks are written to the device at once, as file data is: they
are new and nothing durable points at them until the commit that records the
entry (ordered mode), and blocks freed earlier are not reused before then.
"""

from __future__ import annotations

import stat
import struct
from collections import Counter
from typing import TYPE_CHECKING

from ext4box.ext4.format import features as F
from ext4box.ext4.format.checksum import ext4_csum_seed
from ext4box.ext4.format.errors import Corrupt, inode_where
from ext4box.ext4.format.inode import FL_EA_INODE, FL_EXTENTS, Inode, replace_inode
from ext4box.ext4.format.superblock import Superblock
from ext4box.ext4.format.xattr import ea_inode_hash, parse_xattr_block, unread_ea_value
from ext4box.ext4.write.inline_writer import empty_extent_root
from ext4box.ext4.write.xattr_writer import (
    XattrState,
    XattrUpdate,
    ea_ref_changes,
    with_ea_inode,
    xattr_state,
)

if TYPE_CHECKING:
    from ext4box.ext4.write.context import WriteContext

_U32 = struct.Struct("<I")
_ATIME_OFFSET = 0x08  # i_atime: the value hash
_CTIME_OFFSET = 0x0C  # i_ctime: high 32 bits of the reference count
_OSD1_OFFSET = 0x24  # l_i_version: low 32 bits of the reference count
_NS = 1_000_000_000
_ATIME_EXTRA_ISIZE = 16  # i_extra_isize that covers atime_extra
# The count's high half goes through i_ctime, a signed 32-bit time: keep it positive.
REF_COUNT_MAX = (1 << 63) - 1
_WHAT = "xattr value inode"


def ea_hash_seed(sb: Superblock) -> int:
    """The seed of value hashes: the checksum seed (metadata_csum_seed) or crc32c of
    the UUID, with or without metadata_csum (the kernel sets it up for ea_inode too)."""
    if sb.has_incompat(F.INCOMPAT_CSUM_SEED):
        return int(sb.fields["checksum_seed"])
    return ext4_csum_seed(bytes(sb.fields["uuid"]))  # type: ignore[arg-type]


def stored_hash(inode: Inode) -> int:
    return _U32.unpack_from(inode.raw, _ATIME_OFFSET)[0]


def ref_count(inode: Inode) -> int:
    high = _U32.unpack_from(inode.raw, _CTIME_OFFSET)[0]
    return (high << 32) | _U32.unpack_from(inode.raw, _OSD1_OFFSET)[0]


def _u32_time_ns(word: int, inode: Inode) -> int:
    """A time whose stored 32-bit seconds are `word`. With the extra time word the
    kernel keeps the seconds unsigned (epoch bit 1 above 2^31); without it they
    are stored signed."""
    if inode.extra_isize >= _ATIME_EXTRA_ISIZE or word < 1 << 31:
        return word * _NS
    return (word - (1 << 32)) * _NS


def with_ref_count(inode: Inode, count: int) -> Inode:
    raw = bytearray(inode.raw)
    _U32.pack_into(raw, _OSD1_OFFSET, count & 0xFFFFFFFF)
    return replace_inode(inode, raw=bytes(raw), ctime_ns=_u32_time_ns(count >> 32, inode))


# ---------------------------------------------------------------- checking


def load(fs: WriteContext, ea_ino: int, *, owner: int) -> Inode:
    """EA inode `ea_ino`, named by an entry of inode `owner`, checked to be one in use."""
    where = inode_where(ea_ino)
    if not fs.sb.first_ino <= ea_ino <= fs.sb.inodes_count or ea_ino == owner:
        raise Corrupt(_WHAT, where, f"not a usable EA inode number (named by inode {owner})")
    inode = fs.table.read(ea_ino)
    if not inode.flags & FL_EA_INODE:
        raise Corrupt(_WHAT, where, "EA_INODE flag not set")
    if not inode.is_reg or inode.has_inline_data:
        raise Corrupt(_WHAT, where, "EA inode is not a block-mapped regular file")
    if inode.links_count == 0:
        raise Corrupt(_WHAT, where, "EA inode is not in use (links_count 0)")
    fs.inodes.check_free(ea_ino)  # allocated in its bitmap
    return inode


def owned_refs(fs: WriteContext, inode: Inode) -> dict[int, int]:
    """The references `inode`'s xattrs hold (as negative changes, ready to drop): one per
    entry of its inode body naming an EA inode, and its block's when the block is its
    alone (a shared block keeps them for the other inodes)."""
    if not fs.sb.has_incompat(F.INCOMPAT_EA_INODE):
        return {}
    return _held(_state_unread(fs, inode))


def _held(state: XattrState) -> dict[int, int]:
    held: Counter[int] = Counter()
    entries = list(state.ibody_entries)
    if state.block_nr and state.block_refcount <= 1:
        entries += state.block_entries
    for entry in entries:
        if entry.value_inum:
            held[entry.value_inum] -= 1
    return dict(held)


def _state_unread(fs: WriteContext, inode: Inode) -> XattrState:
    return xattr_state(
        inode, read_meta=fs.writer.read, block_size=fs.block_size, csum_seed=fs.sb.csum_seed,
        goal=fs.group_goal(inode.ino), ea_inode=True, cluster_size=fs.sb.cluster_size,
        read_ea_inode=unread_ea_value, ea_seed=ea_hash_seed(fs.sb))


def check_changes(fs: WriteContext, owner: int, changes: dict[int, int]) -> None:
    """Raise Corrupt now if `apply_changes(changes)` would fail half-way."""
    for ea_ino, step in changes.items():
        inode = load(fs, ea_ino, owner=owner)
        count = ref_count(inode)
        where = inode_where(ea_ino)
        if count == 0:
            raise Corrupt(_WHAT, where, f"ref count 0 while inode {owner} names it")
        if count + step < 0:
            raise Corrupt(_WHAT, where, f"ref count {count} cannot drop {-step} references")
        if count + step > REF_COUNT_MAX:
            raise Corrupt(_WHAT, where, f"ref count {count} cannot take {step} more")
        if count + step == 0:
            check_freeable(fs, inode)


def check_freeable(fs: WriteContext, inode: Inode) -> None:
    """Raise Corrupt if freeing EA inode `inode` would fail half-way. An EA inode with
    xattrs of its own (no kernel writes one) is refused: freeing it would follow them."""
    where = inode_where(inode.ino)
    if inode.file_acl or owned_refs(fs, inode):
        raise Corrupt(_WHAT, where, "EA inode has extended attributes of its own")
    fs.check_blocks_freeable(inode)


def check_release(fs: WriteContext, inode: Inode) -> None:
    """Raise Corrupt now if releasing `inode`'s xattrs would fail: its xattr block
    does not parse, or dropping the references its entries hold would fail (called
    before an inode that loses its last name is unlinked or freed)."""
    if fs.sb.has_incompat(F.INCOMPAT_EA_INODE):
        check_changes(fs, inode.ino, _held(_state_unread(fs, inode)))
    elif inode.file_acl:
        parse_xattr_block(fs.writer.read(inode.file_acl), blkno=inode.file_acl, ino=inode.ino,
                          csum_seed=fs.sb.csum_seed)


# ---------------------------------------------------------------- changing


def apply_changes(fs: WriteContext, changes: dict[int, int]) -> None:
    """Add each change to its EA inode's count; free those that reach 0.
    `check_changes` has passed for them (nothing here can fail half-way)."""
    for ea_ino, step in sorted(changes.items()):
        inode = fs.table.read(ea_ino)
        count = ref_count(inode) + step
        if count == 0:
            free(fs, inode)
        else:
            fs.store(with_ref_count(inode, count))


def release_all(fs: WriteContext, inode: Inode) -> None:
    """Drop the references `inode`'s xattrs hold (it is being freed)."""
    changes = owned_refs(fs, inode)
    if changes:
        check_changes(fs, inode.ino, changes)
        apply_changes(fs, changes)


def free(fs: WriteContext, inode: Inode) -> None:
    """Free an EA inode nothing names any more: its blocks and its number."""
    fs.ea_values.forget(inode.ino)
    fs.evict(replace_inode(inode, links_count=0))


def begin_update(
    fs: WriteContext, owner: Inode, state: XattrState, update: XattrUpdate
) -> tuple[XattrUpdate, dict[int, int], int | None]:
    """Before a planned xattr change is written: check every EA inode whose count it
    changes, then find or create the EA inode of its new value (holding the entry's
    reference). Returns the update naming that inode, the count changes still to
    apply (`apply_changes` once the rest is written) and the new value's EA inode
    (give it back with `abandon` if the change fails after all)."""
    changes = ea_ref_changes(state, update)
    check_changes(fs, owner.ino, changes)
    if update.new_ea_value is None:
        return update, changes, None
    ea_ino = acquire(fs, owner, update.new_ea_value)
    return with_ea_inode(update, state, ea_ino), changes, ea_ino


def abandon(fs: WriteContext, ea_ino: int) -> None:
    """Give back the reference `acquire` took (freeing the EA inode if it made it)."""
    apply_changes(fs, {ea_ino: -1})


def acquire(fs: WriteContext, owner: Inode, value: bytes) -> int:
    """An EA inode holding `value`, with one more reference: a known one with the same
    hash and content, else a new one."""
    value_hash = ea_inode_hash(ea_hash_seed(fs.sb), value)
    for ea_ino in fs.ea_values.candidates(value_hash):
        inode = _reusable(fs, ea_ino, value_hash, value, owner.ino)
        if inode is None:
            fs.ea_values.forget(ea_ino)
            continue
        fs.store(with_ref_count(inode, ref_count(inode) + 1))
        fs.ea_values.note(ea_ino, value_hash)
        return ea_ino
    return _create(fs, owner, value, value_hash)


def _reusable(
    fs: WriteContext, ea_ino: int, value_hash: int, value: bytes, owner: int
) -> Inode | None:
    try:
        inode = load(fs, ea_ino, owner=owner)
        count = ref_count(inode)
        if (
            inode.size != len(value)
            or stored_hash(inode) != value_hash
            or not 0 < count < REF_COUNT_MAX
        ):
            return None
        if fs.read_bytes(inode, 0, len(value)) != value:
            return None
    except Corrupt:
        return None
    return inode


def _create(fs: WriteContext, owner: Inode, value: bytes, value_hash: int) -> int:
    ea_ino = fs.inodes.alloc(owner.ino, is_dir=False)
    now = fs.now_ns()
    blank = fs.table.blank(ea_ino)
    inode = replace_inode(
        blank, mode=stat.S_IFREG | 0o600, uid=owner.uid, gid=owner.gid,
        links_count=1, size=len(value), atime_ns=_u32_time_ns(value_hash, blank), mtime_ns=now,
        crtime_ns=now, flags=FL_EA_INODE | (FL_EXTENTS if fs.has_extents else 0),
        i_block=empty_extent_root() if fs.has_extents else bytes(60))
    try:
        inode = _write_value(fs, with_ref_count(inode, 1), value)
    except BaseException:
        fs.inodes.free(ea_ino, False)
        raise
    fs.store(inode)
    fs.ea_values.note(ea_ino, value_hash)
    return ea_ino


def _write_value(fs: WriteContext, inode: Inode, value: bytes) -> Inode:
    """Allocate the value's blocks, write it there and map them; all or nothing."""
    bs = fs.block_size
    count = -(-len(value) // bs)
    tree = fs.tree_writer(inode)
    goal = fs.group_goal(inode.ino)
    lblk = 0
    try:
        while lblk < count:
            pblk, length = fs.blocks.alloc(goal, count - lblk)
            try:
                chunk = value[lblk * bs : (lblk + length) * bs]
                fs.dev.pwrite(pblk * bs, chunk + bytes(length * bs - len(chunk)))
                tree.insert(lblk, pblk, length)
            except BaseException:
                fs.blocks.free(pblk, length)
                raise
            lblk += length
            goal = pblk + length
    except BaseException:
        for pblk, length in tree.truncate(0):
            fs.blocks.free(pblk, length)
        raise
    return fs.with_tree(inode, tree, count)


def note_read(fs: WriteContext, ea_ino: int) -> None:
    """An EA inode's value was read: remember it for sharing, as the kernel's cache does."""
    fs.ea_values.note(ea_ino, stored_hash(fs.inode(ea_ino)))
