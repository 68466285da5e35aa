"""The ext4box server image, built once per test session for every suite that runs it.

Several checkouts (worktrees) on one machine run their tests at the same time,
and root's podman storage is shared between them. So a session never uses the
name users get (localhost/ext4box:VERSION, which any checkout's build
overwrites): it builds localhost/ext4box:VERSION-<hash of what goes into the
image> and hands that reference to the helper and the broker through
EXT4BOX_SERVER_IMAGE. The same sources give the same tag, so a session finds
an image another session built from the same tree and skips the build.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOST_PACKAGES = ("podman", "runc", "uidmap", "catatonit")
IMAGE_REPOSITORY = "localhost/ext4box"
# Everything scripts/build-image.sh puts into the image (README.md is the
# package's description), and the scripts that decide how.
IMAGE_INPUTS = ("app", "Containerfile", "pyproject.toml", "README.md",
                "scripts/build-image.sh", "scripts/build-base.sh")  # fmt: skip
_NOT_INPUTS = ("__pycache__", ".egg-info", ".pyc")


def _version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def default_reference() -> str:
    """The name users get from scripts/build-image.sh and the helper's default."""
    return f"{IMAGE_REPOSITORY}:{_version()}"


def content_tag() -> str:
    """VERSION-<first 16 hex digits of a SHA-256 over the image's inputs>."""
    digest = hashlib.sha256()
    for name in IMAGE_INPUTS:
        top = REPO / name
        files = sorted(top.rglob("*")) if top.is_dir() else [top]
        for path in files:
            relative = path.relative_to(REPO).as_posix()
            if not path.is_file() or any(part in relative for part in _NOT_INPUTS):
                continue
            digest.update(f"{relative}\0{path.stat().st_mode & 0o111:o}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return f"{_version()}-{digest.hexdigest()[:16]}"


def _exists(reference: str) -> bool:
    return subprocess.run(["podman", "image", "exists", reference]).returncode == 0


@functools.cache
def _build() -> str:
    reference = f"{IMAGE_REPOSITORY}:{content_tag()}"
    if _exists(reference):
        print(f"\nusing {reference}: built before from the same sources")
        return reference
    start = time.monotonic()
    build = subprocess.run(
        ["bash", str(REPO / "scripts/build-image.sh")],
        capture_output=True,
        text=True,
        timeout=800,
        env={
            **os.environ,
            "EXT4BOX_PYTHON": sys.executable,
            "EXT4BOX_IMAGE": IMAGE_REPOSITORY,
            "EXT4BOX_IMAGE_TAG": content_tag(),
        },
    )
    assert build.returncode == 0, build.stderr[-3000:]
    built = build.stdout.strip().splitlines()[-1]
    assert built == reference, f"scripts/build-image.sh made {built}, not {reference}"
    print(f"\nbuilt {built} in {time.monotonic() - start:.1f} s")
    return built


def server_image() -> str:
    """Install podman if needed and build this checkout's server image (the cached
    base tarball keeps this to seconds); skip with a printed reason where that
    can't work. Returns its content-tagged reference, for EXT4BOX_SERVER_IMAGE.
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


def default_server_image() -> str:
    """This checkout's image under the users' default name, for the tests of text
    that names it (the README's compose and kube snippets, the k8s manifest, make
    install). Tagged anew right before each such test: another session may have
    pointed the name at its own build meanwhile."""
    built = server_image()
    default = default_reference()
    subprocess.run(["podman", "tag", built, default], check=True, capture_output=True)
    return default
