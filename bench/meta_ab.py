"""Did a change make the metadata phases faster? Interleaved A/B runs of two app/ trees.

    sudo unshare -m --propagation private .venv/bin/python bench/meta_ab.py \\
        --variant A=/tmp/base/app --variant B=app [--rounds 3] [--files 20000]

Each variant is an `app/` directory (e.g. `git archive main app | tar -x -C
/tmp/base`); its server runs as `python -m ext4box serve` with that tree
first on PYTHONPATH. Per round and variant, on a fresh sparse copy of one
empty image: create FILES empty files in 100 directories (+ syncfs), then,
each on a fresh mount after a cache drop, lstat every file, list every
directory, unlink every file (+ syncfs) — the phases of `bench/run.py
--workloads meta-phases`, timed the same way. Variants alternate their order
every round, and the figures are medians, because this machine is shared:
wall rates swing by 2x between minutes. The server's own CPU time per file
(from /proc/PID/schedstat, nanoseconds) is the steadier figure; it is what
a change to the server can move. The image is e2fsck -fn checked after each
round.

`--wrap "ARGS"` puts interpreter arguments before `-m ext4box` (e.g. a
profiler script; `{tag}` and `{phase}` are replaced) for the phases named
by `--wrap-phases`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import drop_caches, syncfs

PHASES = ("create", "stat", "readdir", "unlink")
_DIRS = 100
_MOUNT_TIMEOUT_S = 30.0


def server_cpu_s(pid: int) -> float:
    """On-CPU time of `pid` so far, in seconds (schedstat: far finer than clock ticks)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    app: Path


class Server:
    """`python -m ext4box serve -f IMAGE MNT -o rw` from one app tree, until `stop`."""

    def __init__(self, variant: Variant, image: Path, mnt: Path, wrap: list[str],
                 log: Path) -> None:  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(variant.app))
        before = os.stat(mnt).st_dev
        argv = [sys.executable, *wrap, "-m", "ext4box", "serve", "-f", str(image), str(mnt),
                "-o", "rw"]  # fmt: skip
        self.mnt = mnt
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + _MOUNT_TIMEOUT_S
        while os.stat(mnt).st_dev == before:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{variant.name}: no mount: {log.read_text()[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        subprocess.run(["umount", str(self.mnt)], check=True)
        if self.proc.wait(120) != 0:
            tail = self.log.read_text()[-2000:]
            raise RuntimeError(f"server exited {self.proc.returncode}: {tail}")


Figures = dict[str, tuple[float, float]]  # phase -> (wall seconds, server CPU seconds)


def run_round(variant: Variant, base: Path, work: Path, files: int, tag: str,
              wrap: list[str], wrap_phases: set[str]) -> Figures:  # fmt: skip
    """The four phases of one variant on a fresh copy of `base`."""
    image = work / f"{tag}.img"
    subprocess.run(["cp", "--sparse=always", str(base), str(image)], check=True)
    mnt = work / f"mnt-{tag}"
    mnt.mkdir(exist_ok=True)
    per_dir = max(1, files // _DIRS)
    dirs = [mnt / "churn" / f"d{d:03d}" for d in range(-(-files // per_dir))]
    paths = [str(dirs[i // per_dir] / f"file-{i:05d}") for i in range(files)]

    def create() -> None:
        os.mkdir(mnt / "churn")
        for d in dirs:
            os.mkdir(d)
        for p in paths:
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        syncfs(mnt)

    def stat() -> None:
        for p in paths:
            os.lstat(p)

    def readdir() -> None:
        seen = sum(len(os.listdir(d)) for d in dirs)
        if seen != files:
            raise RuntimeError(f"readdir saw {seen} of {files} files")

    def unlink() -> None:
        for p in paths:
            os.unlink(p)
        syncfs(mnt)

    bodies: dict[str, Callable[[], None]] = {
        "create": create, "stat": stat, "readdir": readdir, "unlink": unlink}
    out: Figures = {}
    try:
        for phase in PHASES:
            args = [a.replace("{tag}", tag).replace("{phase}", phase) for a in wrap]
            server = Server(variant, image, mnt, args if phase in wrap_phases else [],
                            work / f"{tag}-{phase}.log")  # fmt: skip
            try:
                drop_caches()
                cpu0, t0 = server_cpu_s(server.proc.pid), time.perf_counter()
                bodies[phase]()
                t1, cpu1 = time.perf_counter(), server_cpu_s(server.proc.pid)
                out[phase] = (t1 - t0, cpu1 - cpu0)
            finally:
                server.stop()
        check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                               check=False)  # fmt: skip
        if check.returncode != 0:
            print(f"!! {tag}: e2fsck -fn exit {check.returncode}: {check.stdout[-800:]}",
                  file=sys.stderr)  # fmt: skip
    finally:
        image.unlink(missing_ok=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=APP_DIR")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/ext4box-meta-ab"))
    parser.add_argument("--wrap", default="")
    parser.add_argument("--wrap-phases", default=",".join(PHASES))
    args = parser.parse_args()
    variants = [Variant(name, Path(app).resolve())
                for name, app in (v.split("=", 1) for v in args.variant)]  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    base = args.work / "base.img"
    if not base.exists():  # the bench's write image, less its files: same size and inodes
        subprocess.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-N", "33000",
                        str(base), "717M"], check=True)  # fmt: skip
    results: dict[str, dict[str, list[tuple[float, float]]]] = {v.name: {} for v in variants}
    for rnd in range(args.rounds):
        for variant in variants if rnd % 2 == 0 else variants[::-1]:
            figures = run_round(variant, base, args.work, args.files, f"{variant.name}{rnd}",
                                args.wrap.split(), set(args.wrap_phases.split(",")))
            for phase, figure in figures.items():
                results[variant.name].setdefault(phase, []).append(figure)
            print(f"round {rnd} {variant.name}: " + "  ".join(
                f"{phase} {args.files / wall:,.0f}/s cpu {cpu * 1e6 / args.files:.1f}us"
                for phase, (wall, cpu) in figures.items()), flush=True)  # fmt: skip
    print(f"median of {args.rounds}: files/s (server CPU µs per file)")
    for variant in variants:
        print(f"  {variant.name}: " + "  ".join(
            f"{phase} {args.files / statistics.median(w for w, _ in runs):,.0f}"
            f" ({statistics.median(c for _, c in runs) * 1e6 / args.files:.1f})"
            for phase, runs in results[variant.name].items()))  # fmt: skip


if __name__ == "__main__":
    main()
