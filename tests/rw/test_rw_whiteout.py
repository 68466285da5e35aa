"""renameat2(RENAME_WHITEOUT) against the kernel's ext4 (fstests generic/078, 585, 626, 700).

The kernel's fuse_rename2 forwards RENAME_WHITEOUT in FUSE_RENAME2 (it allows
NOREPLACE, EXCHANGE and WHITEOUT); the VFS has already refused it without
CAP_MKNOD and together with EXCHANGE. ext4 creates the whiteout first (a
character device 0:0 with mode 0, owned by the caller as any new inode) and
points the source's entry at it, so the rename and the whiteout happen
together or not at all. Each scenario runs on a kernel rw loop mount and an
ext4box rw mount of copies of one image: errnos, what lstat shows of both
names and the final trees must be the same, both images e2fsck -fn clean.
pyfuse3 passes the flag too, but ext4box serves it on the native transport
only.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from rw_support import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    assert_same_on_both,
    attempt,
    make_image,
    renameat2,
    skip_unless_possible,
)

from support.serve import fuse_backend

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

RENAME_WHITEOUT = 4


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skip_unless_possible()
    if fuse_backend() != "native":
        pytest.skip(f"RENAME_WHITEOUT is served on the native transport only "
                    f"(EXT4BOX_TEST_BACKEND={fuse_backend()})")  # fmt: skip
    return make_image(tmp_path_factory.mktemp("whiteout") / "base.img", 32, "-b", "4096")


def _lstat(path: Path) -> tuple | str:
    try:
        st = os.lstat(path)
    except OSError as exc:
        return exc.strerror or str(exc.errno)
    return oct(st.st_mode), st.st_rdev, st.st_nlink, st.st_uid, st.st_gid, st.st_size


def test_rename_whiteout_matches_the_kernel(tmp_path: Path, image: Path) -> None:
    def scenario(root: Path) -> list:
        out: list = []
        (root / "a").write_bytes(b"first")
        out.append(attempt(renameat2, root / "a", root / "b", RENAME_WHITEOUT))
        out += [_lstat(root / "a"), _lstat(root / "b")]
        # Over an existing name, into another directory, and in a set-group-ID one.
        (root / "d").mkdir()
        os.chown(root / "d", 0, 4321)
        os.chmod(root / "d", 0o2775)
        (root / "d" / "c").write_bytes(b"second")
        (root / "e").write_bytes(b"replaced")
        out.append(attempt(renameat2, root / "d" / "c", root / "e", RENAME_WHITEOUT))
        out += [_lstat(root / "d" / "c"), _lstat(root / "e")]
        # A directory leaves a whiteout too.
        (root / "dir").mkdir()
        (root / "dir" / "inside").write_bytes(b"x")
        out.append(attempt(renameat2, root / "dir", root / "d" / "moved", RENAME_WHITEOUT))
        out += [_lstat(root / "dir"), _lstat(root / "d" / "moved")]
        # Refusals, nothing changed: NOREPLACE onto a name, EXCHANGE, a missing source.
        (root / "f").write_bytes(b"f")
        out.append(attempt(renameat2, root / "f", root / "e",
                           RENAME_WHITEOUT | RENAME_NOREPLACE))  # fmt: skip
        out.append(attempt(renameat2, root / "f", root / "e", RENAME_WHITEOUT | RENAME_EXCHANGE))
        out.append(attempt(renameat2, root / "missing", root / "g", RENAME_WHITEOUT))
        out += [_lstat(root / "f"), _lstat(root / "e")]
        # A whiteout is renamed and unlinked like any device node.
        out.append(attempt(os.rename, root / "a", root / "a2"))
        out.append(attempt(os.unlink, root / "a2"))
        out.append(sorted(os.listdir(root)))
        return out

    observations = assert_same_on_both(tmp_path, image, scenario)
    assert observations[0] is None
    assert observations[1][:2] == (oct(0o020000), 0)  # c--------- 0:0


def test_rename_whiteout_without_a_free_inode_changes_nothing(tmp_path: Path) -> None:
    """generic/626: with every inode in use the whiteout cannot be made, so the rename
    is refused (ENOSPC) and both names stay as they were."""
    skip_unless_possible()
    if fuse_backend() != "native":
        pytest.skip(f"RENAME_WHITEOUT is served on the native transport only "
                    f"(EXT4BOX_TEST_BACKEND={fuse_backend()})")  # fmt: skip
    image = make_image(tmp_path / "few-inodes.img", 16, "-b", "4096", "-N", "64")

    def scenario(root: Path) -> list:
        (root / "src").write_bytes(b"source")
        made = 0
        for made in range(10_000):
            try:
                (root / f"fill{made}").touch()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        out: list = [made > 0]
        out.append(attempt(renameat2, root / "src", root / "dst", RENAME_WHITEOUT))
        out += [_lstat(root / "src"), _lstat(root / "dst")]
        # A plain rename needs no inode and still works.
        out.append(attempt(renameat2, root / "src", root / "dst", 0))
        return out

    observations = assert_same_on_both(tmp_path, image, scenario)
    assert observations[1] == "ENOSPC"
