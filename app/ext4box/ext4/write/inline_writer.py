"""Writing to inline-data files, and the decision to move them out to blocks.

An inline file keeps its first 60 bytes in i_block and the rest in the value of
the in-inode attribute "system.data"; its capacity is 60 + that value's length.
The kernel grows the value to exactly the end of each write, shrinks it on
truncate, and gives up on inline storage (converts the file to extents) when a
write would end past the most the in-inode area can hold, or a truncate would
set i_size past the current capacity. These functions make the same decisions
so a file ends up stored as the kernel would store it.

Everything here is pure: the result says what i_block, the in-inode xattr area
and i_size become, or `NeedsConversion` with the pieces for the move to blocks.

Conversion, done by the facade (ext4_convert_inline_data_to_extent):
  1. plan = conversion(state, extents=<extents feature>) gives `body` (the
     current contents, i_size bytes), `i_block` (an empty extent root, or zeros
     for a block-mapped filesystem) and `ibody` (the in-inode area without
     system.data).
  2. If body is not empty: allocate one data block (goal: the inode's group),
     write body zero-padded to the block size (data first), insert extent
     lblk 0 -> that block (length 1) into the new root, i_blocks += block/512.
  3. Write the inode: flags &= ~FL_INLINE_DATA, flags |= FL_EXTENTS (extents
     feature), i_block and the in-inode area from the plan, i_blocks; checksum.
  4. Then do the original write or truncate through the block path.

Symlinks: the kernel never stores a symlink inline, inline_data or not: a
target shorter than 60 bytes is a fast symlink (in i_block, no EXTENTS flag),
anything longer gets an extent-mapped block. e2fsprogs (mkfs -d, debugfs
symlink) does make inline symlinks, which the read side serves;
`fast_symlink_i_block` builds the kernel's fast form.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ext4box.ext4.format.errors import Corrupt, inode_where
from ext4box.ext4.format.inline_data import (
    INLINE_IBLOCK_SIZE,
    SYSTEM_DATA_NAME,
    inline_bytes,
    split_inline_body,
)
from ext4box.ext4.format.xattr import XattrEntry, build_ibody_xattrs, split_name

_EXTENT_MAGIC = 0xF30A
# eh_magic, eh_entries, eh_max, eh_depth, eh_generation
_EXTENT_HEADER = struct.Struct("<HHHHI")
_ROOT_MAX_ENTRIES = (INLINE_IBLOCK_SIZE - _EXTENT_HEADER.size) // 12
_IBODY_MAGIC_BYTES = 4
_END_MARKER_BYTES = 4
_ENTRY_BYTES = 16
FAST_SYMLINK_MAX = INLINE_IBLOCK_SIZE - 1  # the kernel keeps the NUL within i_block


@dataclass(frozen=True, slots=True)
class InlineState:
    ino: int
    i_block: bytes  # 60 bytes
    size: int  # i_size
    ibody_entries: tuple[XattrEntry, ...]  # in-inode attributes, on-disk order
    ibody_size: int  # usable in-inode area, 0 if the inode has none

    @property
    def system_data(self) -> bytes | None:
        for entry in self.ibody_entries:
            if entry.name == SYSTEM_DATA_NAME:
                return entry.value
        return None

    @property
    def capacity(self) -> int:
        """Bytes of body the inode holds now (the kernel's i_inline_size)."""
        data = self.system_data
        return INLINE_IBLOCK_SIZE + len(data) if data is not None else 0

    @property
    def body(self) -> bytes:
        """The current contents: i_size bytes, zeros past what is stored."""
        stored = inline_bytes(self.i_block, self.system_data, self.size, self.ino)
        return stored + bytes(self.size - len(stored))


@dataclass(frozen=True, slots=True)
class InlineLayout:
    """The inline part of an inode after a write or truncate."""

    i_block: bytes  # 60 bytes
    ibody: bytes  # the in-inode xattr area (ibody_size bytes), system.data included
    size: int  # new i_size
    system_data: bytes  # its value, for callers that cache it


@dataclass(frozen=True, slots=True)
class NeedsConversion:
    """The operation does not fit inline: convert to blocks first (see module doc)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConversionPlan:
    body: bytes  # write this at offset 0 of the new block (zero-padded), if not empty
    i_block: bytes  # the new i_block: an empty extent root (or zeros without extents)
    ibody: bytes  # the in-inode xattr area without system.data


def max_inline_size(state: InlineState) -> int:
    """The longest body the inode could hold inline (ext4_get_max_inline_size).

    All in-inode space not used by other attributes can go to system.data; 0
    means inline storage is impossible (also when that space is 0 bytes).
    """
    if state.ibody_size == 0:
        return 0
    others = 0
    for entry in state.ibody_entries:
        if entry.name == SYSTEM_DATA_NAME:
            continue
        others += _entry_bytes(entry)
    data_entry = _padded(_ENTRY_BYTES + len(split_name(SYSTEM_DATA_NAME)[1]))
    free = state.ibody_size - _IBODY_MAGIC_BYTES - _END_MARKER_BYTES - others - data_entry
    if free <= 0:
        return 0
    return INLINE_IBLOCK_SIZE + (free & ~3)


def write_inline(state: InlineState, offset: int, data: bytes) -> InlineLayout | NeedsConversion:
    """Write `data` at `offset` into an inline file (or an empty file becoming one).

    An inode without system.data is taken to be an empty, blockless file the
    kernel would make inline on its first write (ext4_create_inline_data).
    """
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    end = offset + len(data)
    if end > max_inline_size(state):
        return NeedsConversion(f"a write ending at {end} exceeds {max_inline_size(state)}")
    if state.system_data is None and state.size:
        raise Corrupt("inline data", inode_where(state.ino), "no system.data for a non-empty body")
    capacity = max(state.capacity, INLINE_IBLOCK_SIZE, end)
    body = bytearray(_stored(state, capacity))
    # Bytes between the old end of file and the write must read as zeros.
    if offset > state.size:
        body[state.size : offset] = bytes(offset - state.size)
    body[offset:end] = data
    return _layout(state, bytes(body), max(state.size, end))


def truncate_inline(state: InlineState, new_size: int) -> InlineLayout | NeedsConversion:
    """Set i_size of an inline file (ext4_setattr / ext4_inline_data_truncate)."""
    if new_size < 0:
        raise ValueError(f"negative size {new_size}")
    capacity = max(state.capacity, INLINE_IBLOCK_SIZE)
    if new_size > capacity:
        return NeedsConversion(f"size {new_size} exceeds the inline capacity {capacity}")
    body = bytearray(_stored(state, capacity))
    # Everything past the new end is zeroed (shrink) and the gap up to it reads as
    # zeros (grow), so later growth never uncovers old bytes.
    keep = min(state.size, new_size)
    body[keep:] = bytes(len(body) - keep)
    if new_size < capacity:
        # The kernel cuts system.data to the new end: capacity follows i_size.
        body = body[: max(new_size, INLINE_IBLOCK_SIZE)]
    return _layout(state, bytes(body), new_size)


def conversion(state: InlineState, *, extents: bool) -> ConversionPlan:
    """The pieces for moving an inline file to blocks (steps in the module doc)."""
    remaining = tuple(e for e in state.ibody_entries if e.name != SYSTEM_DATA_NAME)
    return ConversionPlan(
        body=state.body,
        i_block=empty_extent_root() if extents else bytes(INLINE_IBLOCK_SIZE),
        ibody=build_ibody_xattrs(remaining, state.ibody_size),
    )


def empty_extent_root() -> bytes:
    """i_block of an extent-mapped inode with no extents yet (ext4_ext_tree_init)."""
    header = _EXTENT_HEADER.pack(_EXTENT_MAGIC, 0, _ROOT_MAX_ENTRIES, 0, 0)
    return header + bytes(INLINE_IBLOCK_SIZE - len(header))


def new_inline_body(state: InlineState, body: bytes) -> InlineLayout | NeedsConversion:
    """Lay out a whole body in a fresh inline inode (system.data sized to the body)."""
    if len(body) > max_inline_size(state):
        return NeedsConversion(f"{len(body)} bytes exceed {max_inline_size(state)}")
    padded = body + bytes(max(INLINE_IBLOCK_SIZE - len(body), 0))
    return _layout(state, padded, len(body))


def fast_symlink_i_block(target: bytes) -> bytes:
    """i_block of a fast symlink (target < 60 bytes), as the kernel writes it."""
    if not target or len(target) > FAST_SYMLINK_MAX:
        raise ValueError(f"a fast symlink target has 1..{FAST_SYMLINK_MAX} bytes")
    return target + bytes(INLINE_IBLOCK_SIZE - len(target))


def _stored(state: InlineState, capacity: int) -> bytes:
    """The stored i_block + system.data bytes, zero-extended to `capacity`."""
    stored = bytes(state.i_block) + (state.system_data or b"")
    return stored[:capacity] + bytes(max(capacity - len(stored), 0))


def _layout(state: InlineState, stored: bytes, size: int) -> InlineLayout:
    """Split stored bytes (60 + system.data value length) into i_block and the area."""
    i_block, system_data = split_inline_body(stored)
    entries = list(state.ibody_entries)
    for position, entry in enumerate(entries):
        if entry.name == SYSTEM_DATA_NAME:
            entries[position] = XattrEntry(SYSTEM_DATA_NAME, system_data)
            break
    else:
        entries.append(XattrEntry(SYSTEM_DATA_NAME, system_data))
    ibody = build_ibody_xattrs(entries, state.ibody_size)
    return InlineLayout(i_block=i_block, ibody=ibody, size=size, system_data=system_data)


def _entry_bytes(entry: XattrEntry) -> int:
    _index, suffix = split_name(entry.name)
    value = 0 if entry.value_inum else _padded(len(entry.value))
    return _padded(_ENTRY_BYTES + len(suffix)) + value


def _padded(size: int) -> int:
    return (size + 3) & ~3
