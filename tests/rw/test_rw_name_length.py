"""Names longer than ext4's 255 bytes: every path operation, kernel vs ext4box.

The kernel passes FUSE names up to 1024 bytes to the server, so the 255-byte
limit is ext4box's to enforce. Lookups matter most: a stat of a 256-byte name
must say ENAMETOOLONG as the kernel's ext4 does, not ENOENT. Each operation
is tried with a 255-byte name (allowed) and a 256- and 1000-byte one, on a
kernel rw mount and an ext4box rw mount of copies of one image; the errno
names (or results) must be the same, and both images e2fsck-clean.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from rw_support import attempt, make_image, on_both, skip_unless_possible

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

LENGTHS = (255, 256, 1000)


def _scenario(root: Path) -> list[tuple]:
    (root / "dir").mkdir()
    (root / "dir" / "file").write_bytes(b"x")
    (root / "dir" / "sub").mkdir()
    seen: list[tuple] = []
    for length in LENGTHS:
        name = "n" * length
        target = root / "dir" / name

        def stat_mode(path: Path) -> int:
            return stat.S_IFMT(os.lstat(path).st_mode)

        seen.append((length, "lookup", attempt(stat_mode, target)))
        seen.append((length, "create", attempt(
            lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)), target)))
        seen.append((length, "lookup-after", attempt(stat_mode, target)))
        seen.append((length, "unlink", attempt(os.unlink, target)))
        seen.append((length, "mkdir", attempt(os.mkdir, target, 0o755)))
        seen.append((length, "rmdir", attempt(os.rmdir, target)))
        seen.append((length, "mknod", attempt(os.mknod, target, 0o644 | stat.S_IFIFO)))
        seen.append((length, "unlink-node", attempt(os.unlink, target)))
        seen.append((length, "symlink", attempt(os.symlink, "file", target)))
        seen.append((length, "unlink-symlink", attempt(os.unlink, target)))
        seen.append((length, "link", attempt(os.link, root / "dir" / "file", target)))
        seen.append((length, "unlink-link", attempt(os.unlink, target)))
        seen.append((length, "rename-to", attempt(os.rename, root / "dir" / "file", target)))
        seen.append((length, "rename-back", attempt(os.rename, target, root / "dir" / "file")))
        seen.append((length, "rename-dir-to", attempt(os.rename, root / "dir" / "sub", target)))
        seen.append((length, "rename-dir-back",
                     attempt(os.rename, target, root / "dir" / "sub")))
    seen.append(("listing", sorted(len(n) for n in os.listdir(root / "dir"))))
    return seen


def test_long_names_get_enametoolong_as_on_the_kernel(tmp_path: Path) -> None:
    skip_unless_possible()
    image = make_image(tmp_path / "base.img", 16)
    (kernel_obs, kernel_tree), (ours_obs, ours_tree) = on_both(tmp_path, image, _scenario)
    assert ours_obs == kernel_obs
    assert kernel_tree == ours_tree
    # The kernel really refused the long names (not both sides equally accepting).
    by_step = {(entry[0], entry[1]): entry[2] for entry in kernel_obs if len(entry) == 3}
    assert by_step[(256, "lookup")] == "ENAMETOOLONG"
    assert by_step[(1000, "create")] == "ENAMETOOLONG"
    assert by_step[(255, "create")] is None
