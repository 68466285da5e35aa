"""Server options end to end: `ext4box mount -o` → policy → hand-off → the server
in a real podman container, for the root helper and for the broker.

- root helper, `-o usrquota,strictatime`: a real user (useradd) writing through
  the mount is stopped with EDQUOT at the byte the kernel's rule gives for the
  hard limit e2fsprogs reads from the image; the mount shows the atime flags a
  kernel mount with strictatime shows, and every read moves atime.
- broker, a rule with server_options = ["noatime"] and enforce_quota =
  ["usrquota"]: alice's strictatime is refused before any container starts, and
  the decision is logged; her noatime mount shows noatime, keeps atime, and
  enforces her limit though she never asked for quota.
- broker, writeback_cache: refused (and logged) by a rule that does not list
  it; granted by one that does, the container's session negotiates
  FUSE_WRITEBACK_CACHE (its INIT flags in the container's log) and 20,000
  4-byte O_APPEND writes give the bytes the kernel's ext4 gives.
e2fsck -fn after the writes. Three container starts: slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.broker_support import (
    ALICE,
    BOB,
    ask_as,
    broker_log,
    error_line,
    make_scene,
    real_user,
    remove_scene,
    running_broker,
)
from appliance.server_options_support import (
    APPENDS,
    ATIME_FLAGS,
    OLD_ATIME,
    RECORD,
    allowed_bytes,
    atimes_after_reads,
    kernel_atime_flags,
    mount_options_of,
    negotiated_flags,
    public_scratch,
    quota_image,
    setpriv,
    small_appends,
    usage,
    write_as,
)
from support.kernel import kernel_mount
from support.server_image import server_image as build_server_image

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="creates users, runs root's podman"),
]


@pytest.fixture
def scratch() -> Iterator[Path]:
    with public_scratch() as path:
        yield path


def _fsck_clean(image: Path) -> None:
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def _policy_decisions(log: Path) -> list[dict[str, object]]:
    """The broker's decisions, from its whole JSON log."""
    return [json.loads(line) for line in log.read_text().splitlines()
            if '"policy_decision"' in line]  # fmt: skip


def _ext4box_root(*args: str, image_ref: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXT4BOX_SERVER_IMAGE": image_ref, "EXT4BOX_LOG_FORMAT": "json"}
    return subprocess.run([sys.executable, "-m", "ext4box", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd="/")  # fmt: skip


def test_root_helper_mount_with_usrquota_and_strictatime(scratch: Path) -> None:
    server_image = build_server_image()
    alice = real_user(ALICE)
    (scratch / "images").mkdir(mode=0o755)
    image = quota_image(scratch / "images/q.img", alice.pw_uid, alice.pw_gid)
    used = usage(image, alice.pw_uid)[0]
    mnt = scratch / "mnt"
    mnt.mkdir()
    policy = scratch / "policy"
    policy.mkdir(mode=0o755)
    (policy / "10-test.toml").write_text(textwrap.dedent(f"""
        [[rule]]
        name = "quota-images"
        images = ["{scratch}/images/*.img"]
        users = ["root"]
        mode = "rw"
        mountpoints = ["{mnt}"]
        flags = ["allow_other"]
        server_options = ["strictatime"]
        """))  # fmt: skip
    proc = _ext4box_root("mount", str(image), str(mnt), "--rw", "-o", "usrquota,strictatime",
                         "--policy", str(policy), image_ref=server_image)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    try:
        assert mount_options_of(mnt) & ATIME_FLAGS == kernel_atime_flags(scratch, "strictatime")
        as_alice = setpriv(alice.pw_uid, alice.pw_gid)
        first, second = atimes_after_reads(as_alice, mnt / "old.txt", 2)
        assert OLD_ATIME * 10**9 < first < second  # relatime would leave the second alone
        got = write_as(as_alice, mnt / "u" / "big", 400_000)
        assert got == ["EDQUOT", allowed_bytes(used)]
        decisions = [json.loads(line) for line in proc.stderr.splitlines()
                     if '"mount_decision"' in line]  # fmt: skip
        assert [d["server_options"] for d in decisions] == [["usrquota", "strictatime"]]
    finally:
        done = _ext4box_root("umount", str(mnt), image_ref=server_image)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    assert done.returncode == 0, done.stderr
    _fsck_clean(image)
    assert usage(image, alice.pw_uid)[0] <= 120 * 1024


def test_broker_refuses_what_the_rule_does_not_allow_and_enforces_quota() -> None:
    server_image = build_server_image()
    alice, bob = real_user(ALICE), real_user(BOB)
    scene = make_scene(alice, bob)
    home, mnt = scene.home(alice), scene.home(alice) / "mnt"
    image = quota_image(home / "q.img", alice.pw_uid, alice.pw_gid)
    os.chown(image, alice.pw_uid, alice.pw_gid)
    image.chmod(0o600)
    used = usage(image, alice.pw_uid)[0]
    (scene.policy / "05-options.toml").write_text(textwrap.dedent(f"""
        [[rule]]
        name = "alice-quota"
        images = ["{image}"]
        users = ["{alice.pw_name}"]
        mode = "rw"
        mountpoints = ["{mnt}"]
        server_options = ["noatime"]
        enforce_quota = ["usrquota"]
        """))  # fmt: skip
    try:
        with running_broker(scene, env={"EXT4BOX_SERVER_IMAGE": server_image}):
            # Not in the rule: refused by the policy, before any container.
            refused = scene.ext4box(alice, "mount", str(image), str(mnt), "--rw",
                                    "-o", "strictatime")  # fmt: skip
            assert ("rule \"alice-quota\" (05-options.toml:2) did not match: server option(s)"
                    " strictatime requested but the rule's server_options allow only [noatime]"
                    ) in error_line(refused)  # fmt: skip
            # A name nobody knows never reaches the policy.
            raw = ask_as(scene, alice, {"version": 1, "op": "mount", "image": str(image),
                                        "mountpoint": str(mnt), "mode": "rw",
                                        "server_options": ["noquota"]})  # fmt: skip
            assert raw["ok"] is False and str(raw["error"]).startswith(
                "bad request: unknown server option 'noquota' (known: atime,")
            decisions = _policy_decisions(scene.root / "broker.log")
            assert [(d["allowed"], d["requested_server_options"]) for d in decisions] == [
                (False, ["strictatime"])]
            # Allowed: noatime, and quota enforced without asking.
            proc = scene.ext4box(alice, "mount", str(image), str(mnt), "--rw", "-o", "noatime")
            assert proc.returncode == 0, proc.stderr + broker_log(scene)
            try:
                shown = mount_options_of(mnt) & ATIME_FLAGS
                assert shown == kernel_atime_flags(scene.root, "noatime")
                as_alice = setpriv(alice.pw_uid, alice.pw_gid)
                assert atimes_after_reads(as_alice, mnt / "old.txt", 2) == [OLD_ATIME * 10**9] * 2
                got = write_as(as_alice, mnt / "u" / "big", 400_000)
                assert got == ["EDQUOT", allowed_bytes(used)]
            finally:
                done = scene.ext4box(alice, "umount", str(mnt))
            assert done.returncode == 0, done.stderr + broker_log(scene)
            granted = _policy_decisions(scene.root / "broker.log")[-1]
            assert granted["allowed"] and granted["server_options"] == ["noatime", "usrquota"]
        _fsck_clean(image)
        assert usage(image, alice.pw_uid)[0] <= 120 * 1024
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        remove_scene(scene)


def test_broker_grants_writeback_cache_only_where_the_rule_lists_it() -> None:
    server_image = build_server_image()
    alice, bob = real_user(ALICE), real_user(BOB)
    scene = make_scene(alice, bob)
    home, mnt = scene.home(alice), scene.home(alice) / "mnt"
    plain, cached = home / "plain.img", home / "cached.img"
    for image in (plain, cached):  # her root directory, her file
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"root_owner={alice.pw_uid}:"
                        f"{alice.pw_gid}", str(image), "8M"], check=True)  # fmt: skip
        os.chown(image, alice.pw_uid, alice.pw_gid)
        image.chmod(0o600)
    twin = scene.root / "kernel.img"
    shutil.copyfile(cached, twin)
    (scene.policy / "05-cache.toml").write_text(textwrap.dedent(f"""
        [[rule]]
        name = "alice-plain"
        images = ["{plain}"]
        users = ["{alice.pw_name}"]
        mode = "rw"
        server_options = ["noatime"]

        [[rule]]
        name = "alice-cached"
        images = ["{cached}"]
        users = ["{alice.pw_name}"]
        mode = "rw"
        server_options = ["writeback_cache"]
        """))  # fmt: skip
    try:
        with running_broker(scene, env={"EXT4BOX_SERVER_IMAGE": server_image}):
            refused = scene.ext4box(alice, "mount", str(plain), str(mnt), "--rw",
                                    "-o", "writeback_cache")  # fmt: skip
            assert ("rule \"alice-plain\" (05-cache.toml:2) did not match: server option(s)"
                    " writeback_cache requested but the rule's server_options allow only"
                    " [noatime]") in error_line(refused)  # fmt: skip
            (decision,) = _policy_decisions(scene.root / "broker.log")
            assert not decision["allowed"]
            assert decision["requested_server_options"] == ["writeback_cache"]
            assert "writeback_cache requested" in str(decision["reason"])
            proc = scene.ext4box(alice, "mount", str(cached), str(mnt), "--rw",
                                 "-o", "writeback_cache")  # fmt: skip
            assert proc.returncode == 0, proc.stderr + broker_log(scene)
            try:
                # The container's log (podman's k8s-file in the broker's state
                # directory) holds the session line written at FUSE_INIT.
                logs = "".join(path.read_text() for path in (scene.root / "state").rglob("*.log"))
                assert "WRITEBACK_CACHE" in negotiated_flags(logs)
                ours = small_appends(setpriv(alice.pw_uid, alice.pw_gid), mnt / "log")
            finally:
                done = scene.ext4box(alice, "umount", str(mnt))
            assert done.returncode == 0, done.stderr + broker_log(scene)
            granted = _policy_decisions(scene.root / "broker.log")[-1]
            assert granted["allowed"] and granted["server_options"] == ["writeback_cache"]
        with kernel_mount(twin, scene.root / "kmnt", readonly=False) as root:
            theirs = small_appends([], root / "log")
        assert ours == theirs and ours[0] == APPENDS * len(RECORD)
        _fsck_clean(cached)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        remove_scene(scene)
