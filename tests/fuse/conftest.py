"""Fixtures for the FUSE server tests: real images, real mounts.

An image is built with `mkfs.ext4 -d` over a tree made here; the same image is
loop-mounted read-only by the kernel (the reference) and served by
`ext4box serve` (the subject).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import build_tree, kernel_mount, mkfs, served


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop mounts, mount(2) for FUSE)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for tool in ("mkfs.ext4", "debugfs", "setfacl"):
        if shutil.which(tool) is None:
            return f"missing {tool}"
    return None


@pytest.fixture(scope="session")
def fuse_env() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def source_tree(tmp_path_factory: pytest.TempPathFactory, fuse_env: None) -> Path:
    root = tmp_path_factory.mktemp("fuse-tree") / "tree"
    build_tree(root)
    return root


@pytest.fixture(scope="session")
def image(source_tree: Path) -> Path:
    return mkfs(source_tree, source_tree.parent / "image.ext4", "32M", "-b", "4096")


@pytest.fixture(scope="session")
def mounts(image: Path) -> Iterator[tuple[Path, Path]]:
    """(ext4box mount, kernel mount) of the same image for the whole session."""
    base = image.parent
    with kernel_mount(image, base / "kernel") as kernel, served(image, base / "fuse") as server:
        yield server.mountpoint, kernel
