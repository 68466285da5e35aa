"""Run one fio job on one file and read its own figures from the JSON report.

fio's own figures are used, not our wall clock: starting fio costs ~0.3 s here,
more than a warm 256 MiB read takes. Reads are timed by the sum of the per-read
latencies (ns resolution; with psync that is the time spent in the read calls).
Writes are timed by fio's runtime, which with end_fsync=1 includes the final
fsync (fsync_on_close would not be counted), so their figures include getting
the data to the image.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common import errno_text

# Every job: one synchronous thread, the page cache state left to the harness
# (invalidate=0: we drop caches ourselves, and a warm re-read must stay warm),
# and no preallocation of written files (fallocate=none: we time the writes).
_COMMON = ("--ioengine=psync", "--iodepth=1", "--numjobs=1", "--invalidate=0",
           "--fallocate=none", "--output-format=json")


@dataclass(frozen=True, slots=True)
class FioFigure:
    rate: float | None  # MB/s (bs >= 64 KiB) or IOPS
    unit: str
    seconds: float | None
    error: str | None = None


def run_fio(path: Path, *, rw: str, bs: int, size: int, direct: bool = False,
            io_size: int | None = None, loops: int = 1, end_fsync: bool = False
            ) -> FioFigure:
    argv = ["fio", *_COMMON, "--name=bench", f"--filename={path}", f"--rw={rw}",
            f"--bs={bs}", f"--size={size}", f"--direct={int(direct)}", f"--loops={loops}",
            f"--end_fsync={int(end_fsync)}", "--randrepeat=1", "--runtime=300"]
    if io_size is not None:
        argv.append(f"--io_size={io_size}")
    if rw in ("read", "randread"):
        argv.append("--readonly")
    unit = "MB/s" if bs >= 65536 else "IOPS"
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    try:
        report = json.loads(proc.stdout[proc.stdout.index("{"):])
        job = report["jobs"][0]
    except (ValueError, KeyError, IndexError):
        return FioFigure(None, unit, None, f"fio failed (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    if job.get("error"):
        return FioFigure(None, unit, None, f"refused: {errno_text(job['error'])}")
    write = "write" in rw
    direction = job["write" if write else "read"]
    ios = direction["total_ios"]
    if write:  # the runtime holds the final fsync (end_fsync=1); ms resolution will do
        seconds = direction["runtime"] / 1000
    else:  # ns resolution: a warm 256 MiB read takes a few fio milliseconds
        seconds = direction["lat_ns"]["mean"] * ios / 1e9
    if seconds <= 0 or direction["io_bytes"] == 0:
        return FioFigure(None, unit, None, "fio measured nothing")
    rate = direction["io_bytes"] / seconds / 1e6 if unit == "MB/s" else ios / seconds
    return FioFigure(rate, unit, seconds)


def direct_io_refusal(path: Path, *, write: bool) -> str | None:
    """Why O_DIRECT I/O on `path` fails on this mount ("refused: EINVAL"), or None.

    A FUSE server can refuse O_DIRECT at open; the kernel can also accept the
    open and fail the first aligned transfer. Either shows in the table cell.
    """
    flags = os.O_DIRECT | (os.O_WRONLY | os.O_CREAT if write else os.O_RDONLY)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        return f"refused: {errno_text(err.errno)} (open O_DIRECT)"
    buffer = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    try:
        if write:
            os.pwritev(fd, [buffer], 0)
        else:
            os.preadv(fd, [buffer], 0)
    except OSError as err:
        return f"refused: {errno_text(err.errno)} (O_DIRECT {'write' if write else 'read'})"
    finally:
        os.close(fd)
        buffer.close()
        if write:
            path.unlink(missing_ok=True)
    return None
