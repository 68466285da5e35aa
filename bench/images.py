"""The two images every system is measured on, built with mkfs.ext4 -d.

The read image holds the streaming file, a tree of small files (ls -lR) and a
source-like tree (find, find + cat). The write image holds only a preallocated
file the random writes overwrite; each write workload gets its own sparse copy.
The tar the untar workload unpacks sits next to the images, outside every mount.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

from common import MIB, Sizes

SEQ_FILE = "seq.bin"
SMALL_TREE = "small-tree"
SOURCE_TREE = "src-tree"
RANDOM_WRITE_FILE = "random-write.bin"
SOURCE_TAR = "src-tree.tar"
_DIRS = 100  # the small-file trees spread their files over this many directories


def small_file_path(root: Path, index: int, count: int) -> Path:
    """Where file `index` of a `count`-file small tree lives (100 directories)."""
    per_dir = max(1, count // _DIRS)
    return root / f"d{index // per_dir:03d}" / f"file-{index:05d}"


def _write_random(path: Path, mib: int, rng: random.Random) -> None:
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(MIB))


def build_source_tree(root: Path, count: int, rng: random.Random) -> None:
    """A source-like tree: nested packages of text files, mostly 1-30 KiB."""
    words = [b"def", b"return", b"self", b"import", b"value", b"class", b"if", b"for", b"in"]
    for i in range(count):
        d = root / f"pkg{i % 7}" / f"mod{i % 23}" / f"sub{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        size = int(min(200_000, rng.lognormvariate(8.5, 1.0)))
        line = b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
        (d / f"file{i:05d}.py").write_bytes((line * (size // len(line) + 1))[:size])


def _mkfs(tree: Path, image: Path, size_mb: int, inodes: int,
          features: str | None = None) -> None:
    extra = ["-O", features] if features else []
    subprocess.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-N", str(inodes),
                    *extra, "-d", str(tree), str(image), f"{size_mb}M"], check=True)


def build_read_image(work: Path, sizes: Sizes) -> Path:
    rng = random.Random(4)
    tree = work / "read-tree"
    tree.mkdir()
    _write_random(tree / SEQ_FILE, sizes.seq_mb, rng)
    for i in range(sizes.meta_files):
        path = small_file_path(tree / SMALL_TREE, i, sizes.meta_files)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i % 97))
    build_source_tree(tree / SOURCE_TREE, sizes.source_files, rng)
    used = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
    image = work / "read.img"
    _mkfs(tree, image, int(used * 1.5 / MIB) + 128,
          sizes.meta_files + sizes.source_files + 10_000)
    shutil.rmtree(tree)
    return image


def build_write_image(work: Path, sizes: Sizes, features: str | None = None,
                      name: str = "write.img") -> Path:
    """Empty but for the file random writes overwrite; also leaves the tar to unpack.
    `features`: an mkfs -O list (e.g. "^has_journal")."""
    rng = random.Random(5)
    tree = work / "write-tree"
    tree.mkdir()
    _write_random(tree / RANDOM_WRITE_FILE, sizes.random_write_mb, rng)
    source = work / "tar-tree"
    build_source_tree(source / SOURCE_TREE, sizes.source_files, rng)
    subprocess.run(["tar", "-cf", str(work / SOURCE_TAR), "-C", str(source), SOURCE_TREE],
                   check=True)
    shutil.rmtree(source)
    tar_mb = (work / SOURCE_TAR).stat().st_size // MIB
    image = work / name
    _mkfs(tree, image, int((sizes.seq_mb + sizes.random_write_mb + tar_mb) * 1.5) + 192,
          sizes.meta_files + sizes.source_files + 10_000, features)
    shutil.rmtree(tree)
    return image


def read_through(path: Path) -> None:
    """Read a whole image once, untimed.

    In a VM the host caches the image file too, and a guest drop_caches cannot
    empty that cache: without this, whichever system runs first on a new image
    pays for the host's cold reads and the others do not (the kernel, measured
    first, read at a third of its speed in one run). Read once, the image is
    equally warm on the host for all three, and "cold" means cold in the guest.
    """
    with path.open("rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


def fresh_copy(base: Path, dest: Path) -> Path:
    """A sparse copy of `base` one write workload may change."""
    subprocess.run(["cp", "--sparse=always", str(base), str(dest)], check=True)
    return dest


def fsck_warning(image: Path) -> str | None:
    """None if `e2fsck -fn` finds the image clean, else the tail of its report."""
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                           check=False)
    if check.returncode == 0:
        return None
    return f"e2fsck -fn exit {check.returncode}: {check.stdout[-1500:]}"
