"""bench/profile_server.py's sampler and summary on a real server: py-spy wraps
`ext4box serve`, a create workload runs through the mount, and the summary
finds the samples where the handlers and the ext4 code are."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.serve import ext4box_argv, served, why_no_fuse

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import profile_server as bench_profile  # noqa: E402


def test_sampled_server_profile_shows_the_create_path(tmp_path: Path) -> None:
    if (why := why_no_fuse()) is not None:
        pytest.skip(why)
    if bench_profile.py_spy() is None:
        pytest.skip("py-spy is not installed (the test extra installs it)")
    image = tmp_path / "p.img"
    with image.open("wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    sampler = bench_profile.Sampler(tmp_path, rate=500)
    mnt = tmp_path / "mnt"
    with served(image, mnt, sampler(ext4box_argv(image, mnt, "rw"))):
        for i in range(1500):
            os.close(os.open(mnt / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout
    (raw,) = sampler.made
    profile = bench_profile.Profile()
    profile.add_raw(raw)
    assert profile.busy > 0 and profile.samples == profile.busy + profile.idle + profile.startup
    assert sum(profile.by_category.values()) == profile.busy
    assert profile.by_category["ext4 format code (ext4box/ext4)"] > 0
    assert any(name.endswith(".create (ext4box/fuse/changes.py)") and count > 0
               for name, count in profile.inclusive.items()), profile.inclusive.most_common(20)
    text = "\n".join(bench_profile.render("create", [], profile))
    assert "| ext4 format code (ext4box/ext4) |" in text
