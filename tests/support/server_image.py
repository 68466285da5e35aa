"""The ext4box server image, built once per test session for every suite that runs it."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOST_PACKAGES = ("podman", "runc", "uidmap", "catatonit")


@functools.cache
def _build() -> str:
    start = time.monotonic()
    build = subprocess.run(
        ["bash", str(REPO / "scripts/build-image.sh")],
        capture_output=True,
        text=True,
        timeout=800,
        env={**os.environ, "EXT4BOX_PYTHON": sys.executable},
    )
    assert build.returncode == 0, build.stderr[-3000:]
    ref = build.stdout.strip().splitlines()[-1]
    print(f"\nbuilt {ref} in {time.monotonic() - start:.1f} s")
    return ref


def server_image() -> str:
    """Install podman if needed and build localhost/ext4box:VERSION (the cached base
    tarball keeps this to seconds); skip with a printed reason where that can't work.
    The build runs once per session: the appliance and deployment suites share it."""
    if os.geteuid() != 0:
        reason = "building the server image needs root (debootstrap, rootful podman)"
        print(reason)
        pytest.skip(reason)
    deps = subprocess.run(
        ["bash", str(REPO / "scripts/install-deps.sh"), *HOST_PACKAGES],
        capture_output=True,
        text=True,
    )
    if deps.returncode != 0 or not shutil.which("podman"):
        reason = f"podman cannot be installed: {deps.stderr.strip()[-300:]}"
        print(reason)
        pytest.skip(reason)
    return _build()
