"""Directory stress at the issue's scale: N creates and N deletes in one directory.

    EXT4BOX_DIR_STRESS_ENTRIES=50000 pytest tests/rw/test_rw_dir_stress.py

Through `ext4box serve -o rw`: create N entries in one directory (the htree
splits leaves and grows an index level), delete two thirds of them in random
order, create N/3 new names into the freed space, check the listing, then
delete everything and remove the directory. In between, an unmount +
`e2fsck -fn` + kernel listing checks the half-way state; at the end the
image must be e2fsck-clean again and the kernel must agree the directory is
gone. The default CI size is small (a couple of seconds); the issue's 50,000
runs in minutes.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest
from rw_support import assert_fsck_clean, kernel_view, make_image, rw_mount, skip_unless_possible

from support.images import htree_levels

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

ENTRIES = int(os.environ.get("EXT4BOX_DIR_STRESS_ENTRIES", "1000"))


def _name(i: int) -> str:
    # Varying lengths: leaves hold different numbers of entries, splits land unevenly.
    return f"stress-{i:06d}-{'n' * (i % 37)}"


def test_creates_and_deletes_in_one_directory(tmp_path: Path) -> None:
    skip_unless_possible()
    count = max(ENTRIES, 10)
    size_mb = 32 + count // 500
    image = make_image(tmp_path / "dir.img", size_mb, "-N", str(count + count // 3 + 1000))
    rng = random.Random(50_000)
    names = [_name(i) for i in range(count)]
    with rw_mount(image, tmp_path / "mnt") as handle:
        big = handle.mountpoint / "big"
        big.mkdir()
        for name in names:
            os.mknod(big / name, stat.S_IFREG | 0o644)
        removed = rng.sample(names, count * 2 // 3)
        for name in removed:
            os.unlink(big / name)
        refill = [_name(count + i) for i in range(count // 3)]
        for name in refill:
            os.mknod(big / name, stat.S_IFREG | 0o600)
        expected = sorted((set(names) - set(removed)) | set(refill))
        assert sorted(os.listdir(big)) == expected
    assert_fsck_clean(image)
    assert htree_levels(image, "big") is not None, "the directory was never indexed"
    with kernel_view(image, tmp_path / "kmnt") as root:
        assert sorted(os.listdir(root / "big")) == expected
    with rw_mount(image, tmp_path / "mnt") as handle:
        big = handle.mountpoint / "big"
        rng.shuffle(expected)
        for name in expected:
            os.unlink(big / name)
        assert os.listdir(big) == []
        os.rmdir(big)
    assert_fsck_clean(image)
    with kernel_view(image, tmp_path / "kmnt") as root:
        assert os.listdir(root) == ["lost+found"]
