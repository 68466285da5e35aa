"""End to end: `ext4box mount` → rootless container → files read on the host → umount.

Builds the server image with the offline scripts (skips, printing why, when
podman cannot be installed), then, as root and as an unprivileged user with
subordinate ids, mounts an image made by mkfs.ext4 -d through the policy,
reads every file back through the mount and compares it with the source
tree, checks `ext4box list`, unmounts, and runs e2fsck -fn on the image.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from appliance.helper_support import (
    USER_PYTHON,
    ext4box_as,
    fuse_access,
    podman,
    public_dir,
    rootless_user,
    run_as,
)
from ext4box.bdi import READ_AHEAD_KB, mount_device
from ext4box.helper import state
from support.kernel import kernel_mount
from support.server_image import server_image as build_server_image

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="builds the image and creates a user: root only"),
]

# What a user sees when the image's service has no FUSE server yet.

# Walks a tree without following links; the same code runs as the test user.
MANIFEST_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, stat, sys
    def manifest(root):
        out = {}
        for here, dirs, files in os.walk(root):
            for name in sorted(dirs + files):
                path = os.path.join(here, name)
                st = os.lstat(path)
                rel = os.path.relpath(path, root)
                if rel == "lost+found" or rel.startswith("lost+found/"):
                    continue
                entry = [stat.filemode(st.st_mode)]
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        entry += [st.st_size, hashlib.sha256(f.read()).hexdigest()]
                elif stat.S_ISLNK(st.st_mode):
                    entry.append(os.readlink(path))
                out[rel] = entry
        return out
    print(json.dumps(manifest(sys.argv[1]), sort_keys=True))
    """
)


def manifest_as(user, root: Path) -> dict[str, list[object]]:
    if user is None:
        proc = subprocess.run(
            [sys.executable, "-c", MANIFEST_SCRIPT, str(root)], capture_output=True, text=True
        )
    else:
        proc = run_as(user, USER_PYTHON, "-c", MANIFEST_SCRIPT, str(root))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def server_image() -> str:
    return build_server_image()


@pytest.fixture(scope="module")
def user_with_image(server_image):
    """The unprivileged test user, with subordinate ids and the image in its storage."""
    user = rootless_user()
    with open("/etc/subuid") as f:
        if not any(line.startswith(f"{user.pw_name}:") for line in f):
            pytest.skip(f"{user.pw_name} has no subordinate uids")
    shared = Path(tempfile.mkdtemp(prefix="ext4box-oci-"))
    try:
        shared.chmod(0o755)
        archive = shared / "image.tar"
        podman("save", "--quiet", "--format", "oci-archive", "-o", str(archive), server_image)
        archive.chmod(0o644)
        loaded = podman("load", "--quiet", "-i", str(archive), user=user, check=False)
        assert loaded.returncode == 0, loaded.stderr
    finally:
        shutil.rmtree(shared)
    return user


@pytest.fixture
def scene():
    """A source tree, its image (mkfs.ext4 -d), a policy and a mountpoint, reachable by all."""
    with public_dir() as root:
        source = root / "source"
        (source / "sub/deep").mkdir(parents=True)
        (source / "hello.txt").write_text("hello from the host helper\n")
        rng = random.Random(4)
        (source / "sub/data.bin").write_bytes(rng.randbytes(300_000))
        (source / "sub/deep/empty").write_bytes(b"")
        (source / "sub/exec.sh").write_text("#!/bin/sh\necho hi\n")
        (source / "sub/exec.sh").chmod(0o755)
        (source / "link").symlink_to("hello.txt")
        (root / "images").mkdir(mode=0o755)
        image = root / "images/tree.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(source), str(image), "8M"], check=True)
        image.chmod(0o644)
        policy = root / "policy"
        policy.mkdir(mode=0o755)
        (policy / "10-test.toml").write_text(
            textwrap.dedent(
                f"""
                [[rule]]
                name = "test-images"
                images = ["{root}/images/*.img"]
                users = ["root", "{os.environ.get("EXT4BOX_ROOTLESS_USER", "ext4box-rootless")}"]
                mountpoints = ["{root}/mnt"]
                flags = ["noexec"]
                max_size = "64M"
                refuse_features = ["needs_recovery", "encrypt", "casefold"]
                """
            )
        )
        (policy / "10-test.toml").chmod(0o644)
        (root / "mnt").mkdir()
        yield root
        # Never leave a mount behind, whatever failed.
        subprocess.run(["umount", "-l", str(root / "mnt")], capture_output=True)


def _check_mounted(proc, what: str) -> float:
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("mounted "), line
    ready = float(line.rsplit("ready in ", 1)[1].split()[0])
    print(f"\n{what}: {line}")
    return ready


def _listed(proc) -> list[dict[str, object]]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else []


def _e2fsck_clean(image: Path) -> None:
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_rootless_user_mounts_reads_lists_unmounts(user_with_image, server_image, scene):
    user = user_with_image
    image, mnt, policy = scene / "images/tree.img", scene / "mnt", scene / "policy"
    os.chown(mnt, user.pw_uid, user.pw_gid)  # fusermount3: the user's own mountpoint
    env = {"EXT4BOX_SERVER_IMAGE": server_image}
    with fuse_access(user):
        proc = ext4box_as(user, "mount", str(image), str(mnt), "--policy", str(policy), env=env)
        _check_mounted(proc, "rootless")
        try:
            assert manifest_as(user, mnt) == manifest_as(None, scene / "source")
            rows = _listed(ext4box_as(user, "list", "--json", env=env))
            assert [(r["image"], r["mountpoint"], r["mode"], r["status"]) for r in rows] == [
                (str(image), str(mnt), "ro", "serving")
            ]
            name = rows[0]["container"]
            # Root's list shows every user's mounts (issue 16 item 9), whose they are.
            seen_by_root = [
                (r["user"], r["container"], r["status"])
                for r in _listed(_ext4box_root("list", "--json", image_ref=server_image))
                if r["mountpoint"] == str(mnt)
            ]
            assert seen_by_root == [(user.pw_name, name, "serving")]
            # The server runs in the user's rootless podman, in a user namespace.
            inspect = podman("container", "inspect", str(name), user=user, check=False)
            assert inspect.returncode == 0, inspect.stderr
            # noexec from the policy, nosuid,nodev always.
            with open("/proc/self/mountinfo") as table:
                line = next(row for row in table if f" {mnt} " in row)
            assert {"ro", "nosuid", "nodev", "noexec"} <= set(line.split()[5].split(","))
        finally:
            done = ext4box_as(user, "umount", str(mnt), env=env)
        assert done.returncode == 0, done.stderr
    assert _listed(ext4box_as(user, "list", "--json", env=env)) == []
    gone = podman("container", "exists", str(name), user=user, check=False)
    assert gone.returncode == 1
    assert f" {mnt} " not in Path("/proc/self/mountinfo").read_text()
    _e2fsck_clean(image)


def _ext4box_root(*args: str, image_ref: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXT4BOX_SERVER_IMAGE": image_ref, "EXT4BOX_LOG_FORMAT": "json"}
    return subprocess.run(
        [sys.executable, "-m", "ext4box", *args], env=env, capture_output=True, text=True,
        timeout=120, cwd="/",
    )  # fmt: skip


def test_root_mounts_reads_lists_unmounts(server_image, scene):
    image, mnt, policy = scene / "images/tree.img", scene / "mnt", scene / "policy"
    proc = _ext4box_root("mount", str(image), str(mnt), "--policy", str(policy),
                         image_ref=server_image)  # fmt: skip
    _check_mounted(proc, "root")
    try:
        # The helper raised the mount's read-ahead once the server's INIT was done.
        device = mount_device(os.path.realpath(mnt))
        assert device is not None
        assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip() == str(
            READ_AHEAD_KB)
        assert manifest_as(None, mnt) == manifest_as(None, scene / "source")
        # A second mount of the same mountpoint is refused in one line.
        again = _ext4box_root("mount", str(image), str(mnt), "--policy", str(policy),
                              image_ref=server_image)  # fmt: skip
        assert again.returncode == 1
        assert again.stderr.strip().splitlines()[-1] == (
            f"ext4box: error: {mnt} is already an ext4box mount (see ext4box list)"
        )
        rows = _listed(_ext4box_root("list", "--json", image_ref=server_image))
        mine = [r for r in rows if r["mountpoint"] == str(mnt)]
        assert [(r["image"], r["mode"], r["status"]) for r in mine] == [
            (str(image), "ro", "serving")
        ]
    finally:
        done = _ext4box_root("umount", str(mnt), image_ref=server_image)
    assert done.returncode == 0, done.stderr
    rows = _listed(_ext4box_root("list", "--json", image_ref=server_image))
    assert not [r for r in rows if r["mountpoint"] == str(mnt)]
    assert podman("container", "exists", str(mine[0]["container"]), check=False).returncode == 1
    _e2fsck_clean(image)


def test_dead_server_gives_enotconn_and_umount_cleans_up(server_image, scene):
    image, mnt, policy = scene / "images/tree.img", scene / "mnt", scene / "policy"
    proc = _ext4box_root("mount", str(image), str(mnt), "--policy", str(policy),
                         image_ref=server_image)  # fmt: skip
    _check_mounted(proc, "root")
    rows = [r for r in _listed(_ext4box_root("list", "--json", image_ref=server_image))
            if r["mountpoint"] == str(mnt)]  # fmt: skip
    name = str(rows[0]["container"])
    podman("kill", name, check=False)
    deadline = time.monotonic() + 10
    while podman("container", "exists", name, check=False).returncode == 0:
        assert time.monotonic() < deadline, "the killed container did not go away"
        time.sleep(0.1)
    with pytest.raises(OSError) as failure:
        os.stat(mnt / "hello.txt")
    assert failure.value.errno == errno.ENOTCONN
    rows = [r for r in _listed(_ext4box_root("list", "--json", image_ref=server_image))
            if r["mountpoint"] == str(mnt)]  # fmt: skip
    assert rows[0]["status"] == "server gone"
    done = _ext4box_root("umount", str(mnt), image_ref=server_image)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISDIR(os.stat(mnt).st_mode)  # the plain directory again
    _e2fsck_clean(image)


def test_sha256_pinned_rule_mounts(server_image, scene):
    image, mnt, policy = scene / "images/tree.img", scene / "mnt", scene / "policy"
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    (policy / "10-test.toml").write_text(
        f'[[rule]]\nname = "pinned"\nsha256 = ["{digest}"]\nusers = [0]\n'
    )
    proc = _ext4box_root("mount", str(image), str(mnt), "--policy", str(policy),
                         image_ref=server_image)  # fmt: skip
    _check_mounted(proc, "root, pinned digest")
    try:
        assert (mnt / "hello.txt").read_text() == "hello from the host helper\n"
    finally:
        done = _ext4box_root("umount", str(mnt), image_ref=server_image)
    assert done.returncode == 0, done.stderr


def test_container_that_fails_to_start_is_one_line_and_leaves_nothing(server_image, scene):
    # The base image has no entrypoint: "--handoff-fd" becomes the command to exec.
    base = "localhost/ext4box-base:bookworm"
    if podman("image", "exists", base, check=False).returncode != 0:
        pytest.skip(f"{base} is not in root's storage")
    image, mnt, policy = scene / "images/tree.img", scene / "mnt", scene / "policy"
    before = set(podman("ps", "-a", "--format", "{{.Names}}").stdout.split())
    proc = _ext4box_root("mount", str(image), str(mnt), "--policy", str(policy), image_ref=base)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    print(f"\n{line}")
    assert line.startswith("ext4box: error: the server container ext4box-")
    assert " exited during the hand-off; its log: " in line
    assert "failed to exec" in line  # the init's own complaint, from the container log
    assert f" {mnt} " not in Path("/proc/self/mountinfo").read_text()
    after = set(podman("ps", "-a", "--format", "{{.Names}}").stdout.split())
    assert not {name for name in after - before if name.startswith("ext4box-")}
    assert not [r for r in _listed(_ext4box_root("list", "--json", image_ref=base))
                if r["mountpoint"] == str(mnt)]  # fmt: skip


def test_root_mounts_read_write_and_the_image_stays_clean(server_image, scene, tmp_path):
    image, mnt, policy = scene / "images/tree.img", scene / "mnt", scene / "policy"
    rule = (policy / "10-test.toml").read_text().replace('flags = ["noexec"]', 'mode = "rw"')
    (policy / "10-test.toml").write_text(rule)
    # More than one early-writeback chunk (4 MiB) of new data, streamed.
    payload = random.Random(5).randbytes(5 << 20)
    proc = _ext4box_root("mount", str(image), str(mnt), "--rw", "--policy", str(policy),
                         image_ref=server_image)  # fmt: skip
    _check_mounted(proc, "root rw")
    try:
        (mnt / "written").mkdir()
        (mnt / "written" / "payload.bin").write_bytes(payload)
        os.rename(mnt / "hello.txt", mnt / "written" / "hello.txt")
        (mnt / "sub" / "data.bin").unlink()
        rows = _listed(_ext4box_root("list", "--json", image_ref=server_image))
        mine = [r for r in rows if r["mountpoint"] == str(mnt)]
        assert [r["mode"] for r in mine] == ["rw"]
        # The sandbox allows sync_file_range on the image: the hint stayed on.
        server_log = state.log_path(str(mine[0]["container"])).read_text(errors="replace")
        assert '"event": "ready"' in server_log  # the server's own log, read
        assert "early_writeback_off" not in server_log
    finally:
        done = _ext4box_root("umount", str(mnt), image_ref=server_image)
    assert done.returncode == 0, done.stderr
    _e2fsck_clean(image)
    with kernel_mount(image, tmp_path / "kernel") as kernel_root:
        assert (kernel_root / "written" / "payload.bin").read_bytes() == payload
        assert (kernel_root / "written" / "hello.txt").read_text() == "hello from the host helper\n"
        assert not (kernel_root / "sub" / "data.bin").exists()
