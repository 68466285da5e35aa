"""Shared by the deployment tests: the server image, podman's environment, a scene.

Everything real: the image is built with scripts/build-image.sh (cached base),
the ext4 image is made by mkfs.ext4 -d, mounts are kernel FUSE mounts made by
the helper, and reads go through the kernel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.helper_support import podman_env as appliance_podman_env
from support.server_image import default_server_image as tag_as_default
from support.server_image import server_image as build_server_image

REPO = Path(__file__).resolve().parents[2]
HELLO = "hello from a deployment\n"


def podman_env() -> dict[str, str]:
    """podman's environment for root, with this venv's tools (podman-compose) first."""
    return appliance_podman_env(path_first=str(Path(sys.executable).parent))


def run(*argv: str, check: bool = False, timeout: float = 120, **kw):
    env = {**podman_env(), **kw.pop("env", {})}
    proc = subprocess.run(
        list(argv), env=env, capture_output=True, text=True, timeout=timeout, cwd="/", **kw
    )
    if check:
        assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return proc


def fuse_mounted(path: Path) -> bool:
    return any(
        line.split()[4] == str(path) and " - fuse.ext4box " in line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


@pytest.fixture(scope="session")
def server_image() -> str:
    return build_server_image()


@pytest.fixture
def default_server_image() -> str:
    """This checkout's image under the name shipped text uses (localhost/ext4box:VERSION)."""
    return tag_as_default()


@dataclass(frozen=True, slots=True)
class Scene:
    root: Path
    source: Path
    images: Path  # holds disk.img
    policy: Path
    handoff: Path
    mnt: Path  # a shared mount point (mount propagation from containers)


POLICY = """\
[[rule]]
name = "deployment"
images = ["{images}/*.img"]
users = ["root"]
mountpoints = ["{mountpoint}"]
flags = ["allow_other"]
max_size = "64M"
refuse_features = ["needs_recovery", "encrypt", "casefold"]
"""


@contextlib.contextmanager
def make_scene(images_seen_as: str, mountpoint_seen_as: str) -> Iterator[Scene]:
    """A source tree, its image, a policy for the helper's view of the paths, and
    a mount directory made a shared mount (the host's / is private here)."""
    root = Path(tempfile.mkdtemp(prefix="ext4box-deploy-"))
    mnt = root / "mnt"
    shared = False
    try:
        root.chmod(0o755)
        source = root / "source"
        (source / "sub").mkdir(parents=True)
        (source / "hello.txt").write_text(HELLO)
        (source / "sub/data.bin").write_bytes(os.urandom(200_000))
        (source / "link").symlink_to("hello.txt")
        images = root / "images"
        images.mkdir()
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(source), str(images / "disk.img"),
                        "8M"], check=True)  # fmt: skip
        policy = root / "policy"
        policy.mkdir()
        (policy / "10-deploy.toml").write_text(
            POLICY.format(images=images_seen_as, mountpoint=mountpoint_seen_as)
        )
        handoff = root / "handoff"
        handoff.mkdir(mode=0o711)
        handoff.chmod(0o711)
        mnt.mkdir()
        run("mount", "--bind", str(mnt), str(mnt), check=True)
        shared = True
        run("mount", "--make-shared", str(mnt), check=True)
        yield Scene(root, source, images, policy, handoff, mnt)
    finally:
        # Never leave a mount behind, whatever failed.
        while fuse_mounted(mnt):
            if run("umount", str(mnt)).returncode != 0:
                run("umount", "-l", str(mnt))
        if shared:
            run("umount", str(mnt))
        shutil.rmtree(root, ignore_errors=True)


def e2fsck_clean(image: Path) -> None:
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def same_tree(mounted: Path, source: Path) -> None:
    """Every file, link and directory of the source, read back through the mount."""
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        seen = mounted / rel
        if path.is_symlink():
            assert os.readlink(seen) == os.readlink(path), rel
        elif path.is_dir():
            assert seen.is_dir(), rel
        else:
            assert seen.read_bytes() == path.read_bytes(), rel
    names = {p.relative_to(mounted) for p in mounted.rglob("*")}
    names = {n for n in names if n.parts[0] != "lost+found"}
    assert names == {p.relative_to(source) for p in source.rglob("*")}


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip()
