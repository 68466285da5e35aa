"""Which block runs tile a range: the cached ones, the rest from the filesystem?

The mapping cache (cache.py) only stores runs; this is the policy that fills
it. Runs it does not hold are asked of the source's `map_blocks`, mapping
ahead of the last gap (bounded by EOF and by the next cached run) so a
sequential reader walks the mapping tree once per window, not once per
request. Whatever the source answers must tile the asked range exactly, or
it is Corrupt: reading along a broken mapping would return garbage.
"""

from __future__ import annotations

from ext4box.ext4.format.blockrun import BlockRun
from ext4box.ext4.format.errors import Corrupt, inode_where
from ext4box.iomap.cache import MappingCache
from ext4box.iomap.source import MappedInode, MappingSource


def lookup_runs(
    source: MappingSource,
    cache: MappingCache,
    inode: MappedInode,
    first: int,
    end: int,
    *,
    block_size: int,
    map_ahead_blocks: int,
) -> list[BlockRun]:
    """Runs tiling blocks [first, end) of `inode`, from the cache where possible."""
    with cache.lock:
        entry = cache.runs_for(inode.ino)
        found, gaps = entry.covering(first, end)
    if not gaps:
        return found
    # Fill the gaps, mapping ahead of the last one (bounded by EOF) so
    # the next sequential request hits the cache.
    eof_block = -(-inode.size // block_size)
    fetched: list[BlockRun] = []
    for index, (gap_start, gap_end) in enumerate(gaps):
        if index == len(gaps) - 1:
            ahead = max(gap_end, min(gap_start + map_ahead_blocks, eof_block))
            gap_end = _next_cached_start(cache, inode.ino, gap_end, ahead)
        runs = source.map_blocks(inode, gap_start, gap_end - gap_start)
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
        runs = source.map_blocks(inode, first, end - first)
        _check_tiling(inode.ino, runs, first, end)
        return runs
    return found


def _next_cached_start(cache: MappingCache, ino: int, gap_end: int, ahead: int) -> int:
    """Extend a gap up to `ahead` but stop at the next run already cached."""
    if ahead <= gap_end:
        return gap_end
    with cache.lock:
        _, gaps = cache.runs_for(ino).covering(gap_end, ahead)
    if gaps and gaps[0][0] == gap_end:
        return gaps[0][1]
    return gap_end


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
