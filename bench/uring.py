"""FUSE over io_uring against the plain /dev/fuse loop: per-request cost and wall rate.

    python bench/uring.py [--files N] [--reads N] [--rounds N]

Needs root. One image (a tree of small files and a 64 MiB file); each round
serves it once with `transport=dev` and once with `transport=uring`, in
alternating order, and runs four phases, each on a fresh mount (the kernel
knows no name yet, the server has parsed nothing) with the image file's
pages warm, so that the figures measure the transport, not the disk: stat
(lstat of every file: a LOOKUP each), readdir (listdir of every directory),
create (create + close in a new directory, syncfs), and 4 KiB random
O_DIRECT reads (a READ each). Printed per phase and transport: wall
rate, wall time per operation and the server's CPU time per operation
(from /proc/PID/stat), median over the rounds.

enable_uring is switched on only around the uring mounts and put back as it
was; it affects only servers that ask for FUSE over io_uring.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MIB, served, syncfs
from support.serve import ext4box_argv

ENABLE = Path("/sys/module/fuse/parameters/enable_uring")
TRANSPORTS = ("dev", "uring")
DIRS = 50
BIG = "big.bin"
BIG_MIB = 64
_TICK = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def uring_enabled(on: bool) -> Iterator[None]:
    """enable_uring on for the block (transport=dev never asks: left alone for it)."""
    if not on:
        yield
        return
    previous = ENABLE.read_text().strip()
    ENABLE.write_text("Y")
    try:
        yield
    finally:
        ENABLE.write_text(previous)


def server_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def build_image(work: Path, files: int) -> tuple[Path, list[str]]:
    tree = work / "tree"
    names = []
    for i in range(files):
        name = f"d{i % DIRS:02d}/f{i:05d}"
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"x" * (i % 200))
        names.append(name)
    rng = random.Random(3)
    with (tree / BIG).open("wb") as f:
        for _ in range(BIG_MIB):
            f.write(rng.randbytes(MIB))
    image = work / "image.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(image),
                    f"{BIG_MIB + 64 + files // 100}M"], check=True)  # fmt: skip
    return image, names


def phase_stat(mnt: Path, names: list[str], _reads: int) -> int:
    for name in names:
        os.lstat(mnt / name)
    return len(names)


def phase_readdir(mnt: Path, _names: list[str], _reads: int) -> int:
    return sum(len(os.listdir(mnt / f"d{d:02d}")) for d in range(DIRS))


def phase_create(mnt: Path, names: list[str], _reads: int) -> int:
    target = mnt / f"new-{time.monotonic_ns()}"
    os.mkdir(target)
    for i in range(len(names)):
        os.close(os.open(target / f"n{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    syncfs(mnt)
    return len(names)


def phase_random_read(mnt: Path, _names: list[str], reads: int) -> int:
    rng = random.Random(7)
    fd = os.open(mnt / BIG, os.O_RDONLY | os.O_DIRECT)
    aligned = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
    try:
        for _ in range(reads):
            os.preadv(fd, [aligned], rng.randrange(BIG_MIB * 256) * 4096)
    finally:
        aligned.close()
        os.close(fd)
    return reads


PHASES: dict[str, Callable[[Path, list[str], int], int]] = {
    "stat": phase_stat, "readdir": phase_readdir, "create": phase_create,
    "rand-read-4k": phase_random_read,
}  # fmt: skip


def _warm(image: Path) -> None:
    with image.open("rb") as f:
        while f.read(MIB):
            pass


def run_phase(image: Path, mnt: Path, transport: str, phase: str, names: list[str],
              reads: int) -> tuple[float, float, int]:  # fmt: skip
    """(wall seconds, server CPU seconds, operations) of one phase on a fresh mount."""
    argv = ext4box_argv(image, mnt, f"rw,transport={transport}")
    with uring_enabled(transport == "uring"), served(image, mnt, argv) as handle:
        log = handle.stderr_text()
        if f'"transport": "{transport}"' not in log:
            raise RuntimeError(f"the server did not use transport={transport}:\n{log}")
        _warm(image)
        cpu_before = server_cpu(handle.process.pid)
        start = time.perf_counter()
        count = PHASES[phase](mnt, names, reads)
        wall = time.perf_counter() - start
        cpu = server_cpu(handle.process.pid) - cpu_before
    return wall, cpu, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phases", default=",".join(PHASES))
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not ENABLE.exists():
        print("needs root and a kernel with FUSE over io_uring", file=sys.stderr)
        return 1
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    figures: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="ext4box-uring-bench-") as tmp:
        work = Path(tmp)
        image, names = build_image(work, args.files)
        mnt = work / "mnt"
        for round_no in range(args.rounds):
            order = TRANSPORTS if round_no % 2 == 0 else TRANSPORTS[::-1]
            for phase in phases:
                for transport in order:
                    result = run_phase(image, mnt, transport, phase, names, args.reads)
                    figures.setdefault((phase, transport), []).append(result)
        check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
        fsck = "clean" if check.returncode == 0 else f"e2fsck -fn exit {check.returncode}"
    print(f"{'phase':<14}{'transport':<10}{'ops/s':>10}{'wall µs/op':>12}{'server CPU µs/op':>18}")
    for phase in phases:
        for transport in TRANSPORTS:
            runs = figures[(phase, transport)]
            rate = statistics.median(count / wall for wall, _, count in runs)
            wall_us = statistics.median(wall / count * 1e6 for wall, _, count in runs)
            cpu_us = statistics.median(cpu / count * 1e6 for _, cpu, count in runs)
            print(f"{phase:<14}{transport:<10}{rate:>10,.0f}{wall_us:>12.1f}{cpu_us:>18.1f}")
    print(f"image after the create phases: {fsck}; {args.rounds} rounds, median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
