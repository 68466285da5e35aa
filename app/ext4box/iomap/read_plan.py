"""Which device reads produce a read's bytes, and how are they run?

A plan is made once from a read's mappings: physically adjacent MAPPED ranges
become one vectored read, holes and unwritten ranges are left as zeros.
Executing it reads only the device, never metadata, so it may run in a
worker thread. A plan run into a caller's page-aligned buffer reads each
aligned device run O_DIRECT when a `DirectIO` takes it (iomap/direct_io.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ext4box.blockdev import BlockDevice
from ext4box.iomap.device_io import IOV_MAX, check_run, read_at, readv_at
from ext4box.iomap.direct_io import ALIGN, DirectIO
from ext4box.iomap.types import IOMap, IOMapKind


@dataclass(frozen=True, slots=True)
class DeviceSegment:
    """One vectored read: device bytes from `addr` spread over buffer slices."""

    addr: int
    slices: tuple[tuple[int, int], ...]  # (offset in the result buffer, length)

    @property
    def length(self) -> int:
        return sum(length for _, length in self.slices)


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """Everything needed to produce a read's bytes without touching metadata again.

    Ranges not covered by a segment or by `inline` are zeros (holes,
    unwritten extents). Executing a plan only does device I/O, so it may run
    in a worker thread.
    """

    ino: int
    length: int
    segments: tuple[DeviceSegment, ...] = ()
    inline: bytes | None = None


def plan_segments(pos: int, maps: list[IOMap]) -> tuple[DeviceSegment, ...]:
    """The vectored reads that fill a buffer for the read at `pos` mapped by `maps`."""
    segments: list[DeviceSegment] = []
    seg_addr = -1
    seg_end = -1
    slices: list[tuple[int, int]] = []
    for mapping in maps:
        if mapping.kind is not IOMapKind.MAPPED:
            continue
        assert mapping.addr is not None
        buf_off = mapping.offset - pos
        if slices and mapping.addr == seg_end and len(slices) < IOV_MAX:
            last_off, last_len = slices[-1]
            if last_off + last_len == buf_off:
                slices[-1] = (last_off, last_len + mapping.length)
            else:
                slices.append((buf_off, mapping.length))
        else:
            if slices:
                segments.append(DeviceSegment(seg_addr, tuple(slices)))
            seg_addr = mapping.addr
            slices = [(buf_off, mapping.length)]
        seg_end = mapping.addr + mapping.length
    if slices:
        segments.append(DeviceSegment(seg_addr, tuple(slices)))
    return tuple(segments)


def execute_plan(dev: BlockDevice, plan: ReadPlan) -> bytes:
    """Produce the bytes of a plan: device reads only, no metadata access."""
    if plan.inline is not None:
        body = plan.inline
        return body if len(body) == plan.length else body.ljust(plan.length, b"\0")
    segments = plan.segments
    if (
        len(segments) == 1
        and len(segments[0].slices) == 1
        and segments[0].slices[0] == (0, plan.length)
    ):
        # The common case — one contiguous extent covers the whole request:
        # pread straight into the result, no intermediate buffer.
        return read_at(dev, plan.ino, segments[0].addr, plan.length)
    # A fresh bytearray is already zero, which is what holes and unwritten
    # ranges must read as.
    buffer = bytearray(plan.length)
    view = memoryview(buffer)
    for segment in segments:
        readv_at(
            dev,
            plan.ino,
            segment.addr,
            [view[off : off + length] for off, length in segment.slices],
        )
    return bytes(buffer)


def execute_plan_into(
    dev: BlockDevice, direct: DirectIO | None, plan: ReadPlan, buffer: memoryview
) -> memoryview:
    """Produce a plan's bytes in `buffer` (page-aligned, reused); the filled view.

    For a one-thread transport that owns `buffer` and sends the view before
    it reads the next request. Holes and unwritten ranges are zeroed here:
    the buffer holds an earlier reply. Each device run that fills one
    aligned piece of the buffer is read with O_DIRECT when `direct` takes
    it (the rest is read buffered).
    """
    length = plan.length
    if plan.inline is not None:
        body = plan.inline[:length]
        buffer[: len(body)] = body
        buffer[len(body) : length] = bytes(length - len(body))
        return buffer[:length]
    cursor = 0
    for segment in plan.segments:
        for off, size in segment.slices:
            if off > cursor:
                buffer[cursor:off] = bytes(off - cursor)
            cursor = off + size
    if length > cursor:
        buffer[cursor:length] = bytes(length - cursor)
    for segment in plan.segments:
        if len(segment.slices) == 1 and _direct_read(dev, direct, plan, segment, buffer):
            continue
        readv_at(
            dev,
            plan.ino,
            segment.addr,
            [buffer[off : off + size] for off, size in segment.slices],
        )
    return buffer[:length]


def _direct_read(
    dev: BlockDevice,
    direct: DirectIO | None,
    plan: ReadPlan,
    segment: DeviceSegment,
    buffer: memoryview,
) -> bool:
    """Read a one-slice segment with O_DIRECT if `direct` takes it (see execute_plan_into).

    Whole ALIGN units only: a slice ending inside one is rounded up only
    when it ends the reply, so the extra bytes land past what is sent.
    """
    if direct is None:
        return False
    ((off, size),) = segment.slices
    rounded = -(-size // ALIGN) * ALIGN
    if off % ALIGN or (rounded != size and off + size != plan.length):
        return False
    if off + rounded > len(buffer):
        return False
    check_run(dev, plan.ino, segment.addr, size)
    return direct.read_into(segment.addr, buffer[off : off + rounded])
