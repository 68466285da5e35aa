"""Shared by the security regression tests (issue 14): real local users, a
policy and an image in a directory every user can reach, and the helper run
as root in a child process."""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.helper_support import REPO

STRANGER = "ext4box-stranger"  # an ordinary local user with no business here
ALICE = "ext4box-alice"  # a user who owns a mountpoint
SERVER = "ext4box-server"  # stands for the server's uid in hand-off tests


def local_user(name: str) -> pwd.struct_passwd:
    """A real local user, created with useradd if missing (root only)."""
    if os.geteuid() != 0:
        pytest.skip("creating test users needs root")
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    proc = subprocess.run(["useradd", "--create-home", name], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot create user {name}: {proc.stderr.strip()}")
    return pwd.getpwnam(name)


def make_image(path: Path, files: dict[str, str], size: str = "8M") -> Path:
    source = path.parent / f"{path.name}.src"
    source.mkdir()
    for name, text in files.items():
        (source / name).write_text(text)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(source), str(path), size], check=True)
    path.chmod(0o644)
    return path


def write_policy(directory: Path, text: str) -> Path:
    directory.mkdir(mode=0o755, exist_ok=True)
    directory.chmod(0o755)
    (directory / "10-test.toml").write_text(textwrap.dedent(text))
    (directory / "10-test.toml").chmod(0o644)
    return directory


def ext4box_root(*args: str, env: dict[str, str] | None = None,
                 **kw) -> subprocess.Popen[str]:  # fmt: skip
    """Start `ext4box ARGS` as root (this interpreter), output captured."""
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "EXT4BOX_LOG_FORMAT": "json",
                   "PYTHONPATH": str(REPO / "app"), **(env or {})}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "ext4box", *args],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        **kw,
    )


def fuse_mounts() -> list[str]:
    """Mountpoints of every fuse.ext4box mount in our namespace."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["fuse.ext4box"]:
            out.append(left.split()[4].replace("\\040", " "))
    return out


def detach_fuse_mounts_under(root: Path) -> None:
    """Never leave a mount behind: lazily unmount every ext4box mount under root."""
    for where in fuse_mounts():
        if where == str(root) or where.startswith(f"{root}/"):
            subprocess.run(["umount", "-l", where], capture_output=True, check=False)


@contextlib.contextmanager
def scratch_root() -> Iterator[Path]:
    """A scratch directory every test user can traverse, unmounted and removed after."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="ext4box-sec-"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        detach_fuse_mounts_under(root)
        shutil.rmtree(root, ignore_errors=True)
