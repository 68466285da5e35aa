"""What the jbd2 journal costs ext4box's writes: every write workload on an image
with a journal and on the same image without one (`mkfs -O ^has_journal`).

    sudo .venv/bin/python bench/journal_cost.py [--quick] [--repeat N] [--systems kernel,ext4box]

The kernel is measured the same way for reference (its journal has a cost too).
Prints, per workload and system, the rate with and without the journal and the
share of throughput the journal takes; writes the figures as JSON under
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import memory
from common import FULL, QUICK, REPO, Context, Result
from images import build_write_image, read_through
from run import best_of, measure
from workloads_data import RUNNERS as DATA_RUNNERS
from workloads_meta import RUNNERS as META_RUNNERS

WRITE_RUNNERS = tuple(r for r in (*DATA_RUNNERS, *META_RUNNERS) if r.needs == "write")
VARIANTS = {"journal": None, "no journal": "^has_journal"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--systems", default="kernel,ext4box")
    parser.add_argument("--cache-dir", type=Path, default=memory.DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("journal_cost: needs root (loop mounts, drop_caches)", file=sys.stderr)
        return 1
    sizes = QUICK if args.quick else FULL
    systems = [s for s in args.systems.split(",") if s]
    figures: dict[tuple[str, str, str], Result] = {}
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jcost-", dir=args.cache_dir) as tmp:
        for variant, features in VARIANTS.items():
            ctx = Context(Path(tmp) / variant.replace(" ", "-"), sizes)
            ctx.work.mkdir()
            ctx.write_image = build_write_image(ctx.work, sizes, features)
            read_through(ctx.write_image)
            for runner in WRITE_RUNNERS:
                for system in (s for s in systems if s in runner.systems):
                    runs: dict[str, list[Result]] = {}
                    for _ in range(args.repeat):
                        for result in measure(runner, system, ctx):
                            runs.setdefault(result.workload, []).append(result)
                    for key, results in runs.items():
                        best = best_of(results)
                        figures[(key, system, variant)] = best
                        shown = best.error or f"{best.rate:,.1f} {best.unit}"
                        print(f"  {variant:<10} {key:<17} {system:<8} {shown}", flush=True)
    rows = []
    for key, system in dict.fromkeys((k, s) for k, s, _ in figures):
        with_j = figures.get((key, system, "journal"))
        without = figures.get((key, system, "no journal"))
        cost = None
        if with_j and without and with_j.rate and without.rate:
            cost = 1 - with_j.rate / without.rate
        rows.append({"workload": key, "system": system, "unit": with_j.unit if with_j else "",
                     "journal": with_j.rate if with_j else None,
                     "no_journal": without.rate if without else None, "cost": cost})
    print(f"\n{'workload':<17} {'system':<8} {'journal':>14} {'no journal':>14} {'cost':>7}")
    for row in rows:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:,.0f}"
        cost = "-" if row["cost"] is None else f"{row['cost']:.0%}"
        print(f"{row['workload']:<17} {row['system']:<8} {fmt(row['journal']):>14} "
              f"{fmt(row['no_journal']):>14} {cost:>7}")
    out = REPO / "bench" / "results" / time.strftime("journal-cost-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "repeat": args.repeat, "rows": rows},
                              indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
