"""The iomap engine: map a file range, then do the I/O for it.

The filesystem below only answers "which blocks hold this range" through
`map_blocks` (the block-run contract of ext4/blockrun.py) and "what is the
inline body" (the Protocols in source.py); everything else — byte-granular
mappings, caching the runs, clipping at EOF, zero-filling holes, coalescing
device-adjacent ranges into one vectored read — lives here and knows nothing
of extents, block maps or inodes' on-disk layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import structlog

from ext4box.blockdev import BlockDevice, DeviceRangeError
from ext4box.ext4.format.blockrun import BlockRun
from ext4box.ext4.format.errors import Corrupt, ReadOnly, inode_where
from ext4box.iomap import copy_range, seek
from ext4box.iomap.cache import MappingCache
from ext4box.iomap.direct_io import ALIGN, DirectIO
from ext4box.iomap.source import MappedInode, MappingSource, WritableSource
from ext4box.iomap.types import IOMap, IOMapKind
from ext4box.iomap.writeback import EarlyWriteback

log = structlog.get_logger("ext4box.iomap")

# Beyond a cache miss, map this many bytes ahead so a sequential reader walks
# the mapping tree once per window rather than once per request.
MAP_AHEAD_BYTES = 16 * 1024 * 1024

# Write mappings: MAPPED is overwritten in place; NEW (just allocated) and
# UNWRITTEN (converted by this write) hold no file data yet, so the writer
# fills their blocks whole, zeros where the request does not reach.
_FILLED_KINDS = frozenset({IOMapKind.NEW, IOMapKind.UNWRITTEN})
_WRITABLE_KINDS = _FILLED_KINDS | {IOMapKind.MAPPED}

# os.preadv accepts at most IOV_MAX buffers per call.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


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


class IOMapEngine:
    """Mapping (`begin`) and read execution for one filesystem on one device."""

    def __init__(
        self,
        source: MappingSource,
        dev: BlockDevice,
        *,
        cache_inodes: int = 1024,
        cache_runs_per_inode: int = 8192,
        map_ahead_bytes: int = MAP_AHEAD_BYTES,
    ) -> None:
        self.source = source
        self.dev = dev
        self.block_size = source.block_size
        self.cache = MappingCache(cache_inodes, cache_runs_per_inode)
        self.map_ahead_blocks = max(1, map_ahead_bytes // self.block_size)
        # Streamed new data starts its way to the disk as it is written, not at
        # the commit's fsync (see iomap/writeback.py). Read-only devices write nothing.
        fd = getattr(dev, "fd", None)
        self.writeback = (
            EarlyWriteback(fd) if getattr(dev, "writable", False) and isinstance(fd, int) else None
        )
        # Large aligned data runs bypass the image's page cache (iomap/direct_io.py);
        # set by whoever serves the mount, before any sandbox forbids the open.
        self.direct: DirectIO | None = None

    # -- mapping ---------------------------------------------------------------

    def begin(self, inode: MappedInode, pos: int, length: int, write: bool = False) -> list[IOMap]:
        """Byte-granular mappings that exactly tile [pos, pos + length).

        With `write=True` every block of the range is allocated first (through
        the filesystem's `write_begin`): the answer holds only MAPPED, NEW and
        UNWRITTEN (converted by this write) ranges, or one INLINE range, never
        a hole.
        """
        if pos < 0 or length < 0:
            raise ValueError("negative position or length")
        if length == 0:
            return []
        if inode.has_inline_data:
            return [IOMap(IOMapKind.INLINE, pos, length)]
        if write:
            return self._begin_write(inode, pos, length)
        block_size = self.block_size
        first = pos // block_size
        end_block = -(-(pos + length) // block_size)
        maps: list[IOMap] = []
        end = pos + length
        for run in self._runs(inode, first, end_block):
            start = max(run.lblk * block_size, pos)
            stop = min(run.end * block_size, end)
            if run.pblk is None:
                kind, addr = IOMapKind.HOLE, None
            else:
                kind = IOMapKind.UNWRITTEN if run.unwritten else IOMapKind.MAPPED
                addr = run.pblk * block_size + (start - run.lblk * block_size)
            previous = maps[-1] if maps else None
            if (
                previous is not None
                and previous.kind is kind
                and (addr is None or previous.addr + previous.length == addr)
            ):
                maps[-1] = IOMap(
                    kind, previous.offset, previous.length + stop - start, previous.addr
                )
            else:
                maps.append(IOMap(kind, start, stop - start, addr))
        return maps

    def invalidate(self, ino: int) -> None:
        """Forget cached runs of `ino` (for the write path: its mapping changed)."""
        self.cache.invalidate(ino)

    def _runs(self, inode: MappedInode, first: int, end: int) -> list[BlockRun]:
        """Runs tiling [first, end), from the cache where possible."""
        cache = self.cache
        with cache.lock:
            entry = cache.runs_for(inode.ino)
            found, gaps = entry.covering(first, end)
        if not gaps:
            return found
        # Fill the gaps, mapping ahead of the last one (bounded by EOF) so
        # the next sequential request hits the cache.
        eof_block = -(-inode.size // self.block_size)
        fetched: list[BlockRun] = []
        for index, (gap_start, gap_end) in enumerate(gaps):
            if index == len(gaps) - 1:
                ahead = max(gap_end, min(gap_start + self.map_ahead_blocks, eof_block))
                gap_end = self._next_cached_start(inode.ino, gap_end, ahead)
            runs = self.source.map_blocks(inode, gap_start, gap_end - gap_start)
            _check_tiling(inode.ino, runs, gap_start, gap_end)
            fetched.extend(runs)
        with cache.lock:
            entry = cache.runs_for(inode.ino)
            # Another request may have filled part of the range meanwhile;
            # insert only what is still missing.
            _, still_missing = entry.covering(first, fetched[-1].end)
            entry.insert([r for r in fetched if _inside_any(r, still_missing)])
            found, gaps = entry.covering(first, end)
            cache.trim(inode.ino, entry)
        if gaps:
            # The per-inode bound dropped the runs (or a concurrent request
            # raced us): answer this request from a direct walk.
            runs = self.source.map_blocks(inode, first, end - first)
            _check_tiling(inode.ino, runs, first, end)
            return runs
        return found

    def _next_cached_start(self, ino: int, gap_end: int, ahead: int) -> int:
        """Extend a gap up to `ahead` but stop at the next run already cached."""
        if ahead <= gap_end:
            return gap_end
        with self.cache.lock:
            _, gaps = self.cache.runs_for(ino).covering(gap_end, ahead)
        if gaps and gaps[0][0] == gap_end:
            return gaps[0][1]
        return gap_end

    # -- reading ---------------------------------------------------------------

    def plan_read(self, inode: MappedInode, pos: int, size: int) -> ReadPlan:
        """Map a read request, clipped at i_size, into a `ReadPlan`."""
        if pos < 0 or size < 0:
            raise ValueError("negative position or size")
        length = min(size, max(0, inode.size - pos))
        if length == 0:
            return ReadPlan(inode.ino, 0)
        maps = self.begin(inode, pos, length)
        if maps and maps[0].kind is IOMapKind.INLINE:
            body = self.source.inline_data(inode)
            # A body shorter than i_size reads as zeros past its end, like a hole.
            return ReadPlan(inode.ino, length, inline=bytes(body[pos : pos + length]))
        segments: list[DeviceSegment] = []
        seg_addr = -1
        seg_end = -1
        slices: list[tuple[int, int]] = []
        for mapping in maps:
            if mapping.kind is not IOMapKind.MAPPED:
                continue
            assert mapping.addr is not None
            buf_off = mapping.offset - pos
            if slices and mapping.addr == seg_end and len(slices) < _IOV_MAX:
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
        return ReadPlan(inode.ino, length, tuple(segments))

    def execute(self, plan: ReadPlan) -> bytes:
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
            return self._device_read(plan.ino, segments[0].addr, plan.length)
        # A fresh bytearray is already zero, which is what holes and unwritten
        # ranges must read as.
        buffer = bytearray(plan.length)
        view = memoryview(buffer)
        for segment in segments:
            self._device_readv(
                plan.ino, segment.addr, [view[off : off + length] for off, length in segment.slices]
            )
        return bytes(buffer)

    def execute_into(self, plan: ReadPlan, buffer: memoryview) -> memoryview:
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
            if len(segment.slices) == 1 and self._direct_read(plan, segment, buffer):
                continue
            self._device_readv(
                plan.ino, segment.addr, [buffer[off : off + size] for off, size in segment.slices]
            )
        return buffer[:length]

    def _direct_read(self, plan: ReadPlan, segment: DeviceSegment, buffer: memoryview) -> bool:
        """Read a one-slice segment with O_DIRECT if `direct` takes it (see execute_into).

        Whole ALIGN units only: a slice ending inside one is rounded up only
        when it ends the reply, so the extra bytes land past what is sent.
        """
        direct = self.direct
        if direct is None:
            return False
        ((off, size),) = segment.slices
        rounded = -(-size // ALIGN) * ALIGN
        if off % ALIGN or (rounded != size and off + size != plan.length):
            return False
        if off + rounded > len(buffer):
            return False
        try:
            self.dev.check_range(segment.addr, size)
        except DeviceRangeError as err:
            raise Corrupt("data run", inode_where(plan.ino), str(err)) from None
        return direct.read_into(segment.addr, buffer[off : off + rounded])

    def read(self, inode: MappedInode, pos: int, size: int) -> bytes:
        """Read up to `size` bytes at `pos` (short only at EOF)."""
        return self.execute(self.plan_read(inode, pos, size))

    def _device_read(self, ino: int, addr: int, length: int) -> bytes:
        try:
            return self.dev.pread(addr, length)
        except DeviceRangeError as err:
            raise Corrupt("data run", inode_where(ino), str(err)) from None

    def _device_readv(self, ino: int, addr: int, views: list[memoryview]) -> None:
        total = sum(len(v) for v in views)
        try:
            self.dev.check_range(addr, total)
        except DeviceRangeError as err:
            raise Corrupt("data run", inode_where(ino), str(err)) from None
        while views:
            done = self.dev.preadv(views, addr)  # an overlay device serves replayed blocks
            if done <= 0:
                raise Corrupt("data run", inode_where(ino), f"device ends inside {addr}+{total}")
            # A short vectored read: keep only the buffers still unfilled.
            views = _drop_prefix(views, done)
            addr += done

    # -- writing ---------------------------------------------------------------

    def writable_source(self) -> WritableSource:
        """The filesystem as a writable source; ReadOnly when it is mounted read-only."""
        source = self.source
        if not hasattr(source, "write_begin"):
            raise ReadOnly("the filesystem is mounted read-only")
        return source  # type: ignore[return-value]

    def _begin_write(self, inode: MappedInode, pos: int, length: int) -> list[IOMap]:
        block_size = self.block_size
        first = pos // block_size
        end_block = -(-(pos + length) // block_size)
        end = pos + length
        maps: list[IOMap] = []
        for lblk, run_len, pblk, new, converted in self._write_runs(inode, first, end_block):
            start = max(lblk * block_size, pos)
            stop = min((lblk + run_len) * block_size, end)
            kind = _write_kind(new=new, converted=converted)
            addr = pblk * block_size + (start - lblk * block_size)
            previous = maps[-1] if maps else None
            if (
                previous is not None
                and previous.kind is kind
                and previous.addr is not None
                and previous.addr + previous.length == addr
            ):
                maps[-1] = IOMap(
                    kind, previous.offset, previous.length + stop - start, previous.addr
                )
            else:
                maps.append(IOMap(kind, start, stop - start, addr))
        return maps

    def _write_runs(
        self, inode: MappedInode, first: int, end: int
    ) -> list[tuple[int, int, int, bool, bool]]:
        """(lblk, length, pblk, new, converted) tiling [first, end), every block allocated.

        An overwrite of blocks already known to be written is answered from
        the mapping cache; anything else goes to `write_begin`, which may
        allocate or convert, so the cached runs of that range are dropped.
        """
        cache = self.cache
        with cache.lock:
            found, gaps = cache.runs_for(inode.ino).covering(first, end)
        if gaps and end <= -(-inode.size // self.block_size):
            # An overwrite inside i_size the cache does not know yet: map it as
            # a read would (mapping ahead, so the next random overwrites of the
            # file hit the cache). write_begin on written blocks only maps them.
            self.writable_source()  # a read-only filesystem refuses, as write_begin would
            found, gaps = self._runs(inode, first, end), []
        if not gaps and all(r.pblk is not None and not r.unwritten for r in found):
            return [(r.lblk, r.length, r.pblk, False, False) for r in found]  # type: ignore[misc]
        runs = self.writable_source().write_begin(inode, first, end - first)
        # write_begin maps (allocates, converts) only [first, end): what is cached
        # around it stays right, so a random fill of a fragmented file does not
        # map 16 MiB ahead again after every allocating write.
        self.cache.invalidate_range(inode.ino, first, end)
        result: list[tuple[int, int, int, bool, bool]] = []
        cursor = first
        for run in runs:
            if run.lblk != cursor or run.length <= 0 or run.pblk is None:
                raise Corrupt(
                    "write mapping",
                    inode_where(inode.ino),
                    f"write_begin runs do not tile blocks {first}..{end} with allocated "
                    f"blocks at {cursor}",
                )
            converted = bool(getattr(run, "converted", False))
            result.append((run.lblk, run.length, run.pblk, bool(run.new) or converted, converted))
            cursor = run.lblk + run.length
        if cursor != end:
            raise Corrupt(
                "write mapping", inode_where(inode.ino), f"write_begin runs end at {cursor}"
            )
        return result

    def write(self, inode: MappedInode, pos: int, data: bytes, *, now_ns: int) -> int:
        """Write `data` at `pos`: allocate, write the data, then `write_end` (ioend).

        Data reaches the device (the image's page cache) before the metadata
        that points at it can be committed: `write_end` only changes buffered
        metadata, and commits happen after this returns. Newly allocated
        blocks are written whole, zeros where the request does not reach, so
        no stale block contents ever become readable. Returns how many bytes
        were written: all of `data`, or fewer when the file's size limit cuts
        the write short (a write starting at the limit raises instead).
        """
        source = self.writable_source()
        if pos < 0:
            raise ValueError("negative position")
        if not data:
            return 0
        ino = inode.ino
        # Before any byte moves: the overwrite fast path below never reaches
        # write_begin's checks (a directory's blocks are not file data), and
        # the file's size limit may cut the write short.
        length = source.writable_length(ino, pos, len(data))
        if length < len(data):
            data = data[:length]
        if inode.has_inline_data or _empty_and_blockless(inode):
            # An inline file, or an empty one that may become inline (the
            # filesystem decides: False means "use blocks").
            if source.write_inline(ino, pos, data):
                source.write_end(ino, pos + length, now_ns=now_ns)
                return length
            # Converted to extents (or never inline): start from the current inode.
            self.cache.invalidate(ino)
            inode = source.inode(ino)
            if inode.has_inline_data:
                raise Corrupt(
                    "inode", inode_where(ino), "write_inline refused but kept inline data"
                )
        self.zero_tail(inode, pos)
        maps = self.begin(inode, pos, length, write=True)
        try:
            self._write_maps(ino, pos, memoryview(data), maps)
        except BaseException:
            # The new blocks may hold an earlier owner's data: they must not stay
            # mapped (the device refused the write, e.g. the host disk is full).
            self.cache.invalidate(ino)
            try:
                source.write_abort(ino, self._block_ranges(maps, IOMapKind.NEW),
                                   self._block_ranges(maps, IOMapKind.UNWRITTEN))
            except Exception as err:  # the write's own error is the one to report
                log.error("write_abort_failed", ino=ino, error=str(err))
            raise
        source.write_end(ino, pos + length, now_ns=now_ns)
        return length

    # -- space management, seeking, copying ----------------------------------------
    # The entry points a FUSE layer calls for fallocate, lseek(SEEK_DATA/SEEK_HOLE)
    # and copy_file_range; the rules live in ext4/fallocate.py, iomap/seek.py and
    # iomap/copy_range.py.

    def fallocate(self, ino: int, mode: int, offset: int, length: int, *,
                  now_ns: int) -> MappedInode:
        """fallocate(2) on inode `ino`; returns the updated inode (size, blocks, times)."""
        source = self.writable_source()
        try:
            return source.fallocate(ino, mode, offset, length, now_ns=now_ns)
        finally:
            # Blocks were allocated, unmapped, converted or moved (or, on a
            # failure, perhaps converted back): nothing cached of `ino` holds.
            self.cache.invalidate(ino)

    def seek(self, inode: MappedInode, pos: int, whence: int) -> int:
        """lseek(2) with SEEK_DATA or SEEK_HOLE; NoSuchOffset (ENXIO) past the data/EOF."""
        return seek.seek(self, inode, pos, whence)

    def copy_file_range(self, src_ino: int, src_pos: int, dst_ino: int, dst_pos: int,
                        length: int, *, now_ns: int) -> int:
        """copy_file_range(2) between two inodes of this filesystem; bytes copied."""
        return copy_range.copy_file_range(self, src_ino, src_pos, dst_ino, dst_pos, length,
                                    now_ns=now_ns)

    def _block_ranges(self, maps: list[IOMap], kind: IOMapKind) -> list[tuple[int, int]]:
        """(lblk, length) of the blocks behind the mappings of `kind`."""
        block_size = self.block_size
        ranges: list[tuple[int, int]] = []
        for mapping in maps:
            if mapping.kind is kind:
                first = mapping.offset // block_size
                ranges.append((first, -(-mapping.end // block_size) - first))
        return ranges

    def zero_tail(self, inode: MappedInode, new_end: int) -> None:
        """Before i_size grows to cover `new_end`: zero the old last block past EOF.

        Bytes beyond i_size in the last block must read as zeros once the
        file grows over them (a write past EOF, or truncate up); whatever an
        earlier writer left there must not reappear.
        """
        size = inode.size
        block_size = self.block_size
        if new_end <= size or size % block_size == 0 or inode.has_inline_data:
            return
        stop = min(new_end, (size // block_size + 1) * block_size)
        for mapping in self.begin(inode, size, stop - size):
            if mapping.kind is IOMapKind.MAPPED and mapping.addr is not None:
                self._device_writev(
                    ino=inode.ino, addr=mapping.addr, views=[memoryview(bytes(mapping.length))]
                )

    def _write_maps(self, ino: int, pos: int, data: memoryview, maps: list[IOMap]) -> None:
        """Coalesce device-adjacent ranges into vectored writes and issue them."""
        block_size = self.block_size
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
            if views and addr == seg_end and len(views) + len(parts) <= _IOV_MAX:
                views.extend(parts)
            else:
                if views and not self._device_writev(ino, seg_addr, views):
                    self._start_writeback(fresh)
                seg_addr = addr
                views = parts
                fresh = []
            if mapping.kind in _FILLED_KINDS:
                fresh.append((addr, length))
            seg_end = addr + length
        if views and not self._device_writev(ino, seg_addr, views):
            self._start_writeback(fresh)

    def _start_writeback(self, ranges: list[tuple[int, int]]) -> None:
        if self.writeback is not None:
            for addr, length in ranges:
                self.writeback.wrote(addr, length)

    def _device_writev(self, ino: int, addr: int, views: list[memoryview]) -> bool:
        """Write `views` at `addr`; True when they went O_DIRECT (no writeback hint due)."""
        dev = self.dev
        if not dev.writable:
            raise ReadOnly("the device is opened read-only")
        total = sum(len(v) for v in views)
        try:
            dev.check_range(addr, total)
        except DeviceRangeError as err:
            raise Corrupt("data run", inode_where(ino), str(err)) from None
        if self.direct is not None and self.direct.write(addr, views):
            return True
        while views:
            done = os.pwritev(dev.fd, views, addr)
            if done <= 0:
                raise OSError(f"short write at device byte {addr}")
            views = _drop_prefix(views, done)
            addr += done
        return False


def _write_kind(*, new: bool, converted: bool) -> IOMapKind:
    if converted:
        return IOMapKind.UNWRITTEN
    return IOMapKind.NEW if new else IOMapKind.MAPPED


def _empty_and_blockless(inode: MappedInode) -> bool:
    return inode.size == 0 and getattr(inode, "blocks_512", None) == 0


def _drop_prefix(views: list[memoryview], count: int) -> list[memoryview]:
    """The buffers left after the first `count` bytes of `views` were filled."""
    result: list[memoryview] = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        result.append(view[count:])
        count = 0
    return result


def _inside_any(run: BlockRun, gaps: list[tuple[int, int]]) -> bool:
    return any(start <= run.lblk and run.end <= end for start, end in gaps)


def _check_tiling(ino: int, runs: list[BlockRun], start: int, end: int) -> None:
    """Refuse a mapping that does not exactly tile [start, end): reading it would be garbage."""
    cursor = start
    for run in runs:
        if run.lblk != cursor or run.length <= 0:
            raise Corrupt(
                "block mapping",
                inode_where(ino),
                f"runs do not tile blocks {start}..{end} at {cursor}",
            )
        cursor = run.end
    if cursor != end:
        raise Corrupt("block mapping", inode_where(ino), f"runs end at {cursor}, expected {end}")
