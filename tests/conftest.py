"""Session-wide fixtures: privilege checks, the per-session image cache, mounts.

The FUSE-side fixtures serve images with `ext4box serve`. Setting
EXT4BOX_TEST_SERVER=fuse2fs runs the same tests against fuse2fs instead, which
checks the test machinery itself against an independent FUSE implementation.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from support.images import ImageCache
from support.kernel import why_no_kernel_mounts
from support.serve import fuse_transport, why_no_fuse
from support.uring import uring_enabled

_TOOLS = ("mkfs.ext4", "debugfs", "dumpe2fs", "e2fsck", "tune2fs", "setfacl")


def pytest_report_header() -> str:
    """Say whether the suite's mounts are out of other namespaces' reach."""
    if os.environ.get("EXT4BOX_TEST_NAMESPACE") == "private":
        return f"mount namespace: private to this run ({os.readlink('/proc/self/ns/mnt')})"
    return (
        "mount namespace: shared with the caller (run through scripts/run-tests.sh "
        "or `make test` so that other namespaces cannot copy our FUSE mounts)"
    )


@pytest.fixture(scope="session")
def need_kernel_mounts() -> None:
    """Skip (with the reason) unless we may loop-mount and build images as root."""
    reason = why_no_kernel_mounts()
    if reason is None:
        missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
        if missing:
            reason = f"missing tools: {', '.join(missing)}"
    if reason is not None:
        pytest.skip(f"kernel reference unavailable: {reason}")


@pytest.fixture(scope="session")
def need_fuse() -> None:
    """Skip (with the reason) unless FUSE mounts are possible."""
    reason = why_no_fuse()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")


@pytest.fixture(scope="session")
def image_cache(
    tmp_path_factory: pytest.TempPathFactory, need_kernel_mounts: None
) -> ImageCache:
    """Variant images built from one rich source tree, each at most once per session."""
    return ImageCache(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session", autouse=True)
def uring_for_a_uring_run() -> Iterator[None]:
    """With EXT4BOX_TEST_TRANSPORT=uring, the kernel's enable_uring is on for the run.

    Put back as it was at the end: it is machine-wide, but it changes nothing
    for a FUSE server that does not ask for io_uring at INIT.
    """
    if fuse_transport() != "uring":
        yield
        return
    with uring_enabled(True) as reason:
        if reason is not None:
            pytest.exit(f"EXT4BOX_TEST_TRANSPORT=uring, but {reason}", returncode=2)
        yield
