"""Set-group-ID cleared by an access ACL change, as generic/375 checks.

Usage: the owner of a set-group-ID file who is not in its group (and not
root) changes its access ACL (`setfacl -m u::rwx,g::rwx,o::rwx`), or its
mode with chmod. The kernel's ext4 clears S_ISGID in both cases
(posix_acl_update_mode); ext4box must leave the same mode, on either
transport. Both images end e2fsck-clean.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from rw_support import assert_fsck_clean, make_image, rw_mount, skip_unless_possible

from support.kernel import kernel_mount

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

OWNER, FILE_GROUP = 1000, 3000


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory other users can traverse (the mounts live there)."""
    path = Path(tempfile.mkdtemp(prefix="ext4box-aclsgid-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_owner(*argv: str) -> None:
    subprocess.run(["setpriv", f"--reuid={OWNER}", f"--regid={OWNER}", "--clear-groups",
                    *argv], check=True, capture_output=True, text=True)


def _modes(root: Path) -> dict[str, int]:
    """Mode bits after each change by the owner outside the file's group."""
    cases = {
        "setfacl": ["setfacl", "-m", "u::rwx,g::rwx,o::rwx"],
        "setfacl-named": ["setfacl", "-m", "u:1234:r-x"],
        "chmod": ["chmod", "0777"],
    }
    modes = {}
    for name, argv in cases.items():
        path = root / name
        path.write_bytes(b"x")
        os.chown(path, OWNER, FILE_GROUP)
        os.chmod(path, 0o2775)
        _as_owner(*argv, str(path))
        modes[name] = os.stat(path).st_mode & 0o7777
    return modes


def test_acl_change_clears_sgid_as_kernel(scratch: Path) -> None:
    skip_unless_possible()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing")
    base = make_image(scratch / "base.img", 16)
    theirs, ours = scratch / "kernel.img", scratch / "ours.img"
    shutil.copyfile(base, theirs)
    shutil.copyfile(base, ours)
    with kernel_mount(theirs, scratch / "k", readonly=False) as root:
        expected = _modes(root)
    with rw_mount(ours, scratch / "o") as handle:
        got = _modes(handle.mountpoint)
    assert not expected["setfacl"] & 0o2000  # the kernel's rule, as generic/375 expects
    assert got == expected
    assert_fsck_clean(theirs)
    assert_fsck_clean(ours)
