"""Memory workload: ext4box's peak RSS while a 1-million-file image is walked completely.

The image (20 GiB apparent, a few hundred MiB on disk) is built once and kept
under the cache dir (--cache-dir, default /var/tmp/ext4box-bench): mkfs.ext4,
then a kernel loop mount populates it fast (1000 directories of 1000 files,
almost all empty; every 100th holds a few hundred bytes so reads go through
the data path too). `noinit_itable` keeps the kernel from zeroing the unused
inode tables, which would fill the sparse file.

The walk: ext4box serves the image read-only; `find -printf %s` looks up and
stats every entry, then every file with data is read. The server's VmHWM
(/proc/PID/status, the peak resident set) is the figure; VmRSS is also sampled
during the walk to show its course. The kernel keeps every dentry it looked up
(this machine has RAM to spare), so the server must keep a lookup count for
each of the 1M inodes until the unmount: that table is part of what is measured.

    python bench/memory.py [--quick] [--cache-dir DIR]   # only this workload
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

from common import Context, Result, Runner, drop_caches, server_argv, syncfs
from support.kernel import kernel_mount
from support.serve import served

_PER_DIR = 1000
_DATA_EVERY = 100  # every 100th file holds data
_SAMPLE_S = 0.25
DEFAULT_CACHE_DIR = Path("/var/tmp/ext4box-bench")


def _file_rel(index: int) -> str:
    return f"d{index // _PER_DIR:04d}/f{index % _PER_DIR:04d}"


def _payload(index: int) -> bytes:
    return f"file {index}\n".encode() * (1 + index % 40)


def memory_image(cache_dir: Path, files: int, gib: int) -> Path:
    """The cached image, built first if missing (a done-marker guards half-built ones)."""
    home = cache_dir / f"memory-{files}f-{gib}g"
    image = home / "image.ext4"
    marker = home / "done.json"
    if marker.exists() and image.exists():
        return image
    home.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    print(f"  building the memory image ({files:,} files, {gib} GiB sparse) in {home}...",
          flush=True)
    start = time.perf_counter()
    image.unlink(missing_ok=True)
    # mkfs creates the sparse file itself; lazy_itable_init leaves the inode tables unwritten.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096",
                    "-N", str(files + files // 10 + 1000), "-E", "lazy_itable_init=1",
                    str(image), f"{gib}G"], check=True)
    mnt = home / "mnt"
    with kernel_mount(image, mnt, readonly=False, options="noinit_itable"):
        for d in range((files + _PER_DIR - 1) // _PER_DIR):
            os.mkdir(mnt / f"d{d:04d}")
        for i in range(files):
            path = f"{mnt}/{_file_rel(i)}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if i % _DATA_EVERY == 0:
                    os.write(fd, _payload(i))
            finally:
                os.close(fd)
        syncfs(mnt)
    mnt.rmdir()
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                           check=False)
    if check.returncode != 0:
        raise RuntimeError(f"memory image not clean after build:\n{check.stdout[-2000:]}")
    marker.write_text(json.dumps({
        "files": files, "gib": gib, "build_seconds": round(time.perf_counter() - start, 1),
        "disk_mib": image.stat().st_blocks * 512 >> 20,
    }) + "\n")
    return image


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """Samples VmRSS of one process in a thread; keeps the highest and a coarse course."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self.course: list[tuple[float, int]] = []  # (seconds, KiB), one per second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = time.perf_counter()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        next_course = 0.0
        while not self._stop.wait(_SAMPLE_S):
            kib = _status_kib(self.pid, "VmRSS")
            if kib is None:
                return
            self.peak_kib = max(self.peak_kib, kib)
            now = time.perf_counter() - self._start
            if now >= next_course:
                self.course.append((round(now, 1), kib))
                next_course = now + 1.0


def walk_and_measure(image: Path, mountpoint: Path, files: int) -> dict[str, object]:
    """Serve `image` with ext4box read-only, walk it, return the RSS figures."""
    argv = server_argv("ext4box", image, mountpoint, writable=False)
    with served(image, mountpoint, argv) as handle:
        pid = handle.process.pid
        start_kib = _status_kib(pid, "VmRSS")
        drop_caches()
        start = time.perf_counter()
        with RssSampler(pid) as sampler:
            listing = subprocess.run(["find", str(mountpoint), "-printf", "%s\n"],
                                     capture_output=True, check=True).stdout
            entries = listing.count(b"\n")
            stat_seconds = time.perf_counter() - start
            read_bytes = 0
            for i in range(0, files, _DATA_EVERY):
                with open(f"{mountpoint}/{_file_rel(i)}", "rb") as f:
                    read_bytes += len(f.read())
        seconds = time.perf_counter() - start
        hwm_kib = _status_kib(pid, "VmHWM")
        end_kib = _status_kib(pid, "VmRSS")
    if entries < files:
        raise RuntimeError(f"the walk saw {entries} entries, expected at least {files}")
    return {
        "peak_mib": (hwm_kib or 0) / 1024,
        "sampled_peak_mib": sampler.peak_kib / 1024,
        "start_mib": (start_kib or 0) / 1024,
        "end_mib": (end_kib or 0) / 1024,
        "entries": entries,
        "files_read": (files + _DATA_EVERY - 1) // _DATA_EVERY,
        "bytes_read": read_bytes,
        "walk_seconds": round(seconds, 1),
        "stat_walk_seconds": round(stat_seconds, 1),
        "course": sampler.course,
    }


def memory_rss(system: str, ctx: Context) -> list[Result]:
    sizes = ctx.sizes
    cache_dir = ctx.cache_dir or DEFAULT_CACHE_DIR
    image = memory_image(cache_dir, sizes.memory_files, sizes.memory_image_gib)
    figures = walk_and_measure(image, ctx.mountpoint(system), sizes.memory_files)
    marker = json.loads((image.parent / "done.json").read_text())
    figures.update(image_gib=sizes.memory_image_gib, image_disk_mib=marker["disk_mib"],
                   image_files=sizes.memory_files)
    return [Result("memory-rss", system, float(figures["peak_mib"]), "MiB",
                   float(figures["walk_seconds"]), details=figures)]


RUNNERS = (Runner("memory", ("memory-rss",), "", memory_rss, systems=("ext4box",)),)


def main() -> int:
    import argparse
    import tempfile

    from common import FULL, QUICK

    parser = argparse.ArgumentParser(description="ext4box peak RSS over a 1M-file image")
    parser.add_argument("--quick", action="store_true", help="a 20,000-file image instead")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="ext4box-mem-") as tmp:
        ctx = Context(Path(tmp), sizes, cache_dir=args.cache_dir)
        (result,) = memory_rss("ext4box", ctx)
    details = dict(result.details or {})
    details.pop("course", None)
    print(json.dumps(details, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
