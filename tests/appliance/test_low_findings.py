"""Issue 14, finding 5 (low): someone else's mount, the container's limits and
writable tmpfs, and control characters from policy text.

Real users (useradd), a real FUSE mount served by the real service on the
host, and the helper's own `podman run` of the real server image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path

import pytest

from appliance.fdmount import SERVICE_MODULE, served_by_handoff
from appliance.helper_support import ext4box_as
from appliance.security_support import (
    STRANGER,
    ext4box_root,
    fuse_mounts,
    local_user,
    make_image,
    scratch_root,
    write_policy,
)
from support.serve import why_no_fuse

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts and creates users: root only"),
    pytest.mark.timeout(600),
]

ESC = "\x1b"


def test_policy_control_characters_are_escaped_in_every_message():
    with scratch_root() as root:
        image = make_image(root / "a.img", {"hello.txt": "hi\n"})
        (root / "mnt").mkdir()
        policy = write_policy(
            root / "policy",
            f"""
            [[rule]]
            name = "quarantine"
            action = "deny"
            description = "red\\u001b[31m alert\\u001b[2J"
            images = ["{root}/*.img"]
            """,
        )
        check = ext4box_root("policy", "check", str(image), "--policy", str(policy))
        check_out, _ = check.communicate(timeout=60)
        mount = ext4box_root("mount", str(image), str(root / "mnt"), "--policy", str(policy))
        _, mount_err = mount.communicate(timeout=60)
        # A rule whose name is refused: the load error quotes it.
        (policy / "10-test.toml").write_text('[[rule]]\nname = "x\\u001b]0;owned\\u0007"\n')
        broken = ext4box_root("mount", str(image), str(root / "mnt"), "--policy", str(policy))
        _, broken_err = broken.communicate(timeout=60)
    print(f"\n{mount_err.strip().splitlines()[-1]}\n{broken_err.strip().splitlines()[-1]}")
    assert check.returncode == 1 and mount.returncode == 1 and broken.returncode == 1
    for text in (check_out, mount_err, broken_err):
        assert ESC not in text and "\x07" not in text
    assert 'reason:   denied by rule "quarantine" (10-test.toml:2): red\\x1b[31m alert\\x1b[2J' in (
        check_out.splitlines()
    )
    assert mount_err.strip().splitlines()[-1] == (
        'ext4box: error: denied by rule "quarantine" (10-test.toml:2): red\\x1b[31m alert\\x1b[2J'
    )
    broken_line = broken_err.strip().splitlines()[-1]
    assert broken_line.startswith(
        f'ext4box: error: policy error: {policy}/10-test.toml:1: rule #1 "x\\x1b]0;owned\\x07"'
    )


@pytest.mark.skipif(why_no_fuse() is not None, reason=str(why_no_fuse()))
def test_list_shows_a_users_mountpoint_without_its_control_characters():
    """A user names their mountpoint; root's `list` table must not replay its escapes."""
    from ext4box.helper.listing import format_table

    hostile = "/home/eve/\x1b]0;owned\x07mnt"
    row = dict.fromkeys(("image", "mode", "user", "container", "since", "status"), "x")
    table = format_table([{**row, "mountpoint": hostile}])
    assert "\x1b" not in table and "\x07" not in table
    assert "/home/eve/\\x1b]0;owned\\x07mnt" in table


def test_umount_of_someone_elses_mount_says_so_and_leaves_it():
    stranger = local_user(STRANGER)
    service = [*SERVICE_MODULE, "--handoff-fd", "3", "--allow-privileged", "--timeout", "30"]
    with scratch_root() as root:
        image = make_image(root / "a.img", {"hello.txt": "still here\n"})
        mnt = root / "mnt"
        with served_by_handoff(image, mnt, service) as served:
            proc = ext4box_as(stranger, "umount", str(mnt))
            assert proc.returncode == 1, "the stranger's umount said nothing and exited 0"
            print(f"\n{proc.stderr.strip().splitlines()[-1]}")
            assert proc.stderr.strip().splitlines()[-1] == (
                f"ext4box: error: {mnt} is an ext4box mount of uid 0, not yours (uid"
                f" {stranger.pw_uid}); only its owner or root can unmount it"
            )
            assert str(mnt) in fuse_mounts()
            assert (served.mountpoint / "hello.txt").read_text() == "still here\n"


PROBE = (
    "import json, os\n"
    "out = {}\n"
    "for d in ('/tmp', '/var/tmp', '/run', '/dev/shm', '/dev/mqueue', '/dev', '/'):\n"
    "    try:\n"
    "        os.close(os.open(os.path.join(d, 'probe'), os.O_WRONLY | os.O_CREAT, 0o600))\n"
    "        out[d] = 'writable'\n"
    "    except OSError as e:\n"
    "        out[d] = e.strerror\n"
    "print(json.dumps(out))\n"
)


def test_the_helpers_container_has_limits_and_nothing_writable(tmp_path: Path):
    from ext4box.helper import container
    from support.server_image import server_image

    image = server_image()
    podman = dataclasses.replace(
        container.find_podman(), image=image, env={**container.podman_environment()}
    )
    name = f"ext4box-test-{secrets.token_hex(4)}"
    _, sock = container.start(podman, name, tmp_path / "server.log", {"test": "1"}, 60)
    try:
        fmt = "{{.HostConfig.Memory}} {{.HostConfig.PidsLimit}}"
        limits = podman.run("container", "inspect", "--format", fmt, name)
        assert limits.returncode == 0, limits.stderr
        probe = podman.run("exec", name, "/opt/ext4box/bin/python", "-c", PROBE)
        assert probe.returncode == 0, probe.stderr
    finally:
        sock.close()
        container.remove(podman, name)
    seen = json.loads(probe.stdout)
    print(f"\nmemory, pids: {limits.stdout.strip()}; writes: {seen}")
    assert limits.stdout.split() == [str(512 * 1024 * 1024), "64"]
    assert "writable" not in seen.values(), seen
