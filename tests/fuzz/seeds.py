"""Small real images to mutate: built by mkfs.ext4 -d (and e2fsck -D) from one tree.

Each seed is a few MiB so a mutated copy costs well under a millisecond to
materialise, yet holds every metadata shape the read side parses: an extent
tree with an index block (or indirect blocks on ext2), an htree directory,
fast and slow symlinks, in-inode and block xattrs, an ACL, a hard link,
inline files and directories on the inline variant, and several groups.
Two more seeds carry a journal that needs recovery (seed_journal.py: with and
without journal checksums, 64-bit and 32-bit tags), one xattr values in EA
inodes written by the kernel (seed_ea_inode.py).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fuzz.seed_ea_inode import SeedUnavailable, add_ea_inode_values
from fuzz.seed_journal import add_pending_journal

_SEED = 6_2024
# Fixed UUID and hash seed: the same directory layout, hashes and checksums on
# every build, so a recorded fuzz program reproduces on a rebuilt seed.
_UUID = "6e0f7a3c-1d2b-4c5e-8f90-a1b2c3d4e5f6"


@dataclass(frozen=True, slots=True)
class SeedSpec:
    name: str
    mkfs_args: tuple[str, ...]
    size: str = "3M"
    finish: str = ""  # "journal", "journal-csum" (a pending journal) or "ea-inode"


SEED_SPECS: tuple[SeedSpec, ...] = (
    # metadata_csum (the 1.47 default), 64bit, flex_bg, 3 groups of 1 KiB blocks.
    SeedSpec("ext4-csum-1k", ("-t", "ext4", "-b", "1024", "-g", "1024", "-N", "192")),
    # No checksums to hide behind: every mutation reaches the parsers.
    SeedSpec("ext4-inline-nocsum-4k",
             ("-t", "ext4", "-b", "4096", "-O", "inline_data,^metadata_csum", "-N", "128"),
             size="4M"),
    # Indirect block maps (double indirect for the 300 KiB file).
    SeedSpec("ext2-1k", ("-t", "ext2", "-b", "1024", "-g", "1024", "-N", "192")),
)
JOURNAL_SEED_SPECS: tuple[SeedSpec, ...] = (
    # Journal checksums v3 and 64-bit tags over a metadata_csum filesystem.
    SeedSpec("journal-csum-1k", ("-t", "ext4", "-b", "1024", "-g", "1024", "-N", "192"),
             size="4M", finish="journal-csum"),
    # No checksums anywhere, 32-bit tags: every journal edit reaches recovery.
    SeedSpec("journal-nocsum-1k", ("-t", "ext4", "-b", "1024", "-O", "^metadata_csum,^64bit",
                                   "-g", "1024", "-N", "192"), size="4M", finish="journal"),
)
EA_INODE_SEED_SPECS: tuple[SeedSpec, ...] = (
    SeedSpec("ea-inode-1k", ("-t", "ext4", "-b", "1024", "-O", "ea_inode", "-g", "1024",
                             "-N", "192"), size="4M", finish="ea-inode"),
)
ALL_SEED_SPECS = SEED_SPECS + JOURNAL_SEED_SPECS + EA_INODE_SEED_SPECS
UNAVAILABLE: dict[str, str] = {}  # seed name -> why it could not be built here


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_seed_tree(root: Path) -> None:
    """The source tree every seed image holds (deterministic content)."""
    rng = random.Random(_SEED)
    _write(root / "hello.txt", b"hello, fuzzer\n")
    _write(root / "tiny", b"x")
    _write(root / "data/medium.bin", rng.randbytes(40_000))
    _write(root / "data/big.bin", rng.randbytes(300_000))
    # Ten one-block islands separated by holes: more extents than the inode's
    # four slots, so the tree needs an index level.
    with (root / "data/sparse.bin").open("wb") as f:
        for island in range(10):
            f.seek(island * 16384)
            f.write(rng.randbytes(1024))
        f.truncate(10 * 16384)
    for i in range(60):
        _write(root / f"many/entry-with-a-longish-name-{i:03d}", b"%d\n" % i)
    _write(root / "a/b/c/d/deep.txt", b"deep\n")
    os.symlink("hello.txt", root / "fast-link")
    os.symlink("a/b/c/d/" + "../" * 24 + "hello.txt", root / "slow-link")
    os.link(root / "hello.txt", root / "hardlink")
    os.setxattr(root / "hello.txt", "user.small", b"v")
    os.setxattr(root / "data/medium.bin", "user.big", rng.randbytes(600))
    os.setxattr(root / "data/medium.bin", "user.second", b"2" * 40)
    subprocess.run(["setfacl", "-m", "u:1234:r-x", str(root / "a")], check=False)
    (root / "empty-dir").mkdir()


def build_seed_image(spec: SeedSpec, tree: Path, image: Path) -> Path:
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-U", _UUID, "-E", f"root_owner=0:0,hash_seed={_UUID}",
         *spec.mkfs_args, "-d", str(tree),
         str(image), spec.size],
        check=True, capture_output=True,
    )
    # Index every directory large enough (the kernel-compatible htree layout).
    done = subprocess.run(["e2fsck", "-fyD", str(image)], capture_output=True, check=False)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"e2fsck -fyD {image}: {done.returncode}\n{done.stdout!r}")
    if spec.finish.startswith("journal"):
        add_pending_journal(image, checksums=spec.finish == "journal-csum",
                            workdir=image.parent)
    elif spec.finish == "ea-inode":
        add_ea_inode_values(image, image.parent)
    return image


def build_seed_images(workdir: Path,
                      specs: tuple[SeedSpec, ...] = ALL_SEED_SPECS) -> dict[str, Path]:
    """Every seed image, built once into `workdir` (reused when already there). A seed
    this machine cannot build is left out, its reason in UNAVAILABLE (and on stderr)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tree = workdir / "tree"
    if not tree.exists():
        build_seed_tree(tree)
    images = {}
    for spec in specs:
        image = workdir / f"{spec.name}.img"
        if not image.exists():
            try:
                build_seed_image(spec, tree, image.with_suffix(".tmp"))
            except SeedUnavailable as why:
                UNAVAILABLE[spec.name] = str(why)
                print(f"seed {spec.name} left out: {why}", file=sys.stderr)
                image.with_suffix(".tmp").unlink(missing_ok=True)
                continue
            image.with_suffix(".tmp").rename(image)
        images[spec.name] = image
    return images
