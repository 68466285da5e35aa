#!/usr/bin/env python3
"""Coverage-guided fuzzing of the read side with atheris (libFuzzer for Python).

    .venv/bin/pip install atheris
    nice -n 10 .venv/bin/python tests/fuzz/atheris_harness.py --seconds 600 \
        --workdir /tmp/ext4box-fuzz

Inputs are `program.Program`s (seed image + metadata edits), run through
`driver.exercise`. Unlike a plain libFuzzer target, an unexpected exception
or a hang does not stop the run: it is recorded once per distinct signature
(exception type + innermost ext4box frame) under WORKDIR/crashes/ with the
input and the traceback, and fuzzing goes on. WORKDIR/stats.json holds the
exec count and the longest operation seen. Reproduce a crash with
`--replay WORKDIR/crashes/<sig>.bin`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
import traceback
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS_DIR))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["ext4box"]):
    import ext4box.ext4.filesystem
    import ext4box.fuse.attrs
    import ext4box.iomap.engine  # noqa: F401

from fuzz.driver import OperationHang, exercise, quiet_logs  # noqa: E402
from fuzz.program import Program, Seed, load_seeds, materialise  # noqa: E402
from fuzz.regions import Mutation  # noqa: E402
from fuzz.seeds import build_seed_images  # noqa: E402


class Harness:
    def __init__(self, seeds: list[Seed], workdir: Path, op_timeout: float) -> None:
        self.seeds = seeds
        self.crash_dir = workdir / "crashes"
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        self.stats_path = workdir / "stats.json"
        self.op_timeout = op_timeout
        self.execs = 0
        self.longest = 0.0
        self.longest_op = ""
        self.signatures: set[str] = {p.stem for p in self.crash_dir.glob("*.bin")}
        self.started = time.monotonic()
        self.last_stats = 0.0

    def __call__(self, data: bytes) -> None:
        self.execs += 1
        program = Program.decode(data)
        image = materialise(self.seeds, program)
        try:
            report = exercise(image, op_timeout=self.op_timeout)
        except (Exception, OperationHang) as err:
            self._record(data, err)
        else:
            if report.longest_s > self.longest:
                self.longest, self.longest_op = report.longest_s, report.longest_op
        now = time.monotonic()
        if now - self.last_stats > 10:
            self.last_stats = now
            self.write_stats()

    def _record(self, data: bytes, err: BaseException) -> None:
        frames = traceback.extract_tb(err.__traceback__)
        inner = [f for f in frames if "ext4box" in f.filename] or frames
        place = f"{Path(inner[-1].filename).name}:{inner[-1].name}" if inner else "?"
        if isinstance(err, OperationHang):
            place = str(err).split(" ran longer")[0].split(" ")[0]  # the operation kind
        signature = f"{type(err).__name__}@{place}"
        key = hashlib.sha1(signature.encode()).hexdigest()[:12]
        if key in self.signatures:
            return
        self.signatures.add(key)
        (self.crash_dir / f"{key}.bin").write_bytes(data)
        text = "".join(traceback.format_exception(err))
        (self.crash_dir / f"{key}.txt").write_text(f"{signature}\n{program_text(data)}\n{text}")
        print(f"NEW CRASH {signature} -> {key}", file=sys.stderr, flush=True)

    def write_stats(self) -> None:
        self.stats_path.write_text(json.dumps({
            "execs": self.execs,
            "seconds": round(time.monotonic() - self.started, 1),
            "distinct_crashes": len(self.signatures),
            "longest_op_s": round(self.longest, 4),
            "longest_op": self.longest_op,
        }, indent=1))


def program_text(data: bytes) -> str:
    return repr(Program.decode(data))


def write_seed_corpus(corpus: Path, seeds: list[Seed]) -> None:
    """Per seed image: the untouched image, then one edit of every region and op,
    re-sealed and not, so the fuzzer starts with every structure in reach."""
    corpus.mkdir(parents=True, exist_ok=True)
    rng = random.Random(6)
    for index, seed in enumerate(seeds):
        (corpus / f"seed-{index}").write_bytes(Program(index, False, ()).encode())
        for region in range(len(seed.regions)):
            mutation = Mutation(region, rng.randrange(1 << 16), region % 9, rng.getrandbits(64))
            program = Program(index, bool(region & 1), (mutation,))
            (corpus / f"seed-{index}-{region}").write_bytes(program.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ext4box-fuzz"))
    parser.add_argument("--op-timeout", type=float, default=5.0)
    parser.add_argument("--replay", type=Path, help="run one input and show the outcome")
    args, libfuzzer_args = parser.parse_known_args()
    quiet_logs()
    seeds = load_seeds(build_seed_images(args.workdir / "seeds"))
    harness = Harness(seeds, args.workdir, args.op_timeout)
    if args.replay:
        data = args.replay.read_bytes()
        print(program_text(data))
        print(exercise(materialise(seeds, Program.decode(data)), op_timeout=args.op_timeout))
        return
    corpus = args.workdir / "corpus"
    write_seed_corpus(corpus, seeds)
    argv = [sys.argv[0], *libfuzzer_args, f"-max_total_time={args.seconds}",
            "-max_len=210", "-len_control=0", "-timeout=60", "-rss_limit_mb=3072", str(corpus)]
    try:
        atheris.Setup(argv, harness)
        atheris.Fuzz()
    finally:
        harness.write_stats()


if __name__ == "__main__":
    main()
