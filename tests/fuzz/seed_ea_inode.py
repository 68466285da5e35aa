"""A seed image with xattr values in EA inodes, written by the kernel.

mkfs.ext4 -O ea_inode builds the seed tree, then the kernel's ext4 (a loop
mount) sets large values with setxattr(2), as setfattr does: values larger
than the kernel's in-inode/in-block limit go to EA inodes. One value is set
on two files (the kernel shares one EA inode between them, refcount 2), one
spans 60,000 bytes (near the VFS maximum of 64 KiB, which a 1 KiB-block
journal of this size cannot take in one transaction: the kernel warns and
answers ENOSPC), one sits on a directory. The kernel stamps times and generation
numbers itself, so unlike the mkfs/debugfs seeds this one is not the same
byte for byte on every build (the layout is); fuzz finds on it become crafted
cases rather than replayed programs.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from support.kernel import kernel_mount, why_no_kernel_mounts

_SEED = 6_0005

# (path in the seed tree, xattr name, value size); equal sizes with the same tag share a value.
EA_VALUES: tuple[tuple[str, str, int], ...] = (
    ("hello.txt", "user.ea-4k", 4000),
    ("data/medium.bin", "user.ea-big", 30_000),
    ("a/b/c/d/deep.txt", "user.ea-shared", 2000),
    ("many/entry-with-a-longish-name-001", "user.ea-shared", 2000),
    ("empty-dir", "trusted.ea-dir", 1500),
    ("data/sparse.bin", "user.ea-large", 60_000),
)


class SeedUnavailable(Exception):
    """The seed needs something this machine lacks (the reason is the message)."""


def ea_value(name: str, size: int) -> bytes:
    """The deterministic value of one EA-inode xattr."""
    return random.Random(f"{_SEED}-{name}-{size}").randbytes(size)


def add_ea_inode_values(image: Path, workdir: Path) -> None:
    reason = why_no_kernel_mounts()
    if reason is not None:
        raise SeedUnavailable(f"the EA-inode seed is written by a kernel mount: {reason}")
    with kernel_mount(image, workdir / "ea-mnt", readonly=False) as mnt:
        for rel, name, size in EA_VALUES:
            os.setxattr(mnt / rel, name, ea_value(name, size))
    (workdir / "ea-mnt").rmdir()
    done = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the EA-inode seed is not clean:\n{done.stdout}")
