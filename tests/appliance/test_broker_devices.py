"""grant_access through the broker: a device a user cannot open, opened for them.

A loop device (root:disk, not readable by the test users) gets a udev-style
link /dev/disk/by-id/usb-ext4box-test-*; the policy grants that name to group
plugdev. alice (in plugdev) gets past the open and the policy, and stops at
the broker's deliberately absent server image (no container starts here);
bob (not in plugdev) gets the kernel's refusal; links a user can make do not
count as device names.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import textwrap
from pathlib import Path

import pytest

from appliance.broker_support import (
    ABSENT_IMAGE,
    ALICE,
    BOB,
    PODMAN_GATE,
    broker_log,
    error_line,
    make_image,
    make_scene,
    real_user,
    remove_scene,
    running_broker,
)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="creates users, loop devices and /dev links"),
]

BY_ID = Path("/dev/disk/by-id")


@pytest.fixture(scope="module")
def scene():
    alice, bob = real_user(ALICE), real_user(BOB)
    subprocess.run(["usermod", "-aG", "plugdev", ALICE], check=True)
    scene = make_scene(alice, bob)
    (scene.policy / "05-usb.toml").write_text(
        textwrap.dedent(
            f"""
            [[rule]]
            name = "usb-sticks"
            images = ["/dev/disk/by-id/usb-ext4box-test-*"]
            groups = ["plugdev"]
            block_devices = true
            grant_access = true
            mountpoints = ["{scene.root}/home/*/mnt"]
            """
        )
    )
    try:
        yield scene
    finally:
        remove_scene(scene)


@pytest.fixture(scope="module")
def stick(scene):
    """A loop device nobody but root and group disk may open, and its by-id link."""
    backing = make_image(scene.root / "stick.img", {"readme": "on a stick\n"}, None, 0o600)
    proc = subprocess.run(["losetup", "--find", "--show", "--read-only", str(backing)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    device = proc.stdout.strip()
    os.chmod(device, 0o660)
    made = [p for p in (BY_ID.parent, BY_ID) if not p.exists()]
    BY_ID.mkdir(parents=True, exist_ok=True, mode=0o755)
    link = BY_ID / f"usb-ext4box-test-{secrets.token_hex(4)}"
    link.symlink_to(os.path.relpath(device, BY_ID))
    try:
        yield device, link
    finally:
        link.unlink(missing_ok=True)
        for directory in reversed(made):  # only what this test created, and only if empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        subprocess.run(["losetup", "--detach", device], check=False)


@pytest.fixture(scope="module")
def broker(scene):
    with running_broker(scene, env={"EXT4BOX_SERVER_IMAGE": ABSENT_IMAGE}) as process:
        yield process
        assert process.poll() is None, broker_log(scene)


def test_alice_in_plugdev_is_granted_the_stick(scene, stick, broker):
    device, link = stick
    mnt = scene.home(scene.alice) / "mnt"
    # She cannot open it herself...
    assert subprocess.run(["setpriv", f"--reuid={scene.alice.pw_uid}",
                           f"--regid={scene.alice.pw_gid}", "--init-groups", "head", "-c1",
                           device], capture_output=True).returncode != 0  # fmt: skip
    # ...the broker opens it for her, the rule allows it by its by-id name.
    assert error_line(scene.ext4box(scene.alice, "mount", str(link), str(mnt))) == PODMAN_GATE
    log = broker_log(scene)
    assert '"rule": "usb-sticks"' in log and '"grant_access": true' in log, log


def test_bob_outside_plugdev_gets_the_kernels_refusal(scene, stick, broker):
    device, link = stick
    mnt = scene.home(scene.bob) / "mnt"
    assert error_line(scene.ext4box(scene.bob, "mount", str(link), str(mnt))) == (
        f"cannot open image {device} read-only: Permission denied"
    )
    assert error_line(scene.ext4box(scene.bob, "mount", device, str(mnt))) == (
        f"cannot open image {device} read-only: Permission denied"
    )


def test_a_link_a_user_made_is_not_a_device_name(scene, stick, broker):
    device, _ = stick
    mnt = scene.home(scene.alice) / "mnt"
    for place in (scene.home(scene.alice), Path("/dev/shm")):
        own = place / f"usb-ext4box-test-{secrets.token_hex(4)}"
        own.symlink_to(device)
        os.lchown(own, scene.alice.pw_uid, scene.alice.pw_gid)
        try:
            line = error_line(scene.ext4box(scene.alice, "mount", str(own), str(mnt)))
        finally:
            with contextlib.suppress(FileNotFoundError):
                own.unlink()
        assert line == (
            f"refusing image path {own}: it goes through a symbolic link (resolves to {device});"
            " name the image by its real path"
        )


def test_without_the_broker_alice_cannot_open_the_stick(scene, stick):
    device, _ = stick
    mnt = scene.home(scene.alice) / "mnt"
    proc = scene.ext4box(scene.alice, "mount", device, str(mnt), "--policy", str(scene.policy),
                         EXT4BOX_BROKER_SOCKET=str(scene.root / "none.sock"))  # fmt: skip
    assert error_line(proc) == f"cannot open image {device} read-only: Permission denied"
