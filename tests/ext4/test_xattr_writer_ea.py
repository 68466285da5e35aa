"""Planning xattr changes with the ea_inode feature: where a value goes, which EA inode
references a change takes and drops, and what it charges to the owner.

Pure planning, no image: the rules are the kernel's (ext4_xattr_set_handle puts a
value whose padded size exceeds EXT4_XATTR_MIN_LARGE_EA_SIZE in an EA inode at
once, and one that fits nowhere else after trying; every entry naming an EA inode
holds one reference; the owner is charged each value rounded up to clusters). The
whole path is checked against the kernel and e2fsck in tests/rw/test_rw_ea_inode.py.
"""

from __future__ import annotations

from ext4box.ext4.format.xattr import XattrEntry
from ext4box.ext4.write.ea_inode_index import EaInodeIndex
from ext4box.ext4.write.xattr_writer import (
    NEW_EA_INODE,
    BlockAction,
    XattrState,
    ea_charge_delta,
    ea_ref_changes,
    remove_xattr,
    set_xattr,
    with_ea_inode,
)

BLOCK = 1024
# 1 KiB blocks: min(large EA) = 1024 - 20 (an entry with a 3-byte name) - 32 - 4 = 968.
MIN_LARGE = 968


def _state(ibody: tuple[XattrEntry, ...] = (), block: tuple[XattrEntry, ...] = (),
           refcount: int = 1, ibody_size: int = 96) -> XattrState:
    return XattrState(
        ino=12, ibody_entries=ibody, ibody_size=ibody_size, block_entries=block,
        block_nr=500 if block else 0, block_refcount=refcount if block else 0,
        block_size=BLOCK, csum_seed=None, goal=1, is_dir=False, ea_inode=True, ea_seed=7)


def test_a_large_value_goes_to_an_ea_inode_named_from_the_inode() -> None:
    update = set_xattr(_state(), b"user.big", b"v" * (MIN_LARGE + 1))
    assert update.new_ea_value == b"v" * (MIN_LARGE + 1)
    assert [e.value_inum for e in update.ibody_entries] == [NEW_EA_INODE]
    assert update.block_action is BlockAction.KEEP
    resolved = with_ea_inode(update, _state(), 40)
    assert resolved.ibody is not None and resolved.ibody_entries[0].value_inum == 40


def test_a_value_that_fits_nowhere_plain_goes_to_an_ea_inode() -> None:
    crowded = _state(block=(XattrEntry(b"user.f", b"f" * 600),))
    update = set_xattr(crowded, b"user.mid", b"m" * 500)  # the block would pass its reserve
    assert update.new_ea_value == b"m" * 500
    fits = set_xattr(_state(), b"user.mid", b"m" * 500)  # an empty block takes it plain
    assert fits.new_ea_value is None and fits.block_action is BlockAction.ALLOCATE


def test_replacing_and_removing_drop_the_old_reference() -> None:
    state = _state(ibody=(XattrEntry(b"user.big", b"o" * 2000, 40),))
    replaced = set_xattr(state, b"user.big", b"n" * 2000)
    assert ea_ref_changes(state, replaced) == {40: -1}  # the new one comes with its inode
    assert ea_charge_delta(state, replaced) == 0  # 2 KiB out, 2 KiB in
    same = set_xattr(state, b"user.big", b"o" * 2000)
    assert same.changed and same.new_ea_value == b"o" * 2000  # re-set, as the kernel
    removed = remove_xattr(state, b"user.big")
    assert ea_ref_changes(state, removed) == {40: -1}
    assert ea_charge_delta(state, removed) == -4  # two 1 KiB blocks in 512-byte sectors


def test_a_shared_block_copy_takes_its_own_references() -> None:
    block = (XattrEntry(b"user.a", b"a" * 3000, 41), XattrEntry(b"user.b", b"b" * 10, 0))
    shared = _state(block=block, refcount=2, ibody_size=0)
    update = set_xattr(shared, b"user.b", b"c" * 10)
    assert update.block_action is BlockAction.COPY
    assert ea_ref_changes(shared, update) == {41: +1}
    private = _state(block=block, refcount=1, ibody_size=0)
    assert ea_ref_changes(private, set_xattr(private, b"user.b", b"c" * 10)) == {}
    detached = remove_xattr(_state(block=block[:1], refcount=2, ibody_size=0), b"user.a")
    assert detached.block_action is BlockAction.DETACH
    assert ea_ref_changes(_state(block=block[:1], refcount=2, ibody_size=0), detached) == {}


def test_the_index_of_ea_inodes_is_bounded_and_forgets() -> None:
    index = EaInodeIndex(limit=3)
    for ino, value_hash in ((20, 1), (21, 1), (22, 2), (23, 3)):
        index.note(ino, value_hash)
    assert len(index) == 3 and index.candidates(1) == [21]  # 20, the oldest, went first
    index.note(21, 5)  # the inode now holds another value
    assert index.candidates(1) == [] and index.candidates(5) == [21]
    index.forget(22)
    assert index.candidates(2) == [] and len(index) == 2
