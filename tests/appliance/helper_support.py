"""Shared by the host-helper tests: an unprivileged user, and running things as it."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTLESS_USER = os.environ.get("EXT4BOX_ROOTLESS_USER", "ext4box-rootless")
# The test venv's interpreter lives under /root here (mode 0700); an
# unprivileged user runs Debian's python3 (same 3.11 ABI) on our sources and
# the venv's site-packages instead.
USER_PYTHON = "/usr/bin/python3"
SITE_PACKAGES = next((REPO / ".venv/lib").glob("python3*/site-packages"), None)


def rootless_user() -> pwd.struct_passwd:
    """The test user (created if missing), skipping when it cannot be."""
    if os.geteuid() != 0:
        pytest.skip("creating and switching to a test user needs root")
    try:
        return pwd.getpwnam(ROOTLESS_USER)
    except KeyError:
        pass
    proc = subprocess.run(
        ["useradd", "--create-home", ROOTLESS_USER], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot create {ROOTLESS_USER}: {proc.stderr.strip()}")
    return pwd.getpwnam(ROOTLESS_USER)


def runtime_dir(user: pwd.struct_passwd) -> Path:
    path = Path(f"/tmp/ext4box-run-{user.pw_uid}")
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(0o700)
    return path


def user_env(user: pwd.struct_passwd) -> dict[str, str]:
    if not os.path.exists(USER_PYTHON) or SITE_PACKAGES is None:
        pytest.skip(f"{USER_PYTHON} or the venv's site-packages is missing")
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": user.pw_dir,
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "XDG_RUNTIME_DIR": str(runtime_dir(user)),
        "PYTHONPATH": f"{REPO / 'app'}:{SITE_PACKAGES}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "EXT4BOX_LOG_FORMAT": "json",
    }


def as_user(user: pwd.struct_passwd | None) -> list[str]:
    """The command prefix that runs as `user` (nothing for None: as root)."""
    if user is None:
        return []
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]


def podman_env(user: pwd.struct_passwd | None = None, *,
               path_first: str | None = None) -> dict[str, str]:
    """What scripts/podman-env.sh exports, for root or for `user` (rootless
    storage, its own runtime dir); `path_first` goes before the system PATH."""
    path = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    env = {
        "PATH": f"{path_first}:{path}" if path_first else path,
        "CONTAINERS_CONF": str(REPO / "compose/containers.conf"),
        "HOME": os.environ.get("HOME", "/root"),
    }
    if user is not None:
        env.update(
            HOME=user.pw_dir,
            USER=user.pw_name,
            XDG_RUNTIME_DIR=str(runtime_dir(user)),
            CONTAINERS_STORAGE_CONF=str(REPO / "compose/storage-rootless.conf"),
        )
    return env


def podman(*args: str, user: pwd.struct_passwd | None = None, check: bool = True,
           timeout: float = 300, **kw) -> subprocess.CompletedProcess[str]:
    """Run podman (as root, or as `user`) with podman_env."""
    return subprocess.run(
        [*as_user(user), "podman", *args],
        env=podman_env(user),
        capture_output=True,
        text=True,
        check=check,
        cwd="/",
        timeout=timeout,
        **kw,
    )


def run_as(user: pwd.struct_passwd, *argv: str, timeout: float = 120, **kw):
    env = {**user_env(user), **kw.pop("env", {})}
    return subprocess.run(
        [*as_user(user), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        **kw,
    )


def ext4box_as(user: pwd.struct_passwd, *args: str, **kw):
    return run_as(user, USER_PYTHON, "-m", "ext4box", *args, **kw)


@contextlib.contextmanager
def fuse_access(user: pwd.struct_passwd) -> Iterator[None]:
    """/dev/fuse is 0600 here: grant the user rw with an ACL, removed afterwards."""
    if not shutil.which("setfacl"):
        pytest.skip("setfacl is not installed (package acl)")
    entry = f"u:{user.pw_uid}"
    proc = subprocess.run(
        ["setfacl", "-m", f"{entry}:rw", "/dev/fuse"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot grant /dev/fuse access: {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["setfacl", "-x", entry, "/dev/fuse"], check=False)


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A scratch directory the test user can reach (pytest's basetemp is 0700)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ext4box-helper-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
