"""swapon(2) on a file of an ext4box mount: refused, and nothing changes.

The kernel's ext4 takes a swapfile (it has swap_activate). A FUSE file has
neither swap_activate nor a usable bmap on a /dev/fuse mount: fs/fuse's
fuse_bmap answers 0 unless the superblock has a block device (fuseblk), so
swapon's generic_swapfile_activate sees block 0 for the first page, logs
"swapon: swapfile has holes" and fails with EINVAL. Nothing reaches the
server, so nothing a server could do changes this: fstests'
_require_scratch_swapfile answers "swapfiles are not supported" and its cases
(generic/356, 357, 370, 472, 493-497, 554, 569, 636, 641 of the quick group)
are not run through FUSE.

What is checked on ext4box: swapon answers EINVAL, /proc/swaps does not list
the file, the file's bytes are what mkswap wrote, and the image is e2fsck
clean. Swap is never left on: a swapon that succeeds is undone at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from rw_support import make_image, rw_session, skip_unless_possible

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

SWAP_BYTES = 8 * 1024 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _swap_lines() -> list[str]:
    return Path("/proc/swaps").read_text().splitlines()[1:]


def _swapon(path: Path) -> int:
    """swapon(2)'s errno (0: it worked, and the swap area is already off again)."""
    if _libc.swapon(os.fsencode(path), 0) == 0:
        _libc.swapoff(os.fsencode(path))  # never leave swap on a shared machine
        return 0
    return ctypes.get_errno()


def test_swapon_refused_on_a_fuse_file(tmp_path: Path) -> None:
    skip_unless_possible()
    if shutil.which("mkswap") is None:
        pytest.skip("mkswap not installed")
    image = make_image(tmp_path / "swap.img", 32, "-b", "4096")
    swaps_before = _swap_lines()
    with rw_session(tmp_path, image) as root:
        swapfile = root / "swapfile"
        with swapfile.open("wb") as f:
            f.write(bytes(SWAP_BYTES))  # written out: no holes, as swapon wants
        os.chmod(swapfile, 0o600)
        subprocess.run(["mkswap", str(swapfile)], check=True, capture_output=True)
        digest = hashlib.sha256(swapfile.read_bytes()).hexdigest()

        err = _swapon(swapfile)

        assert err == errno.EINVAL, f"swapon gave {errno.errorcode.get(err, err)}"
        assert _swap_lines() == swaps_before
        assert hashlib.sha256(swapfile.read_bytes()).hexdigest() == digest
        assert os.stat(swapfile).st_size == SWAP_BYTES
