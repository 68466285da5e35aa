"""How do a write's bytes reach the device once its blocks are mapped?

The write mappings (iomap/engine.py, `begin(write=True)`) say where each byte
goes. Newly allocated and converted blocks hold no file data yet, so they are
filled whole, zeros where the request does not reach: no stale block contents
ever become readable. Device-adjacent ranges go in one vectored write (through
device_io.py, O_DIRECT when it takes them), and the writeback of newly
allocated ranges starts as soon as they are written (iomap/writeback.py).
Only the device is touched here, never metadata.
"""

from __future__ import annotations

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Corrupt, inode_where
from ext4box.iomap.device_io import IOV_MAX, writev_at
from ext4box.iomap.direct_io import DirectIO
from ext4box.iomap.types import IOMap, IOMapKind
from ext4box.iomap.writeback import EarlyWriteback

# Write mappings: MAPPED is overwritten in place; NEW (just allocated) and
# UNWRITTEN (converted by this write) hold no file data yet, so the writer
# fills their blocks whole, zeros where the request does not reach.
_FILLED_KINDS = frozenset({IOMapKind.NEW, IOMapKind.UNWRITTEN})
_WRITABLE_KINDS = _FILLED_KINDS | {IOMapKind.MAPPED}


def write_mapped_data(
    dev: BlockDevice,
    ino: int,
    pos: int,
    data: memoryview,
    maps: list[IOMap],
    *,
    block_size: int,
    direct: DirectIO | None,
    writeback: EarlyWriteback | None,
) -> None:
    """Write `data` (the file's bytes from `pos` on) where `maps` put them.

    Device-adjacent ranges are coalesced into one vectored write (at most
    IOV_MAX buffers each). A mapping without allocated blocks is Corrupt
    (`begin(write=True)` never answers one).
    """
    seg_addr = -1
    seg_end = -1
    views: list[memoryview] = []
    # Newly allocated ranges of the pending segment: their writeback starts
    # early once written (iomap/writeback.py). Overwrites are left to the
    # commit, so rewriting the same blocks again and again is not written
    # back again and again.
    fresh: list[tuple[int, int]] = []
    for mapping in maps:
        if mapping.kind not in _WRITABLE_KINDS or mapping.addr is None:
            raise Corrupt(
                "write mapping", inode_where(ino), f"unallocated {mapping.kind.value}"
            )
        parts: list[memoryview] = []
        addr = mapping.addr
        if mapping.kind in _FILLED_KINDS:
            head = mapping.offset % block_size
            if head:
                parts.append(memoryview(bytes(head)))
                addr -= head
        body = data[mapping.offset - pos : mapping.end - pos]
        parts.append(body)
        if mapping.kind in _FILLED_KINDS:
            tail = -mapping.end % block_size
            if tail:
                parts.append(memoryview(bytes(tail)))
        length = sum(len(p) for p in parts)
        if views and addr == seg_end and len(views) + len(parts) <= IOV_MAX:
            views.extend(parts)
        else:
            if views and not writev_at(dev, direct, ino, seg_addr, views):
                _start_writeback(writeback, fresh)
            seg_addr = addr
            views = parts
            fresh = []
        if mapping.kind in _FILLED_KINDS:
            fresh.append((addr, length))
        seg_end = addr + length
    if views and not writev_at(dev, direct, ino, seg_addr, views):
        _start_writeback(writeback, fresh)


def _start_writeback(writeback: EarlyWriteback | None, ranges: list[tuple[int, int]]) -> None:
    if writeback is not None:
        for addr, length in ranges:
            writeback.wrote(addr, length)
