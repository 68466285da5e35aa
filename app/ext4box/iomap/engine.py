"""How does a file range become device I/O? The iomap engine, the one entry point.

The filesystem below only answers "which blocks hold this range" through
`map_blocks` (the block-run contract of ext4/format/blockrun.py), "what is
the inline body" and, writable, "allocate these blocks" (the Protocols in
source.py). The engine turns that into byte-granular mappings (`begin`, for
reads and writes) and drives each request: a read is clipped at EOF and
planned, a write allocates, writes its data, then `write_end` (or
`write_abort`). The steps live beside it: run_lookup.py (runs from the
mapping cache or the source), read_plan.py (which device reads produce a
read's bytes), write_data.py (how a write's bytes reach the device),
device_io.py (checked transfers). fallocate, SEEK_DATA/SEEK_HOLE and
copy_file_range enter here too. None of it knows extents, block maps or
inodes' on-disk layout.
"""

from __future__ import annotations

import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.blockrun import BlockRun
from ext4box.ext4.format.errors import Corrupt, ReadOnly, inode_where
from ext4box.iomap import copy_range, seek
from ext4box.iomap.cache import MappingCache
from ext4box.iomap.device_io import writev_at
from ext4box.iomap.direct_io import DirectIO
from ext4box.iomap.read_plan import ReadPlan, execute_plan, execute_plan_into, plan_segments
from ext4box.iomap.run_lookup import lookup_runs
from ext4box.iomap.source import MappedInode, MappingSource, WritableSource
from ext4box.iomap.types import IOMap, IOMapKind
from ext4box.iomap.write_data import write_mapped_data
from ext4box.iomap.writeback import EarlyWriteback

log = structlog.get_logger("ext4box.iomap")

# Beyond a cache miss, map this many bytes ahead so a sequential reader walks
# the mapping tree once per window rather than once per request.
MAP_AHEAD_BYTES = 16 * 1024 * 1024


class IOMapEngine:
    """Mapping, reads and writes of one filesystem's files on one device."""

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
        """Runs tiling blocks [first, end), from the cache where possible (run_lookup.py)."""
        return lookup_runs(
            self.source, self.cache, inode, first, end,
            block_size=self.block_size, map_ahead_blocks=self.map_ahead_blocks,
        )

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
        return ReadPlan(inode.ino, length, plan_segments(pos, maps))

    def execute(self, plan: ReadPlan) -> bytes:
        """Produce the bytes of a plan: device reads only, no metadata access."""
        return execute_plan(self.dev, plan)

    def execute_into(self, plan: ReadPlan, buffer: memoryview) -> memoryview:
        """Produce a plan's bytes in `buffer` (page-aligned, reused); the filled view.

        For a one-thread transport that owns `buffer` and sends the view before
        it reads the next request; aligned runs go O_DIRECT when `direct` takes
        them (read_plan.execute_plan_into).
        """
        return execute_plan_into(self.dev, self.direct, plan, buffer)

    def read(self, inode: MappedInode, pos: int, size: int) -> bytes:
        """Read up to `size` bytes at `pos` (short only at EOF)."""
        return self.execute(self.plan_read(inode, pos, size))

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
            write_mapped_data(
                self.dev, ino, pos, memoryview(data), maps,
                block_size=self.block_size, direct=self.direct, writeback=self.writeback,
            )
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
                writev_at(
                    self.dev, self.direct, inode.ino, mapping.addr,
                    [memoryview(bytes(mapping.length))],
                )


def _write_kind(*, new: bool, converted: bool) -> IOMapKind:
    if converted:
        return IOMapKind.UNWRITTEN
    return IOMapKind.NEW if new else IOMapKind.MAPPED


def _empty_and_blockless(inode: MappedInode) -> bool:
    return inode.size == 0 and getattr(inode, "blocks_512", None) == 0
