"""chown(path, -1, -1) changes nothing but ctime, as the kernel's ext4 does (issue 17 item 3).

POSIX lets a no-op chown leave ctime alone; Linux stamps it (chown_common
always asks for ATTR_CTIME) and the kernel is the reference. Through FUSE
the request arrives as a SETATTR naming no attribute at all (the kernel only
passes ctime along with the writeback cache), so the server must read an
empty SETATTR as "ctime is now". Compared with the kernel on a file, a
directory, a symlink (lchown), through a descriptor (fchown) and on a
set-user-ID file (whose bit any chown clears, even root's); and
utimensat with both times UTIME_OMIT, which changes nothing, ctime included.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from rw_support import (
    UTIME_OMIT,
    assert_same_on_both,
    make_image,
    skip_unless_possible,
    utimensat,
)

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

# The kernel's file times come from a coarse clock (a tick of up to 10 ms).
CLOCK_TICK_NS = 20_000_000


def _after_a_tick(ctime_ns: int) -> None:
    """Return once the clock has moved a coarse tick past `ctime_ns`."""
    while time.time_ns() < ctime_ns + CLOCK_TICK_NS:
        time.sleep(0.005)


def _no_op_chowns(root: Path) -> list[object]:
    (root / "file").write_bytes(b"data")
    (root / "dir").mkdir()
    (root / "link").symlink_to("file")
    (root / "setuid").write_bytes(b"#!")
    os.chmod(root / "setuid", 0o4755)
    (root / "by-fd").write_bytes(b"fd")
    (root / "omitted").write_bytes(b"times")
    paths = ("file", "dir", "link", "setuid", "by-fd", "omitted")
    before = {name: os.lstat(root / name) for name in paths}
    _after_a_tick(max(st.st_ctime_ns for st in before.values()))
    os.chown(root / "file", -1, -1)
    os.chown(root / "dir", -1, -1)
    os.lchown(root / "link", -1, -1)
    os.chown(root / "setuid", -1, -1)
    fd = os.open(root / "by-fd", os.O_RDONLY)
    try:
        os.fchown(fd, -1, -1)
    finally:
        os.close(fd)
    # Not a change at all: the kernel leaves ctime alone here.
    utimensat(root / "omitted", (0, UTIME_OMIT), (0, UTIME_OMIT))
    obs: list[object] = []
    for name in paths:
        st = os.lstat(root / name)
        old = before[name]
        obs.append((name, "ctime moved" if st.st_ctime_ns > old.st_ctime_ns else "ctime kept",
                    "mtime kept" if st.st_mtime_ns == old.st_mtime_ns else "mtime moved",
                    oct(st.st_mode), st.st_uid, st.st_gid))
    return obs


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skip_unless_possible()
    return make_image(tmp_path_factory.mktemp("chown") / "chown.img", 32)


def test_no_op_chown_stamps_ctime_as_the_kernel(tmp_path: Path, image: Path) -> None:
    observations = assert_same_on_both(tmp_path, image, _no_op_chowns)
    # The comparison means something only if the kernel did move ctime.
    moved = {obs[0] for obs in observations if obs[1] == "ctime moved"}
    assert moved == {"file", "dir", "link", "setuid", "by-fd"}, observations
