"""FITRIM: hand the free blocks of the filesystem back to the storage under it,
as the kernel's ext4_trim_fs does, and say how many bytes that covered.

Which blocks: every run of free blocks in a group's bitmap that starts inside
the requested range and is at least `minlen` long (the device's discard
granularity when `minlen` is smaller), the whole run even where it continues
past the range's end inside its group (as ext4_try_to_trim_range does). A
block that is allocated, or freed but still pending (its bit stays set until
the commit that makes the freeing durable: alloc.py), is never discarded:
everything buffered is committed durably first, so no free bit depends on a
pointer that is not on the device yet. A group whose bitmap is unusable is
skipped, as the kernel skips a group with a corrupt bitmap.

Like the kernel, a group trimmed whole is remembered (BlockAllocator.
trimmed_groups, in memory) and skipped by the next FITRIM with the same or a
larger minlen until blocks are freed in it again; so a second `fstrim`
answers 0 bytes, as on the kernel's ext4.

The discard itself is BlockDevice.discard: a hole punched in an image file
(fallocate PUNCH_HOLE|KEEP_SIZE), BLKDISCARD on a block device. Storage that
can do neither answers EOPNOTSUPP, as the kernel does for a device without
discard support. Root only (CAP_SYS_ADMIN).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from ext4box.ext4.format import bitmap as B
from ext4box.ext4.format.errors import Ext4Error, InvalidArgument, NotPermitted, Unsupported
from ext4box.ext4.format.group_desc import blocks_in_group, group_first_block

if TYPE_CHECKING:
    from ext4box.ext4.write.context import WriteContext

log = structlog.get_logger("ext4box.ext4")

_ROOT = 0
# The first discard failing so means the storage (or the sandbox, which allows
# no BLKDISCARD) cannot discard at all: EOPNOTSUPP, as for a device without it.
_CANNOT_DISCARD = (errno.EOPNOTSUPP, errno.EPERM, errno.ENOTTY)


@dataclass(frozen=True, slots=True)
class TrimRange:
    """struct fstrim_range, in bytes."""

    start: int
    length: int
    minlen: int


def trim(fs: WriteContext, request: TrimRange, uid: int) -> int:
    """Discard the free blocks `request` selects; the bytes discarded (what FITRIM
    writes back into fstrim_range.len)."""
    if uid != _ROOT:
        raise NotPermitted("FITRIM needs CAP_SYS_ADMIN")
    sb = fs.sb
    bits = fs.block_size.bit_length() - 1
    per_group = sb.blocks_per_group
    start = request.start >> bits
    end = start + (request.length >> bits) - 1
    minlen = request.minlen >> bits
    if minlen > per_group or start >= sb.blocks_count or request.length < fs.block_size:
        raise InvalidArgument(f"FITRIM range {request.start}+{request.length} "
                           f"minlen {request.minlen}")
    granularity = fs.dev.discard_granularity
    if request.minlen < granularity:
        minlen = granularity >> bits
        if minlen > per_group:
            return 0
    end = min(end, sb.blocks_count - 1)
    first_data = sb.first_data_block
    if end <= first_data:
        return 0
    start = max(start, first_data)
    first_group, first_offset = divmod(start - first_data, per_group)
    last_group, last_offset = divmod(end - first_data, per_group)
    with fs.lock:
        fs.writer.commit(durable=True)
        trimmer = _GroupTrimmer(fs, minlen)
        trimmed = 0
        for group in range(first_group, last_group + 1):
            high = last_offset if group == last_group else per_group - 1
            trimmed += trimmer.trim_group(group, first_offset if group == first_group else 0,
                                          high)
        fs.blocks.last_trim_minlen = minlen
    return trimmed << bits


class _GroupTrimmer:
    def __init__(self, fs: WriteContext, minlen: int) -> None:
        self.fs = fs
        self.minlen = minlen
        self.discarded_any = False

    def trim_group(self, group: int, low: int, high: int) -> int:
        """ext4_trim_all_free + ext4_try_to_trim_range for one group: blocks discarded."""
        blocks = self.fs.blocks
        try:
            bitmap = blocks.bitmap(group)
        except Ext4Error as err:
            log.warning("trim_group_skipped", group=group, why=str(err))
            return 0
        nbits = blocks_in_group(self.fs.sb, group)
        free = B.count_zeros(bitmap, nbits)
        minlen = self.minlen
        if free < minlen:
            return 0
        if group in blocks.trimmed_groups and minlen >= blocks.last_trim_minlen:
            return 0
        last = nbits - 1
        used = B.bitmap_int(bitmap, nbits)
        free_bits = ~used & ((1 << nbits) - 1)
        whole = low == 0 and high >= last
        count = seen = 0
        at = low
        while at <= high:
            run_start = _first_bit_from(free_bits, at)
            if run_start is None or run_start > high:
                break
            found_end = _first_bit_from(used, run_start)
            run_end = last + 1 if found_end is None else found_end
            if low == 0 and run_end >= last:
                whole = True
            length = run_end - run_start
            if length >= minlen:
                if not self._discard(group, run_start, length):
                    return count
                count += length
            seen += length
            at = run_end + 1
            if free - seen < minlen:
                break
        if whole:
            blocks.trimmed_groups.add(group)
        return count

    def _discard(self, group: int, offset: int, length: int) -> bool:
        """Discard one free run; False when the device failed (this group stops)."""
        fs = self.fs
        pblk = group_first_block(fs.sb, group) + offset
        try:
            fs.dev.discard(pblk * fs.block_size, length * fs.block_size)
        except OSError as err:
            if err.errno in _CANNOT_DISCARD and not self.discarded_any:
                raise Unsupported("FITRIM", "the image", "the storage cannot discard") from err
            log.warning("trim_discard_failed", block=pblk, count=length, why=err.strerror)
            return err.errno == errno.EOPNOTSUPP  # counted anyway, as the kernel does
        self.discarded_any = True
        return True


def _first_bit_from(bits: int, start: int) -> int | None:
    """The lowest set bit of `bits` at or above `start`, or None."""
    above = bits >> start
    if not above:
        return None
    return start + (above & -above).bit_length() - 1
