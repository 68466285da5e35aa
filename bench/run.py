"""ext4box vs the kernel's ext4 vs fuse2fs on the same freshly built images (issue 7).

    python bench/run.py [--quick] [--repeat N] [--systems kernel,ext4box,fuse2fs]
                        [--workloads data,meta,memory|RUNNER,...] [--cache-dir DIR]
                        [--ext4box-options OPT,...]

Needs root (loop mounts, drop_caches). Prints a table (absolute figures, ratios
to the kernel and to fuse2fs, issue-7 targets), writes the figures as JSON under
bench/results/, and — for a full run of every workload on every system, or
with --doc — regenerates docs/performance.md and its chart (bench/report.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import memory
import report
import workloads_data
import workloads_meta
from common import FULL, QUICK, REPO, SYSTEMS, Context, Result, Runner
from images import build_read_image, build_write_image, read_through
from machine import describe, load_average
from targets import GROUPS, ROW_BY_KEY

RUNNERS: tuple[Runner, ...] = (*workloads_data.RUNNERS, *workloads_meta.RUNNERS,
                               *memory.RUNNERS)


def select_runners(spec: str) -> list[Runner]:
    """Runners named by group (data, meta, memory) or by runner name, in table order."""
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    known = set(GROUPS) | {r.name for r in RUNNERS}
    if unknown := wanted - known:
        raise ValueError(f"unknown workloads {sorted(unknown)}; choose from {sorted(known)}")
    return [r for r in RUNNERS
            if r.name in wanted or ROW_BY_KEY[r.keys[0]].group in wanted]


def measure(runner: Runner, system: str, ctx: Context) -> list[Result]:
    """One run of `runner` on `system`; a failure becomes an error cell, not a crash."""
    try:
        return runner.run(system, ctx)
    except Exception as err:  # a crashed server or tool must not lose the other figures
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        print(f"  {runner.name} on {system} FAILED: {first}", file=sys.stderr, flush=True)
        traceback.print_exc(limit=3, file=sys.stderr)
        return [Result(key, system, None, "", error=f"failed: {first}") for key in runner.keys]


def best_of(runs: list[Result]) -> Result:
    """The best successful run (highest rate; lowest for the memory figure), with all runs."""
    ok = [r for r in runs if r.error is None and r.rate is not None]
    if not ok:
        return runs[-1]
    lower_better = ROW_BY_KEY[ok[0].workload].group == "memory"
    best = min(ok, key=lambda r: r.rate) if lower_better else max(ok, key=lambda r: r.rate)
    if len(runs) > 1:
        details = dict(best.details or {})
        details["all_rates"] = [None if r.rate is None else round(r.rate, 3) for r in runs]
        best = dataclasses.replace(best, details=details)
    return best


def _progress(result: Result) -> str:
    figure = result.error or f"{result.rate:,.1f} {result.unit}"
    took = f" ({result.seconds:.2f} s)" if result.seconds is not None else ""
    return f"  {result.workload:<17} {result.system:<8} {figure}{took}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (64 MiB, 2,000 files, 20,000-file memory image)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the best is kept")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated subset of " + ",".join(SYSTEMS))
    parser.add_argument("--workloads", default=",".join(GROUPS),
                        help="groups (data, meta, memory) or runners: "
                             + ", ".join(r.name for r in RUNNERS))
    parser.add_argument("--size-mb", type=int, help="size of the streaming file")
    parser.add_argument("--cache-dir", type=Path, default=memory.DEFAULT_CACHE_DIR,
                        help="work directory; keeps the memory workload's image between runs")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/...)")
    parser.add_argument("--ext4box-options", default="",
                        help="more -o options for every read-write ext4box mount, e.g. "
                             "writeback_cache (the figures then say so in the JSON)")
    doc = parser.add_mutually_exclusive_group()
    doc.add_argument("--doc", action="store_true",
                     help="regenerate docs/performance.md even for a partial or quick run")
    doc.add_argument("--no-doc", action="store_true", help="never touch docs/")
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        print("bench: needs root (loop mounts, drop_caches)", file=sys.stderr)
        return 1
    try:
        runners = select_runners(args.workloads)
    except ValueError as err:
        parser.error(str(err))
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(unknown)}")
    if "fuse2fs" in systems and shutil.which("fuse2fs") is None:
        print("bench: fuse2fs not installed, skipping it", file=sys.stderr)
        systems.remove("fuse2fs")
    if shutil.which("fio") is None and any(r in workloads_data.RUNNERS for r in runners):
        print("bench: fio not installed (make deps installs it)", file=sys.stderr)
        return 1
    sizes = QUICK if args.quick else FULL
    common.EXT4BOX_RW_OPTIONS = tuple(o for o in args.ext4box_options.split(",") if o)
    if args.size_mb:
        sizes = dataclasses.replace(sizes, seq_mb=args.size_mb)

    load = load_average()[0]
    if load > (os.cpu_count() or 1):
        print(f"bench: load average {load} on {os.cpu_count()} cores: other work on this "
              "machine will skew the figures (recorded in the results)", file=sys.stderr)
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    clock = time.perf_counter()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, str], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="run-", dir=args.cache_dir) as tmp:
        ctx = Context(Path(tmp), sizes, cache_dir=args.cache_dir)
        machine = describe(ctx.work)
        needs = {r.needs for r in runners}
        if "read" in needs:
            print(f"building the read image ({sizes.seq_mb} MiB file, {sizes.meta_files:,} "
                  f"small files, {sizes.source_files:,} source files)...", flush=True)
            ctx.read_image = build_read_image(ctx.work, sizes)
            read_through(ctx.read_image)
        if "write" in needs:
            print("building the write image...", flush=True)
            ctx.write_image = build_write_image(ctx.work, sizes)
            read_through(ctx.write_image)
        for runner in runners:
            for system in (s for s in systems if s in runner.systems):
                for _ in range(args.repeat):
                    for result in measure(runner, system, ctx):
                        print(_progress(result), flush=True)
                        runs.setdefault((result.workload, system), []).append(result)
    results = [best_of(r) for r in runs.values()]

    data = {
        "schema": 1,
        "started": started,
        "duration_s": round(time.perf_counter() - clock, 1),
        "argv": sys.argv[1:] if argv is None else argv,
        "quick": args.quick,
        "repeat": args.repeat,
        "systems": systems,
        "ext4box_rw_options": list(common.EXT4BOX_RW_OPTIONS),
        "sizes": dataclasses.asdict(sizes),
        "machine": {**machine, "load_at_end": load_average()},
        "results": [dataclasses.asdict(r) for r in results],
    }
    out = args.out or REPO / "bench" / "results" / time.strftime("bench-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print()
    print(report.text_table(data))
    print(f"\nresults: {out}")
    complete = (not args.quick and set(systems) == set(SYSTEMS)
                and len(runners) == len(RUNNERS) and not common.EXT4BOX_RW_OPTIONS)
    if args.doc or (complete and not args.no_doc):
        for problem in report.write_doc(data, out):
            print(f"bench: {problem}", file=sys.stderr)
        print(f"doc: {report.DOC.relative_to(REPO)} (chart {report.CHART.relative_to(REPO)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
