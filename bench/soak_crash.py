"""Crash-consistency soak: kill -9 `ext4box serve -o rw` mid-workload, over and over.

    python bench/soak_crash.py [--iterations N | --seconds T] [--variants 4k-csum,1k-csum]
                               [--seed S] [--kernel-every K] [--max-delay S] [--max-ops N]
    python bench/soak_crash.py --repro 4k-csum:1234:ops:57:ext4box,e2fsck,kernel

Each iteration is tests/journal/crash_support.run_iteration: a seeded write
workload on a fresh copy of a small image, SIGKILL after a random delay or as
a random op starts, then replays by ext4box, `e2fsck -E journal_only` and the
kernel (every K-th iteration), each followed by `e2fsck -fn` and the model
checks. Prints every failing iteration (with its --repro string) as it
happens and a summary at the end: iterations, failures by kind, e2fsck
results before and after replay. Exits 1 if any iteration failed. Needs root
(FUSE, loop mounts). --long-every K makes every K-th kill wait past the 5 s
commit interval.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "journal"))

import structlog  # noqa: E402
from crash_support import (  # noqa: E402
    VARIANTS,
    IterationResult,
    Plan,
    base_images,
    fast_scratch,
    plan_for,
    run_iteration,
)

_DEFAULT_VARIANTS = "4k-csum,4k-nocsum,1k-csum,4k-nojournal"
_KIND = re.compile(r"^(?:\[\w+\] )?(\w+)")


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=0.0,
                        help="stop after this long instead (0: run --iterations)")
    parser.add_argument("--variants", default=_DEFAULT_VARIANTS)
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    parser.add_argument("--kernel-every", type=int, default=4,
                        help="kernel replay on every K-th iteration (0: never)")
    parser.add_argument("--max-delay", type=float, default=1.5)
    parser.add_argument("--max-ops", type=int, default=400)
    parser.add_argument("--long-every", type=int, default=0,
                        help="every K-th iteration kills after 5-8 s (past a timer commit)")
    parser.add_argument("--repro", help="run the one iteration a failure printed")
    parser.add_argument("--keep-failed", type=Path,
                        help="save each failing iteration's crashed image and ops here")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every iteration")
    return parser.parse_args()


def _plans(args: argparse.Namespace):
    if args.repro:
        yield Plan.parse(args.repro)
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    print(f"first seed {seed}", flush=True)
    for i in range(args.iterations if not args.seconds else 1 << 62):
        long_kill = args.long_every and i % args.long_every == args.long_every - 1
        plan = plan_for(names[i % len(names)], seed + i, max_delay_s=args.max_delay,
                        max_ops=args.max_ops,
                        kernel=bool(args.kernel_every) and i % args.kernel_every == 0)
        if long_kill:
            rng = random.Random(seed + i)
            plan = Plan(plan.variant, plan.seed, "delay", round(rng.uniform(5.0, 8.0), 3),
                        plan.replayers)
        yield plan


class Summary:
    def __init__(self) -> None:
        self.iterations = 0
        self.failed: list[str] = []
        self.failures_by_kind: Counter[str] = Counter()
        self.notes_by_kind: Counter[str] = Counter()
        self.fsck_before: Counter[str] = Counter()
        self.fsck_after: Counter[str] = Counter()
        self.journal_cases = 0
        self.ops = 0
        self.survivors = 0
        self.seconds = 0.0

    def add(self, result: IterationResult) -> None:
        self.iterations += 1
        self.ops += result.ops
        self.survivors += result.survivors
        self.seconds += result.seconds
        self.journal_cases += result.journal_case
        key = f"{result.plan.variant} journal_case={result.journal_case}"
        if result.before is not None:
            self.fsck_before[f"{key} {result.before.verdict}"] += 1
        for replay in result.replays:
            if replay.fsck is not None:
                self.fsck_after[f"{replay.replayer} {key} {replay.fsck.verdict}"] += 1
            elif replay.skipped:
                self.fsck_after[f"{replay.replayer} skipped ({replay.skipped})"] += 1
        for failure in result.failures:
            self.failures_by_kind[_kind(failure)] += 1
        for note in result.notes:
            self.notes_by_kind[_kind(note)] += 1
        if result.failures:
            self.failed.append(result.plan.repro())

    def text(self, wall: float) -> str:
        lines = [f"iterations {self.iterations} in {wall:.0f} s "
                 f"({wall / max(self.iterations, 1):.2f} s each), {self.ops} ops, "
                 f"{self.survivors} must-survive files checked, "
                 f"{self.journal_cases} with a journal to replay",
                 f"failed iterations: {len(self.failed)}"]
        lines += [f"  {seed}" for seed in self.failed[:50]]
        for title, counter in (("failures by kind", self.failures_by_kind),
                               ("notes by kind (not failures)", self.notes_by_kind),
                               ("e2fsck -fn of the crashed image", self.fsck_before),
                               ("e2fsck -fn after replay", self.fsck_after)):
            lines.append(f"{title}:")
            lines += [f"  {count:6d}  {name}" for name, count in sorted(counter.items())]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {"iterations": self.iterations, "failed": self.failed, "ops": self.ops,
                "survivors": self.survivors, "journal_cases": self.journal_cases,
                "failures_by_kind": dict(self.failures_by_kind),
                "notes_by_kind": dict(self.notes_by_kind),
                "fsck_before": dict(self.fsck_before), "fsck_after": dict(self.fsck_after)}


def _kind(message: str) -> str:
    match = _KIND.match(message)
    return match[1] if match else message.split(":")[0]


def main() -> int:
    args = _parse_args()
    # The in-process ext4box replay logs every open; keep warnings and errors only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    summary = Summary()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="soak-crash-", dir=fast_scratch()) as tmp:
        work = Path(tmp)
        names = [Plan.parse(args.repro).variant] if args.repro else args.variants.split(",")
        bases = base_images(names, work / "bases")
        try:
            for plan in _plans(args):
                if args.seconds and time.monotonic() - started > args.seconds:
                    break
                result = run_iteration(plan, bases[plan.variant], work / "iteration",
                                       args.keep_failed)
                summary.add(result)
                repaired = any(n.startswith(("fsck", "replay_error")) for n in result.notes)
                if result.failures or repaired or args.verbose:
                    print(result.report(), flush=True)
                elif summary.iterations % 50 == 0:
                    print(f"... {summary.iterations} iterations, "
                          f"{len(summary.failed)} failed", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    print(summary.text(time.monotonic() - started))
    if args.json:
        args.json.write_text(json.dumps(summary.as_dict(), indent=2))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
