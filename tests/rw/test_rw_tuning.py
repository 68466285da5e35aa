"""Tuning a read-write mount after FUSE_INIT (ext4box.bdi) must never make the
server look up its own mountpoint: on a rw mount the root's attributes expire
after 1 s, and a lookup then waits for the very loop that is making it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from rw_support import make_image, rw_mount, skip_unless_possible

from ext4box.bdi import READ_AHEAD_KB

pytestmark = pytest.mark.fuse


def test_server_answers_after_tuning_a_rw_mount(tmp_path: Path) -> None:
    skip_unless_possible()
    image = make_image(tmp_path / "t.img")
    with rw_mount(image, tmp_path / "mnt") as served:
        root = served.mountpoint
        time.sleep(2.5)  # past the attribute timeout and both tuning passes
        # In a child with a timeout: a deadlocked server would hang this process.
        result = subprocess.run(["stat", "-c", "%i", str(root)], capture_output=True,
                                text=True, timeout=20, check=False)
        assert result.returncode == 0 and result.stdout.strip() == "2", result.stderr
        (root / "f").write_bytes(b"still served")
        dev = os.stat(root).st_dev
        setting = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        if os.geteuid() == 0:
            assert setting.read_text().strip() == str(READ_AHEAD_KB)
