"""ext4box vs the kernel vs fuse2fs on one freshly built image.

    python bench/run.py [--size-mb N] [--quick] [--repeat N] [--workloads read,write]

Needs root (loop mounts, drop_caches). Every measurement starts from a fresh
mount with dropped caches, so no system profits from an earlier run. Read
workloads share one read-only image; every write workload runs on a fresh copy
of one read-write image (rw loop mount, `ext4box serve -o rw`, fuse2fs rw), and
ends by flushing (fsync/syncfs, never sync(2)) so its time includes getting the
data to the image. Prints a table (absolute figures and time ratios against
the kernel) and writes the results as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.kernel import kernel_mount  # noqa: E402
from support.serve import ext4box_argv, fuse2fs_argv, served  # noqa: E402

SYSTEMS = ("kernel", "ext4box", "fuse2fs")
SEQ_FILE = "seq.bin"
STAT_TREE = "stat-tree"
SOURCE_TREE = "src-tree"
RANDOM_WRITE_FILE = "random-write.bin"  # preallocated in the write image
SOURCE_TAR = "src-tree.tar"  # next to the images, outside every mount
_MIB = 1 << 20
_RANDOM_READ = 4096


@dataclass(frozen=True, slots=True)
class Sizes:
    seq_mb: int
    stat_files: int
    source_files: int
    random_reads: int
    random_write_mb: int
    random_writes: int


@dataclass(frozen=True, slots=True)
class Measurement:
    system: str
    benchmark: str
    seconds: float
    rate: float  # MB/s, reads/s or files/s, per benchmark
    unit: str


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush the one filesystem holding `path` (never sync(2): see drop_caches)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def drop_caches(*dirty_paths: Path) -> None:
    # syncfs of the filesystems we wrote, not sync(2): a global sync would also
    # wait on every other (possibly stuck) filesystem of the machine.
    for path in dirty_paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            _libc.syncfs(fd)
        finally:
            os.close(fd)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def build_tree(root: Path, sizes: Sizes) -> None:
    rng = random.Random(4)
    root.mkdir()
    with (root / SEQ_FILE).open("wb") as f:
        for _ in range(sizes.seq_mb):
            f.write(rng.randbytes(_MIB))
    # 20,000 small files in 100 directories: the stat/ls -lR workload.
    per_dir = max(1, sizes.stat_files // 100)
    for i in range(sizes.stat_files):
        d = root / STAT_TREE / f"d{i // per_dir:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file-{i:05d}").write_bytes(b"x" * (i % 97))
    build_source_tree(root / SOURCE_TREE, sizes, rng)


def build_source_tree(root: Path, sizes: Sizes, rng: random.Random) -> None:
    """A source-like tree: nested packages of text files, mostly 1-30 KiB."""
    words = [b"def", b"return", b"self", b"import", b"value", b"class", b"if", b"for", b"in"]
    for i in range(sizes.source_files):
        d = root / f"pkg{i % 7}" / f"mod{i % 23}" / f"sub{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        size = int(min(200_000, rng.lognormvariate(8.5, 1.0)))
        line = b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
        (d / f"file{i:05d}.py").write_bytes((line * (size // len(line) + 1))[:size])


def build_image(tree: Path, image: Path) -> None:
    used = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    size_mb = int(used * 1.5 / _MIB) + 128
    subprocess.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-N", "60000",
                    "-d", str(tree), str(image), f"{size_mb}M"], check=True)


def build_write_image(work: Path, sizes: Sizes) -> Path:
    """The image every write workload starts from (each on its own copy): empty but
    for a preallocated file the random writes overwrite; plus the tar to unpack."""
    rng = random.Random(5)
    tree = work / "write-tree"
    tree.mkdir()
    with (tree / RANDOM_WRITE_FILE).open("wb") as f:
        for _ in range(sizes.random_write_mb):
            f.write(rng.randbytes(_MIB))
    source = work / "tar-tree"
    build_source_tree(source / SOURCE_TREE, sizes, rng)
    subprocess.run(["tar", "-cf", str(work / SOURCE_TAR), "-C", str(source), SOURCE_TREE],
                   check=True)
    shutil.rmtree(source)
    tar_mb = (work / SOURCE_TAR).stat().st_size // _MIB
    size_mb = int((sizes.seq_mb + sizes.random_write_mb + tar_mb) * 1.5) + 192
    image = work / "write.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-N", "60000",
                    "-d", str(tree), str(image), f"{size_mb}M"], check=True)
    shutil.rmtree(tree)
    return image


@contextlib.contextmanager
def mounted(system: str, image: Path, mountpoint: Path, *, writable: bool = False
            ) -> Iterator[Path]:
    if system == "kernel":
        with kernel_mount(image, mountpoint, readonly=not writable) as mnt:
            yield mnt
        return
    if system == "ext4box":
        argv = ext4box_argv(image, mountpoint, "rw" if writable else "ro")
    else:
        argv = fuse2fs_argv(image, mountpoint)
        if writable:
            argv[argv.index("ro,fakeroot")] = "rw,fakeroot"
    with served(image, mountpoint, argv) as handle:
        yield handle.mountpoint


def sequential_read(mnt: Path, sizes: Sizes) -> tuple[float, str]:
    buffer = bytearray(_MIB)
    total = 0
    fd = os.open(mnt / SEQ_FILE, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buffer]):
            total += n
    finally:
        os.close(fd)
    assert total == sizes.seq_mb * _MIB, f"read {total} bytes"
    return total / _MIB, "MB/s"


def random_read(mnt: Path, sizes: Sizes) -> tuple[float, str]:
    rng = random.Random(7)
    blocks = sizes.seq_mb * _MIB // _RANDOM_READ
    fd = os.open(mnt / SEQ_FILE, os.O_RDONLY)
    try:
        for _ in range(sizes.random_reads):
            offset = rng.randrange(blocks) * _RANDOM_READ
            if len(os.pread(fd, _RANDOM_READ, offset)) != _RANDOM_READ:
                raise RuntimeError(f"short read at {offset}")
    finally:
        os.close(fd)
    return sizes.random_reads, "reads/s"


def ls_lr(mnt: Path, sizes: Sizes) -> tuple[float, str]:
    subprocess.run(["ls", "-lR", str(mnt / STAT_TREE)], stdout=subprocess.DEVNULL, check=True)
    return sizes.stat_files, "files/s"


def find_cat(mnt: Path, sizes: Sizes) -> tuple[float, str]:
    subprocess.run(f"find {mnt / SOURCE_TREE} -type f -exec cat {{}} + > /dev/null",
                   shell=True, check=True)
    return sizes.source_files, "files/s"


def sequential_write(mnt: Path, sizes: Sizes) -> tuple[float, str]:
    block = random.Random(8).randbytes(_MIB)
    fd = os.open(mnt / "seq-write.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for _ in range(sizes.seq_mb):
            if os.write(fd, block) != _MIB:
                raise RuntimeError("short write")
        os.fsync(fd)
    finally:
        os.close(fd)
    return sizes.seq_mb, "MB/s"


def random_write(mnt: Path, sizes: Sizes) -> tuple[float, str]:
    rng = random.Random(9)
    block = rng.randbytes(_RANDOM_READ)
    blocks = sizes.random_write_mb * _MIB // _RANDOM_READ
    fd = os.open(mnt / RANDOM_WRITE_FILE, os.O_WRONLY)
    try:
        for _ in range(sizes.random_writes):
            offset = rng.randrange(blocks) * _RANDOM_READ
            if os.pwrite(fd, block, offset) != _RANDOM_READ:
                raise RuntimeError(f"short write at {offset}")
        os.fsync(fd)
    finally:
        os.close(fd)
    return sizes.random_writes, "writes/s"


def create_unlink(mnt: Path, sizes: Sizes) -> tuple[float, str]:
    """Create small files in 100 directories, flush, unlink them all, flush."""
    root = mnt / "churn"
    root.mkdir()
    per_dir = max(1, sizes.stat_files // 100)
    paths = [root / f"d{i // per_dir:03d}" / f"file-{i:05d}" for i in range(sizes.stat_files)]
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"x" * (len(path.name) * 7))
        finally:
            os.close(fd)
    syncfs(mnt)
    for path in paths:
        os.unlink(path)
    syncfs(mnt)
    return sizes.stat_files, "files/s"


def untar(mnt: Path, sizes: Sizes) -> tuple[float, str]:
    tar = mnt.parent / SOURCE_TAR
    subprocess.run(["tar", "-xf", str(tar), "-C", str(mnt)], check=True)
    syncfs(mnt)
    return sizes.source_files, "files/s"


BENCHMARKS: dict[str, Callable[[Path, Sizes], tuple[float, str]]] = {
    "seq read 1MiB (cold)": sequential_read,
    "random read 4KiB (cold)": random_read,
    "ls -lR 20k-file tree": ls_lr,
    "find + cat source tree": find_cat,
}
# Each runs on its own fresh copy of the write image, mounted read-write.
WRITE_BENCHMARKS: dict[str, Callable[[Path, Sizes], tuple[float, str]]] = {
    "seq write 1MiB + fsync": sequential_write,
    "random write 4KiB + fsync": random_write,
    "create+unlink small files": create_unlink,
    "untar source tree": untar,
}


def measure(system: str, name: str, image: Path, work: Path, sizes: Sizes) -> Measurement:
    mountpoint = work / f"mnt-{system}"
    with mounted(system, image, mountpoint) as mnt:
        drop_caches(image.parent)
        start = time.perf_counter()
        amount, unit = BENCHMARKS[name](mnt, sizes)
        seconds = time.perf_counter() - start
    return Measurement(system, name, seconds, amount / seconds, unit)


def measure_write(system: str, name: str, base_image: Path, work: Path,
                  sizes: Sizes) -> Measurement:
    """One write workload on a fresh copy of the write image; the unmount (and with it
    anything a server still holds) is outside the timed part, the workload's own
    fsync/syncfs inside it."""
    image = work / f"write-{system}.img"
    subprocess.run(["cp", "--sparse=always", str(base_image), str(image)], check=True)
    try:
        mountpoint = work / f"mnt-{system}"
        with mounted(system, image, mountpoint, writable=True) as mnt:
            drop_caches(image.parent)
            start = time.perf_counter()
            amount, unit = WRITE_BENCHMARKS[name](mnt, sizes)
            seconds = time.perf_counter() - start
        check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                               check=False)
        if check.returncode != 0:
            print(f"  WARNING: e2fsck -fn after {name} on {system}: exit {check.returncode}\n"
                  f"{check.stdout[-2000:]}", file=sys.stderr, flush=True)
    finally:
        image.unlink(missing_ok=True)
    return Measurement(system, name, seconds, amount / seconds, unit)


def print_table(results: list[Measurement]) -> None:
    by_key = {(m.system, m.benchmark): m for m in results}
    width = 30
    header = f"{'benchmark':<25}" + "".join(f"{s:>{width}}" for s in SYSTEMS)
    print(header)
    print("-" * len(header))
    for name in (*BENCHMARKS, *WRITE_BENCHMARKS):
        if not any(m.benchmark == name for m in results):
            continue
        kernel = by_key.get(("kernel", name))
        cells = []
        for system in SYSTEMS:
            m = by_key.get((system, name))
            if m is None:
                cells.append(f"{'n/a':>{width}}")
                continue
            ratio = f"x{m.seconds / kernel.seconds:.1f}" if kernel else "-"
            cell = f"{m.seconds:.3f}s {m.rate:.0f} {m.unit} {ratio:>6}"
            cells.append(f"{cell:>{width}}")
        print(f"{name:<25}" + "".join(cells))
    print("(wall time, rate, and time relative to the kernel: x2.0 = takes twice as long)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="sequential-read file size")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (64 MiB, 2,000-file tree) for a fast smoke run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the best is kept")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--workloads", default="read,write",
                        help="comma-separated subset of read,write")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (loop mounts, drop_caches)", file=sys.stderr)
        return 1
    if args.quick:
        sizes = Sizes(min(args.size_mb, 64), 2_000, 500, 500, 16, 500)
    else:
        sizes = Sizes(args.size_mb, 20_000, 3_000, 2_000, 64, 2_000)
    systems = [s for s in args.systems.split(",") if s]
    for system in systems:
        if system not in SYSTEMS:
            parser.error(f"unknown system {system}")
    if "fuse2fs" in systems and shutil.which("fuse2fs") is None:
        print("bench: fuse2fs not installed, skipping it", file=sys.stderr)
        systems.remove("fuse2fs")

    workloads = {w for w in args.workloads.split(",") if w}
    if not workloads <= {"read", "write"}:
        parser.error(f"unknown workloads {sorted(workloads - {'read', 'write'})}")

    with tempfile.TemporaryDirectory(prefix="ext4box-bench-") as tmp:
        work = Path(tmp)
        results: list[Measurement] = []
        if "read" in workloads:
            print(f"building image ({sizes.seq_mb} MiB file, {sizes.stat_files} small files, "
                  f"{sizes.source_files} source files)...", flush=True)
            build_tree(work / "tree", sizes)
            image = work / "bench.img"
            build_image(work / "tree", image)
            shutil.rmtree(work / "tree")
            for name in BENCHMARKS:
                for system in systems:
                    runs = [measure(system, name, image, work, sizes)
                            for _ in range(args.repeat)]
                    best = min(runs, key=lambda m: m.seconds)
                    print(f"  {name:<26} {system:<8} {best.seconds:8.3f}s", flush=True)
                    results.append(best)
            image.unlink()
        if "write" in workloads:
            print(f"building write image ({sizes.random_write_mb} MiB file to overwrite, "
                  f"tar of {sizes.source_files} source files)...", flush=True)
            write_image = build_write_image(work, sizes)
            for name in WRITE_BENCHMARKS:
                for system in systems:
                    runs = [measure_write(system, name, write_image, work, sizes)
                            for _ in range(args.repeat)]
                    best = min(runs, key=lambda m: m.seconds)
                    print(f"  {name:<26} {system:<8} {best.seconds:8.3f}s", flush=True)
                    results.append(best)

    print()
    print_table(results)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / time.strftime("bench-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps({
        "sizes": asdict(sizes),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "results": [asdict(m) for m in results],
    }, indent=2) + "\n")
    print(f"results: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
