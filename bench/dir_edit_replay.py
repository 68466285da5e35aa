"""What does ext4's create/unlink cost in-process, and do two code trees write the same bytes?

    .venv/bin/python bench/dir_edit_replay.py --app app --block-size 4096 \\
        [--files 5000] [--profile] [--hash-only]

Makes a fresh image (mkfs.ext4 with a fixed UUID and hash seed), opens it
with `open_filesystem(readonly=False)` from the given `app/` tree, and runs a
fixed, seeded sequence through the WritableFilesystem calls the FUSE layer
makes: FILES creates in one directory (it turns into an htree), a few
hundred creates in a linear directory without dir_index, unlinks of a
seeded half of each, renames within and between them, and creates that
reuse the freed slots. Clocks and i_generation are frozen, so the image's
SHA-256 depends only on what the code writes: run it once per tree and
compare the hashes (directory edits must not change a byte). Reports ext4
CPU per create and per unlink (process CPU time, no FUSE), or with
--profile the top of a cProfile of the create and unlink phases.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import pstats
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_FROZEN_NS = 1_800_000_000 * 10**9
_UUID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
_HASH_SEED = "8c7bd5a2-1f3e-4e7a-9d10-6b2f5a4c3e21"


def freeze_clocks() -> None:
    """Same times and generations in every run, so equal code writes equal bytes."""
    time.time_ns = lambda: _FROZEN_NS
    time.time = lambda: _FROZEN_NS / 1e9
    secrets.randbits = lambda k: 0x5EED & ((1 << k) - 1)


def make_image(path: Path, block_size: int, *, dir_index: bool = True) -> None:
    features = "^has_journal" + ("" if dir_index else ",^dir_index")
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-b", str(block_size), "-N", "16384", "-O", features,
         "-U", _UUID, "-E", f"hash_seed={_HASH_SEED}", "-T", "default", str(path), "64M"],
        check=True, env=dict(os.environ, E2FSPROGS_FAKE_TIME="1800000000"),
    )  # fmt: skip


def replay(image: Path, files: int, *, profile: bool, seed: int = 13) -> dict[str, float]:
    from ext4box.blockdev import BlockDevice
    from ext4box.ext4.opening import open_filesystem

    dev = BlockDevice.open(str(image), writable=True)
    fs = open_filesystem(dev, readonly=False)
    rng = random.Random(seed)
    root = 2
    big = fs.mkdir(root, b"big", 0o40755, 0, 0).ino
    small = fs.mkdir(root, b"small", 0o40755, 0, 0).ino
    names = [f"file-{i:06d}-{rng.randrange(10**6):06d}".encode() for i in range(files)]
    smalls = [f"s{i}".encode() * (1 + i % 7) for i in range(300)]
    prof = cProfile.Profile(time.process_time) if profile else None
    out: dict[str, float] = {}

    def phase(label: str, fn, count: int) -> None:  # type: ignore[no-untyped-def]
        start = time.process_time()
        if prof is not None:
            prof.enable()
        fn()
        if prof is not None:
            prof.disable()
        out[label] = (time.process_time() - start) / count * 1e6

    def create_big() -> None:
        for name in names:
            fs.create(big, name, 0o100644, 0, 0)

    phase("create_us", create_big, files)
    for name in smalls:
        fs.create(small, name, 0o100644, 0, 0)
    victims = rng.sample(names, files // 2)

    def unlink_big() -> None:
        for name in victims:
            fs.unlink(big, name, still_open=False)

    phase("unlink_us", unlink_big, len(victims))
    for name in rng.sample(smalls, 150):
        fs.unlink(small, name, still_open=False)
    survivors = sorted(set(names) - set(victims))
    for i, name in enumerate(rng.sample(survivors, 200)):
        target = (small, b"m%d" % i) if i % 2 else (big, name + b".r")
        fs.rename(big, name, *target)
    for i in range(files // 4):
        fs.create(big, b"again-%d" % i, 0o100644, 0, 0)
    for i in range(100):
        fs.create(small, b"again-%d" % i, 0o100644, 0, 0)
    fs.commit(durable=True)
    fs.close()
    if prof is not None:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", type=Path, default=Path("app"))
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--no-dir-index", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--keep", type=Path, help="copy the final image here")
    args = parser.parse_args()
    sys.path.insert(0, str(args.app.resolve()))
    freeze_clocks()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "img"
        make_image(image, args.block_size, dir_index=not args.no_dir_index)
        figures = replay(image, args.files, profile=args.profile)
        fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        if args.keep:
            args.keep.write_bytes(image.read_bytes())
    import ext4box

    print(Path(ext4box.__file__).parent, " ".join(f"{k}={v:.1f}" for k, v in figures.items()),
          f"e2fsck={fsck.returncode} sha256={digest[:16]}")  # fmt: skip
    return 0 if fsck.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
