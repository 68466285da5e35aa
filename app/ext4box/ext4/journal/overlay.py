"""A read-only view of the device with the journal replayed in memory.

Reads of a block the journal holds a newer copy of return that copy (read from
the journal's own blocks on the device, escape restored); every other byte
comes from the device. Nothing is ever written, so a read-only mount of an
image that needs recovery leaves the image byte-identical.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

from ext4box.blockdev import BlockDevice, preadv_by_pread
from ext4box.ext4.journal.descriptor import unescape
from ext4box.ext4.journal.recovery import ReplayCopy


class OverlayDevice(BlockDevice):
    """`base` with some blocks replaced by their logged copies (read-only)."""

    def __init__(self, base: BlockDevice, block_size: int,
                 copies: Mapping[int, ReplayCopy]) -> None:
        # Same fd and size as the base; never writable through the overlay.
        super().__init__(base.fd, writable=False, size=base.size)
        self.base = base
        self.block_size = block_size
        self._copies = dict(copies)
        self._targets = sorted(copies)

    def close(self) -> None:
        """The base device belongs to whoever opened it."""

    @property
    def overlaid_blocks(self) -> int:
        return len(self._targets)

    def copy_of(self, block: int) -> ReplayCopy | None:
        """Where the journal's copy of filesystem block `block` is, or None."""
        return self._copies.get(block)

    def replayed_block(self, block: int) -> bytes | None:
        """The journal's copy of filesystem block `block`, or None."""
        copy = self._copies.get(block)
        if copy is None:
            return None
        data = self.base.pread(copy.device_block * self.block_size, self.block_size)
        return unescape(data) if copy.escaped else data

    def pread(self, offset: int, length: int) -> bytes:
        data = self.base.pread(offset, length)
        if not self._targets or length == 0:
            return data
        bs = self.block_size
        first = bisect.bisect_left(self._targets, offset // bs)
        last = bisect.bisect_right(self._targets, (offset + length - 1) // bs)
        if first == last:
            return data
        merged = bytearray(data)
        for block in self._targets[first:last]:
            replacement = self.replayed_block(block)
            assert replacement is not None
            start = max(offset, block * bs)
            end = min(offset + length, (block + 1) * bs)
            merged[start - offset : end - offset] = replacement[start - block * bs :
                                                                 end - block * bs]
        return bytes(merged)

    def preadv(self, buffers: Sequence[bytearray | memoryview], offset: int) -> int:
        return preadv_by_pread(self.pread, buffers, offset)
