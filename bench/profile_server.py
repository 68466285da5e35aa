"""Where ext4box's server spends its time in each benchmark workload (issue 7).

    python bench/profile_server.py [--quick] [--workloads meta,data|RUNNER,...] [--rate HZ] [--doc]

Runs the workloads of bench/run.py on ext4box only, each server under
`py-spy record` (sampling, so the server runs at nearly full speed), and sums
the samples of every mount: how much of the server's time goes where
(pyfuse3's request loop and replies, trio, the FUSE handlers, the ext4 code,
the data path, device I/O, logging, the rest of Python), and the functions
with the most samples of their own. The raw profiles stay under
bench/results/profile-<time>/; `--doc` writes docs/performance-profiles.md.
Needs root and py-spy (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from common import FULL, QUICK, REPO, Context, Result
from images import build_read_image, build_write_image, read_through
from machine import describe
from run import measure, select_runners

DOC = REPO / "docs" / "performance-profiles.md"
DEFAULT_WORKLOADS = ("meta-phases,untar,ls-lR,find,seq-read,seq-write,seq-write-direct,"
                     "rand-read-cold,rand-write")
# The mounts a runner makes, in order, when it makes several.
MOUNT_LABELS = {"meta-phases": ("create", "stat", "readdir", "unlink")}
# Leaf frames that wait for the kernel's next request: the server is idle there.
# So are worker threads parked on their queue or on a lock (trio's thread cache).
IDLE = re.compile(r"(EpollIOManager\.get_events|_io_epoll\.py|select\.epoll"
                  r"|^WorkerThread\._work |^Condition\.wait |^_wait_for_tstate_lock "
                  r"|^Session\._read |^Session\._wait_for_request )")
# A stack importing modules or running a module's body is the server starting up
# (a fixed cost per mount, large beside a short workload): counted apart.
_STARTUP = re.compile(r"^(<module> |_find_and_load |_load_unlocked )")
# (category, pattern on the leaf frame's file), first match wins.
CATEGORIES = (
    ("device I/O (blockdev)", re.compile(r"ext4box/blockdev\.py")),
    ("data path (iomap)", re.compile(r"ext4box/iomap/")),
    ("native FUSE loop and replies (fuse/session.py, dispatch.py)",
     re.compile(r"ext4box/fuse/(session|dispatch|protocol)\.py")),
    ("FUSE handlers (ext4box/fuse)", re.compile(r"ext4box/fuse/")),
    ("ext4 format code (ext4box/ext4)", re.compile(r"ext4box/ext4/")),
    ("pyfuse3 request loop and replies", re.compile(r"pyfuse3")),
    ("trio scheduling", re.compile(r"trio/")),
    ("logging (structlog)", re.compile(r"structlog/|ext4box/log\.py")),
    ("other ext4box", re.compile(r"ext4box/")),
)
# Frames worth an inclusive figure: handlers, the ext4 code, the data path (not
# the entry points every request passes through, not module imports).
_INCLUSIVE = re.compile(r"^(?!<module>).*ext4box/(ext4/|iomap/|fuse/(operations|changes)\.py)")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


@dataclass
class Profile:
    """The samples of one or more mounts: total, idle, and busy ones by leaf frame."""

    samples: int = 0
    idle: int = 0
    startup: int = 0  # importing modules: a fixed cost per mount
    by_category: Counter[str] = field(default_factory=Counter)
    by_function: Counter[str] = field(default_factory=Counter)  # self samples
    inclusive: Counter[str] = field(default_factory=Counter)  # handlers/ext4/iomap on the stack

    @property
    def busy(self) -> int:
        """Samples serving requests (not idle, not starting up)."""
        return self.samples - self.idle - self.startup

    def add_raw(self, path: Path) -> None:
        """Add py-spy's raw (collapsed stack) output: `frame;frame;... count` lines."""
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            self.samples += count
            leaf = frames[-1]
            if IDLE.search(leaf):
                self.idle += count
                continue
            if any(_STARTUP.search(f) for f in frames[1:]):  # [0]: the entry script
                self.startup += count
                continue
            self.by_category[_category(leaf)] += count
            self.by_function[_function(leaf)] += count
            for name in {_function(f) for f in frames if _INCLUSIVE.search(f)}:
                self.inclusive[name] += count


def _function(frame: str) -> str:
    """'func (path/to/file.py:12)' -> 'func (path/to/file.py)': lines merged."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = re.sub(r"^.*?/(site-packages|app|lib/python3\.\d+)/", "", match["file"])
    return f"{match['func']} ({file})"


def _category(frame: str) -> str:
    return next((name for name, pattern in CATEGORIES if pattern.search(frame)),
                "other Python (stdlib, dataclasses, ...)")


class Sampler:
    """Wraps server command lines in `py-spy record`, one raw profile per mount."""

    def __init__(self, directory: Path, rate: int) -> None:
        self.directory = directory
        self.rate = rate
        self.made: list[Path] = []

    def __call__(self, argv: list[str]) -> list[str]:
        out = self.directory / f"{len(self.made) + 1:03d}.txt"
        self.made.append(out)
        return [py_spy() or "py-spy", "record", "--format", "raw",
                "--rate", str(self.rate), "--output", str(out), "--", *argv]


def py_spy() -> str | None:
    """py-spy next to this interpreter (the venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def render(label: str, rates: list[Result], profile: Profile, top: int = 12) -> list[str]:
    """One workload's section: its figures, where the busy samples went, top functions."""
    lines = [f"### {label}", ""]
    figures = ", ".join(f"{r.workload} {r.rate:,.0f} {r.unit}" for r in rates
                        if r.rate is not None)
    lines += [f"Measured while sampled: {figures or 'no figure'}. "
              f"{profile.samples:,} samples: {_percent(profile.busy, profile.samples)} serving "
              f"requests, {_percent(profile.startup, profile.samples)} starting up (imports), "
              "the rest idle (waiting for the next request, worker threads parked).", ""]
    lines += ["| where the busy time went | share |", "|---|---|"]
    lines += [f"| {name} | {_percent(count, profile.busy)} |"
              for name, count in profile.by_category.most_common()]
    lines += ["", "| function (self time) | share of busy |", "|---|---|"]
    lines += [f"| `{name}` | {_percent(count, profile.busy)} |"
              for name, count in profile.by_function.most_common(top)]
    lines += ["", "| ext4box function (on the stack) | share of busy |", "|---|---|"]
    lines += [f"| `{name}` | {_percent(count, profile.busy)} |"
              for name, count in profile.inclusive.most_common(top)]
    return [*lines, ""]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (as run.py)")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                        help="groups or runner names, as bench/run.py takes them")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--cache-dir", type=Path, default=Path("/var/tmp/ext4box-bench"))
    parser.add_argument("--doc", action="store_true", help=f"write {DOC.relative_to(REPO)}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if os.geteuid() != 0:
        print("profile: needs root (mounts, drop_caches)", file=sys.stderr)
        return 1
    if py_spy() is None:
        print("profile: py-spy not found (pip install -e '.[bench]')", file=sys.stderr)
        return 1
    runners = select_runners(args.workloads)
    sizes = QUICK if args.quick else FULL
    out_dir = REPO / "bench" / "results" / time.strftime("profile-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True)
    sections: list[str] = []
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="profile-", dir=args.cache_dir) as tmp:
        ctx = Context(Path(tmp), sizes, cache_dir=args.cache_dir)
        machine = describe(ctx.work)
        needs = {r.needs for r in runners}
        if "read" in needs:
            ctx.read_image = build_read_image(ctx.work, sizes)
            read_through(ctx.read_image)
        if "write" in needs:
            ctx.write_image = build_write_image(ctx.work, sizes)
            read_through(ctx.write_image)
        for runner in runners:
            if "ext4box" not in runner.systems:
                continue
            sampler = Sampler(out_dir / runner.name, args.rate)
            sampler.directory.mkdir()
            common.PROFILER = sampler
            try:
                results = measure(runner, "ext4box", ctx)
            finally:
                common.PROFILER = None
            before = len(sections)
            labels = MOUNT_LABELS.get(runner.name)
            if labels and len(labels) == len(sampler.made):
                for label, raw, result in zip(labels, sampler.made, results, strict=False):
                    profile = Profile()
                    profile.add_raw(raw)
                    sections += render(f"{runner.name}: {label}", [result], profile)
            else:
                profile = Profile()
                for raw in sampler.made:
                    if raw.exists():
                        profile.add_raw(raw)
                sections += render(runner.name, results, profile)
            print("\n".join(sections[before:]), flush=True)
    header = [
        "# Where the server's time goes",
        "",
        "<!-- Generated by bench/profile_server.py. Do not edit: rerun "
        "`python bench/profile_server.py --doc`. -->",
        "",
        f"Sampled {time.strftime('%Y-%m-%d %H:%M %z')} with py-spy at {args.rate} Hz on "
        f"{machine.get('cpu', '?')}, {'quick' if args.quick else 'full'} sizes; raw "
        f"profiles in `{out_dir.relative_to(REPO)}` (not committed). Shares are of the "
        "samples in which the server was serving requests (not waiting in epoll for the "
        "next one, no parked worker thread, not importing modules at start-up), by the "
        "frame on top "
        "of the stack: a C call (a syscall, pyfuse3's Cython code) counts for the Python "
        "line that made it.",
        "",
    ]
    if args.doc:
        DOC.write_text("\n".join(header + sections))
        print(f"doc: {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
