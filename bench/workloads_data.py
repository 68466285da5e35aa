"""Data workloads: streaming 1 MiB and random 4 KiB, buffered and direct (fio), and
small appends (a Python loop of 4-byte write(2)s, as fstests generic/069 does).

Reads run on the shared read image mounted read-only, after a cache drop (the
warm re-read follows the cold read on the same mount without one). Every write
workload runs on its own sparse copy of the write image mounted read-write;
its figure includes the final fsync, and the copy is checked with e2fsck -fn
after the unmount.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from common import MIB, Context, Result, RunFn, Runner, drop_caches, mounted
from fio import FioFigure, direct_io_refusal, run_fio
from images import RANDOM_WRITE_FILE, SEQ_FILE, fresh_copy, fsck_warning


def _result(key: str, system: str, figure: FioFigure, note: str | None = None) -> Result:
    return Result(key, system, figure.rate, figure.unit, figure.seconds, figure.error, note)


def _refused(key: str, system: str, unit: str, why: str) -> Result:
    return Result(key, system, None, unit, error=why)


def seq_read(system: str, ctx: Context) -> list[Result]:
    """Cold streaming read, then the same read again with the page cache warm."""
    size = ctx.sizes.seq_mb * MIB
    with mounted(system, ctx.read_image, ctx.mountpoint(system)) as mnt:
        drop_caches()
        cold = run_fio(mnt / SEQ_FILE, rw="read", bs=MIB, size=size)
        warm = run_fio(mnt / SEQ_FILE, rw="read", bs=MIB, size=size)
    return [_result("seq-read-cold", system, cold), _result("seq-read-warm", system, warm)]


def _read_job(key: str, *, rw: str, bs: int, direct: bool) -> RunFn:
    def run(system: str, ctx: Context) -> list[Result]:
        size = ctx.sizes.seq_mb * MIB
        io_size = ctx.sizes.random_ios * bs if rw == "randread" else None
        unit = "MB/s" if bs == MIB else "IOPS"
        with mounted(system, ctx.read_image, ctx.mountpoint(system)) as mnt:
            if direct and (why := direct_io_refusal(mnt / SEQ_FILE, write=False)):
                return [_refused(key, system, unit, why)]
            drop_caches()
            figure = run_fio(mnt / SEQ_FILE, rw=rw, bs=bs, size=size, direct=direct,
                             io_size=io_size)
        return [_result(key, system, figure)]
    return run


def _write_job(key: str, *, rw: str, bs: int, direct: bool) -> RunFn:
    def run(system: str, ctx: Context) -> list[Result]:
        unit = "MB/s" if bs == MIB else "IOPS"
        image = fresh_copy(ctx.write_image, ctx.work / f"write-{system}.img")
        try:
            with mounted(system, image, ctx.mountpoint(system), writable=True) as mnt:
                if rw == "randwrite":  # overwrite the preallocated file
                    target: Path = mnt / RANDOM_WRITE_FILE
                    size = ctx.sizes.random_write_mb * MIB
                    io_size: int | None = ctx.sizes.random_ios * bs
                else:  # a new file
                    target = mnt / "seq-write.bin"
                    size = ctx.sizes.seq_mb * MIB
                    io_size = None
                if direct and (why := direct_io_refusal(mnt / "probe-direct", write=True)):
                    return [_refused(key, system, unit, why)]
                drop_caches()
                figure = run_fio(target, rw=rw, bs=bs, size=size, direct=direct,
                                 io_size=io_size, end_fsync=True)
            note = fsck_warning(image)
        finally:
            image.unlink(missing_ok=True)
        return [_result(key, system, figure, note)]
    return run


APPEND_RECORD = b"abc\n"
# ext4box's second append row: the same loop with the kernel's writeback cache.
WRITEBACK_OPTIONS = ("writeback_cache",)


def _append_loop(path: Path, count: int) -> float:
    """Seconds for `count` 4-byte O_APPEND write(2)s to a new file, then fsync and close."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for _ in range(count):
            os.write(fd, APPEND_RECORD)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def _append_once(key: str, system: str, ctx: Context, options: tuple[str, ...]) -> Result:
    count = ctx.sizes.append_writes
    image = fresh_copy(ctx.write_image, ctx.work / f"append-{system}.img")
    try:
        with mounted(system, image, ctx.mountpoint(system), writable=True,
                     ext4box_options=options) as mnt:
            drop_caches()
            seconds = _append_loop(mnt / "appended.log", count)
            size = os.stat(mnt / "appended.log").st_size
        note = fsck_warning(image)
    finally:
        image.unlink(missing_ok=True)
    if size != count * len(APPEND_RECORD):
        return Result(key, system, None, "writes/s", seconds,
                      error=f"size {size}, expected {count * len(APPEND_RECORD)}")
    return Result(key, system, count / seconds, "writes/s", seconds, note=note)


def small_appends(system: str, ctx: Context) -> list[Result]:
    """4-byte O_APPEND writes + fsync: ext4box as mounted by default and with
    -o writeback_cache; the other systems once, their figure in both rows (ext4box
    on pyfuse3 refuses the option: the native transport alone asks for it)."""
    first = _append_once("append-small", system, ctx, ())
    if system == "pyfuse3":
        return [first, Result("append-small-wbc", system, None, first.unit,
                              error="refused: writeback_cache needs backend=native")]
    if system != "ext4box":
        return [first, Result("append-small-wbc", system, first.rate, first.unit,
                              first.seconds, first.error, first.note)]
    return [first, _append_once("append-small-wbc", system, ctx, WRITEBACK_OPTIONS)]


RUNNERS = (
    Runner("seq-read", ("seq-read-cold", "seq-read-warm"), "read", seq_read),
    Runner("seq-read-direct", ("seq-read-direct",), "read",
           _read_job("seq-read-direct", rw="read", bs=MIB, direct=True)),
    Runner("rand-read-cold", ("rand-read-cold",), "read",
           _read_job("rand-read-cold", rw="randread", bs=4096, direct=False)),
    Runner("rand-read-direct", ("rand-read-direct",), "read",
           _read_job("rand-read-direct", rw="randread", bs=4096, direct=True)),
    Runner("seq-write", ("seq-write",), "write",
           _write_job("seq-write", rw="write", bs=MIB, direct=False)),
    Runner("seq-write-direct", ("seq-write-direct",), "write",
           _write_job("seq-write-direct", rw="write", bs=MIB, direct=True)),
    Runner("rand-write", ("rand-write",), "write",
           _write_job("rand-write", rw="randwrite", bs=4096, direct=False)),
    Runner("append", ("append-small", "append-small-wbc"), "write", small_appends),
)
