"""Metadata workloads: create / stat / readdir / unlink phases, untar, find, ls -lR, find + cat.

The four phases run one after the other on one sparse copy of the write image,
each on a fresh mount after a cache drop, so each starts cold and no server
keeps what an earlier phase taught it; create and unlink end with syncfs, so
their time includes getting the change to the image. The loops are plain
Python: a system call costs a microsecond or two here, far below one FUSE
round trip, so they measure the filesystem, not the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from common import Context, Result, RunFn, Runner, drop_caches, mounted, syncfs
from images import SMALL_TREE, SOURCE_TAR, SOURCE_TREE, fresh_copy, fsck_warning, small_file_path

_CHURN = "churn"


def _files_per_second(key: str, system: str, count: int, seconds: float,
                      note: str | None = None) -> Result:
    return Result(key, system, count / seconds, "files/s", seconds, note=note)


def meta_phases(system: str, ctx: Context) -> list[Result]:
    count = ctx.sizes.meta_files
    mountpoint = ctx.mountpoint(system)
    # Absolute paths built up front: the timed loops do only the system calls.
    paths = [str(mountpoint / small_file_path(Path(_CHURN), i, count)) for i in range(count)]
    dirs = sorted({os.path.dirname(p) for p in paths})
    image = fresh_copy(ctx.write_image, ctx.work / f"meta-{system}.img")
    timings: dict[str, float] = {}
    try:
        with mounted(system, image, mountpoint, writable=True) as mnt:
            drop_caches()
            start = time.perf_counter()
            os.mkdir(mnt / _CHURN)
            for d in dirs:
                os.mkdir(d)
            for p in paths:
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            syncfs(mnt)
            timings["meta-create"] = time.perf_counter() - start
        with mounted(system, image, mountpoint, writable=True):
            drop_caches()
            start = time.perf_counter()
            for p in paths:
                os.lstat(p)
            timings["meta-stat"] = time.perf_counter() - start
        with mounted(system, image, mountpoint, writable=True):
            drop_caches()
            start = time.perf_counter()
            seen = sum(len(os.listdir(d)) for d in dirs)
            timings["meta-readdir"] = time.perf_counter() - start
            if seen != count:
                raise RuntimeError(f"readdir saw {seen} of {count} files")
        with mounted(system, image, mountpoint, writable=True) as mnt:
            drop_caches()
            start = time.perf_counter()
            for p in paths:
                os.unlink(p)
            syncfs(mnt)
            timings["meta-unlink"] = time.perf_counter() - start
        note = fsck_warning(image)
    finally:
        image.unlink(missing_ok=True)
    return [_files_per_second(key, system, count, s, note) for key, s in timings.items()]


def untar(system: str, ctx: Context) -> list[Result]:
    image = fresh_copy(ctx.write_image, ctx.work / f"untar-{system}.img")
    try:
        with mounted(system, image, ctx.mountpoint(system), writable=True) as mnt:
            drop_caches()
            start = time.perf_counter()
            subprocess.run(["tar", "-xf", str(ctx.work / SOURCE_TAR), "-C", str(mnt)],
                           check=True)
            syncfs(mnt)
            seconds = time.perf_counter() - start
        note = fsck_warning(image)
    finally:
        image.unlink(missing_ok=True)
    return [_files_per_second("untar", system, ctx.sizes.source_files, seconds, note)]


def _timed_command(key: str, count_of: Callable[[Context], int],
                   argv_of: Callable[[Path], list[str] | str]) -> RunFn:
    """A read-only workload that is one command (a string: a shell line) over the read image."""
    def run(system: str, ctx: Context) -> list[Result]:
        with mounted(system, ctx.read_image, ctx.mountpoint(system)) as mnt:
            argv = argv_of(mnt)
            drop_caches()
            start = time.perf_counter()
            subprocess.run(argv, shell=isinstance(argv, str), stdout=subprocess.DEVNULL,
                           check=True)
            seconds = time.perf_counter() - start
        return [_files_per_second(key, system, count_of(ctx), seconds)]
    return run


RUNNERS = (
    Runner("meta-phases", ("meta-create", "meta-stat", "meta-readdir", "meta-unlink"),
           "write", meta_phases),
    Runner("untar", ("untar",), "write", untar),
    Runner("find", ("find",), "read", _timed_command(
        "find", lambda ctx: ctx.sizes.source_files,
        lambda mnt: ["find", str(mnt / SOURCE_TREE)])),
    Runner("ls-lR", ("ls-lR",), "read", _timed_command(
        "ls-lR", lambda ctx: ctx.sizes.meta_files,
        lambda mnt: ["ls", "-lR", str(mnt / SMALL_TREE)])),
    Runner("find-cat", ("find-cat",), "read", _timed_command(
        "find-cat", lambda ctx: ctx.sizes.source_files,
        lambda mnt: f"find {mnt / SOURCE_TREE} -type f -exec cat {{}} + > /dev/null")),
)
