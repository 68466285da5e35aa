"""open(O_TMPFILE) through FUSE_TMPFILE, against the kernel's ext4 (fstests generic/004, 389, 509).

ext4_tmpfile makes a regular inode with no name and no links and puts it on
the orphan list; linkat(AT_EMPTY_PATH) gives it a name and takes it off the
list (through /proc/self/fd both mounts answer EXDEV in the test's mount
namespace); a last close without a link frees it; after a crash the next
read-write mount frees it. Each scenario runs on a kernel
rw loop mount and an ext4box rw mount of copies of one image: results,
nlink, sizes, st_blocks, contents and the final trees must be the same, both
images e2fsck -fn clean. pyfuse3 has no tmpfile handler (the kernel answers
EOPNOTSUPP there): native transport only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rw_support import (
    assert_fsck_clean,
    assert_same_on_both,
    attempt,
    make_image,
    skip_unless_possible,
    syncfs,
)

from support.kernel import kernel_mount
from support.serve import ext4box_argv, fuse_backend, served

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
PAYLOAD = b"tmpfile contents " * 1000

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skip_unless_possible()
    if fuse_backend() != "native":
        pytest.skip(f"pyfuse3 has no tmpfile handler (EXT4BOX_TEST_BACKEND={fuse_backend()})")
    return make_image(tmp_path_factory.mktemp("tmpfile") / "base.img", 32, "-b", "4096")


def link_fd(fd: int, path: Path) -> None:
    """linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH): give an open file a name."""
    if _libc.linkat(fd, b"", AT_FDCWD, os.fsencode(path), AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def _state(fd: int) -> tuple[int, int, int, int, str]:
    os.fsync(fd)  # settle delayed allocation on the kernel side
    st = os.fstat(fd)
    content = os.pread(fd, st.st_size + 1, 0)
    return (st.st_nlink, st.st_mode, st.st_size, st.st_blocks,
            hashlib.sha256(content).hexdigest()[:16])  # fmt: skip


def _free(root: Path) -> tuple[int, int]:
    syncfs(root)  # the kernel's delayed allocation settled
    st = os.statvfs(root)
    return st.f_bfree, st.f_ffree


def test_tmpfile_link_and_close_match_the_kernel(tmp_path: Path, image: Path) -> None:
    def scenario(root: Path) -> list:
        (root / "sub").mkdir()
        out: list = [_free(root)]
        # Linked in a subdirectory, written before and after.
        fd = os.open(root / "sub", os.O_TMPFILE | os.O_RDWR, 0o640)
        os.write(fd, PAYLOAD)
        out.append(_state(fd))
        out.append(attempt(link_fd, fd, root / "sub" / "named"))
        os.write(fd, b"after the link")
        out.append(_state(fd))
        os.close(fd)
        # Two names given to one tmpfile.
        fd = os.open(root, os.O_TMPFILE | os.O_RDWR, 0o600)
        os.write(fd, PAYLOAD[:5000])
        out.append(attempt(link_fd, fd, root / "empty-path"))
        out.append(attempt(link_fd, fd, root / "second"))
        out.append(_state(fd))
        os.close(fd)
        # Closed without a name: freed (the free counts come back).
        before = _free(root)
        fd = os.open(root, os.O_TMPFILE | os.O_RDWR, 0o600)
        os.write(fd, PAYLOAD * 4)
        out.append(_state(fd))
        os.close(fd)
        out.append(_free(root) == before)
        # O_EXCL: never linkable (the VFS refuses).
        fd = os.open(root, os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
        out.append(attempt(link_fd, fd, root / "excl"))
        os.close(fd)
        # Not a directory, and a read-only open with O_TMPFILE, as the VFS answers.
        out.append(attempt(os.open, root / "second", os.O_TMPFILE | os.O_RDWR, 0o600))
        out.append(attempt(os.open, root, os.O_TMPFILE | os.O_RDONLY, 0o600))
        return out

    observations = assert_same_on_both(tmp_path, image, scenario)
    assert observations[1][0] == 0  # no link before linkat
    assert observations[2] is None and observations[3][0] == 1
    assert observations[6][0] == 2


_HOLD_TMPFILE = """
import os, sys
fd = os.open(sys.argv[1], os.O_TMPFILE | os.O_RDWR, 0o600)
os.write(fd, b"x" * 300000)
os.fsync(fd)
print("ready", flush=True)
sys.stdin.read()
"""


def _free_counts(image: Path, mountpoint: Path) -> tuple[int, int]:
    with kernel_mount(image, mountpoint, readonly=True) as root:
        st = os.statvfs(root)
        return st.f_bfree, st.f_ffree


def test_tmpfile_open_at_a_crash_is_freed_at_the_next_mount(tmp_path: Path, image: Path) -> None:
    crashed = tmp_path / "crashed.img"
    shutil.copyfile(image, crashed)
    empty = _free_counts(image, tmp_path / "vmnt")
    mnt = tmp_path / "mnt"
    with served(crashed, mnt, ext4box_argv(crashed, mnt, "rw"), expect_exit_zero=False) as handle:
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", _HOLD_TMPFILE, str(mnt)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        handle.process.kill()  # the fsync made the orphan list durable
        handle.process.wait()
        child.kill()
        child.wait(timeout=60)
    # A killed server leaves a dead mount (ENOTCONN) that served() cannot see.
    if any(line.split()[1] == str(mnt) for line in Path("/proc/mounts").read_text().splitlines()):
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    # The kernel and ext4box each mount a copy read-write and free the orphan.
    by_kernel = tmp_path / "kernel.img"
    shutil.copyfile(crashed, by_kernel)
    with kernel_mount(by_kernel, tmp_path / "kmnt", readonly=False):
        pass
    again = tmp_path / "mnt2"  # the killed server's mount may linger at `mnt`
    with served(crashed, again, ext4box_argv(crashed, again, "rw")):
        pass
    assert_fsck_clean(by_kernel)
    assert_fsck_clean(crashed)
    assert _free_counts(crashed, tmp_path / "vmnt") == _free_counts(by_kernel, tmp_path / "vmnt")
    assert _free_counts(crashed, tmp_path / "vmnt") == empty
