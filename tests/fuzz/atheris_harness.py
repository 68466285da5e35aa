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
exec count and the longest operation seen (its input in WORKDIR/longest.bin).
Reproduce a crash with `--replay WORKDIR/crashes/<sig>.bin`.

`--rw` fuzzes read-write sessions instead (rw_driver): inputs are
`rw_driver.encode_rw` byte strings (edits, then write operations), run by
`rw_driver.run_session`; a write outside what the session owns (oracle 4)
is recorded as a crash like an exception.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
import traceback
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS_DIR))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["ext4box"]):
    import ext4box.ext4.opening
    import ext4box.ext4.read.filesystem
    import ext4box.ext4.write.writable
    import ext4box.fuse.attrs
    import ext4box.iomap.engine  # noqa: F401

from fuzz.driver import OperationHang, exercise, quiet_logs  # noqa: E402
from fuzz.program import Program, Seed, load_seeds, materialise  # noqa: E402
from fuzz.regions import Mutation  # noqa: E402
from fuzz.rw_driver import RwOp, decode_rw, encode_rw, run_session, seed_facts  # noqa: E402
from fuzz.seeds import build_seed_images  # noqa: E402


class WriteViolation(Exception):
    """Oracle 4 of a rw session failed: something outside the session's blocks was written."""


class Harness:
    def __init__(self, seeds: list[Seed], workdir: Path, op_timeout: float,
                 rw: bool = False) -> None:
        self.seeds = seeds
        self.rw = rw
        self.facts = [seed_facts(seed.image) for seed in seeds] if rw else []
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
        try:
            report = run_one(self, data)
        except (Exception, OperationHang) as err:
            self._record(data, err)
        else:
            if report.longest_s > self.longest:
                self.longest, self.longest_op = report.longest_s, report.longest_op
                # The input behind the slowest request, to replay and profile it.
                (self.crash_dir.parent / "longest.bin").write_bytes(data)
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
        elif isinstance(err, WriteViolation):
            place = str(err).split("|")[0]
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


def run_one(harness: Harness, data: bytes) -> object:
    """One input through the read driver, or (--rw) through a rw session."""
    if not harness.rw:
        image = materialise(harness.seeds, Program.decode(data))
        return exercise(image, op_timeout=harness.op_timeout)
    program, ops = decode_rw(data)
    index = program.seed % len(harness.seeds)
    report, _ = run_session(materialise(harness.seeds, program), harness.facts[index], ops,
                            op_timeout=harness.op_timeout)
    if report.violations:
        kind = re.sub(r"\d+", "N", report.violations[0])  # one signature per kind of write
        raise WriteViolation(f"{kind}|{report.violations}")
    return report


def program_text(data: bytes) -> str:
    if RW_MODE:
        return repr(decode_rw(data))
    return repr(Program.decode(data))


RW_MODE = False


def write_rw_seed_corpus(corpus: Path, seeds: list[Seed]) -> None:
    """Per seed image: an undamaged session of every operation kind, then one edit of
    each region followed by a few operations."""
    corpus.mkdir(parents=True, exist_ok=True)
    rng = random.Random(6)
    for index, seed in enumerate(seeds):
        ops = tuple(RwOp(kind, rng.randrange(3), rng.randrange(8), rng.getrandbits(16))
                    for kind in range(12))
        (corpus / f"rw-seed-{index}").write_bytes(encode_rw(Program(index, False, ()), ops))
        for region in range(len(seed.regions)):
            mutation = Mutation(region, rng.randrange(1 << 16), region % 9, rng.getrandbits(64))
            program = Program(index, bool(region & 1), (mutation,))
            ops = tuple(RwOp(rng.randrange(12), rng.randrange(3), rng.randrange(8),
                             rng.getrandbits(16)) for _ in range(6))
            (corpus / f"rw-seed-{index}-{region}").write_bytes(encode_rw(program, ops))


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
    parser.add_argument("--rw", action="store_true", help="fuzz read-write sessions")
    args, libfuzzer_args = parser.parse_known_args()
    global RW_MODE
    RW_MODE = args.rw
    quiet_logs()
    seeds = load_seeds(build_seed_images(args.workdir / "seeds"))
    harness = Harness(seeds, args.workdir, args.op_timeout, rw=args.rw)
    if args.replay:
        data = args.replay.read_bytes()
        print(program_text(data))
        print(run_one(harness, data))
        return
    corpus = args.workdir / ("corpus-rw" if args.rw else "corpus")
    (write_rw_seed_corpus if args.rw else write_seed_corpus)(corpus, seeds)
    # rw inputs: 1 + 2 + 13 x 16 edit bytes, then 24 five-byte operations.
    max_len = 1 + 2 + 13 * 16 + 5 * 24 if args.rw else 210
    argv = [sys.argv[0], *libfuzzer_args, f"-max_total_time={args.seconds}",
            f"-max_len={max_len}", "-len_control=0", "-timeout=60", "-rss_limit_mb=3072",
            # crash-/slow-unit files go beside the corpus, not into the working directory
            f"-artifact_prefix={args.workdir}/", str(corpus)]
    try:
        atheris.Setup(argv, harness)
        atheris.Fuzz()
    finally:
        harness.write_stats()


if __name__ == "__main__":
    main()
