"""`ext4box mount` refusals: the exact line the user sees, and nothing started.

Every case runs the real CLI on real files (an image made by mkfs.ext4, a
FIFO, a loop device, real flock locks, real policy files). EXT4BOX_PODMAN
points at a path that does not exist: a refusal that came too late (after
the helper reached podman) would print "podman is not installed" instead of
the expected line, so a passing case also proves no container was started.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ext4box.helper import fusemount

IMAGE_BYTES = 4 * 1024 * 1024
NO_PODMAN = "/nonexistent/podman-must-not-run"
PODMAN_GATE = (
    "ext4box: error: podman is not installed (the ext4box server runs in a podman container);"
    " fix: apt-get install podman"
)


@pytest.fixture
def area(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    (tmp_path / "images").mkdir(mode=0o755)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "policy").mkdir(mode=0o755)
    image = tmp_path / "images" / "test.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    return tmp_path


def write_policy(area: Path, text: str) -> Path:
    path = area / "policy" / "10-test.toml"
    path.write_text(text)
    path.chmod(0o644)
    return area / "policy"


def allow_rule(area: Path, **extra: str) -> str:
    lines = [
        "[[rule]]",
        'name = "test"',
        f'images = ["{area}/images/*.img"]',
        f"users = {extra.pop('users', '[0]')}",
    ]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def run_mount(area: Path, image: str | Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EXT4BOX_PODMAN": NO_PODMAN, "EXT4BOX_LOG_FORMAT": "json"}
    argv = [sys.executable, "-m", "ext4box", "mount", str(image), str(area / "mnt")]
    argv += ["--policy", str(area / "policy"), *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def error_line(proc: subprocess.CompletedProcess[str], area: Path) -> str:
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    # Nothing was mounted on the mountpoint.
    assert fusemount.mounted_fstype(str(area / "mnt")) is None
    return proc.stderr.strip().splitlines()[-1]


def events(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    out = {}
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            out[event["event"]] = event
    return out


pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the cases run as root (uid 0 rules)")


def test_allowed_request_reaches_podman_and_logs_the_decision(area):
    write_policy(area, allow_rule(area, flags='["noexec"]'))
    proc = run_mount(area, area / "images/test.img")
    assert error_line(proc, area) == PODMAN_GATE
    decision = events(proc)["mount_decision"]
    assert decision["allowed"] is True
    assert decision["user"] == "root" and decision["uid"] == 0
    assert decision["image"] == str(area / "images/test.img")
    assert decision["mode"] == "ro" and decision["rule"] == "test"
    assert decision["flags"] == ["nosuid", "nodev", "noexec"]
    assert events(proc)["policy_decision"]["allowed"] is True


def test_symlinked_image_path(area):
    write_policy(area, allow_rule(area))
    link = area / "images" / "link.img"
    link.symlink_to(area / "images/test.img")
    line = error_line(run_mount(area, link), area)
    assert line == (
        f"ext4box: error: refusing image path {link}: it goes through a symbolic link"
        f" (resolves to {area}/images/test.img); name the image by its real path"
    )


def test_symlinked_parent_directory(area):
    write_policy(area, allow_rule(area))
    (area / "via").symlink_to(area / "images")
    line = error_line(run_mount(area, area / "via/test.img"), area)
    assert line.startswith(f"ext4box: error: refusing image path {area}/via/test.img: it goes")


def test_missing_image(area):
    write_policy(area, allow_rule(area))
    line = error_line(run_mount(area, area / "images/nope.img"), area)
    assert line == f"ext4box: error: image {area}/images/nope.img does not exist"


def test_fifo_is_not_an_image(area):
    write_policy(area, allow_rule(area))
    fifo = area / "images" / "fifo.img"
    os.mkfifo(fifo)
    line = error_line(run_mount(area, fifo), area)
    assert line == (
        f"ext4box: error: refusing image {fifo}: it is a FIFO, not a regular file or block device"
    )


def test_directory_is_not_an_image(area):
    write_policy(area, allow_rule(area))
    line = error_line(run_mount(area, area / "images"), area)
    assert line.endswith("it is a directory, not a regular file or block device")


@pytest.fixture
def loop_device(area: Path):
    proc = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(area / "images/test.img")],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"no loop device: {proc.stderr.strip()}")
    device = proc.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def test_block_device_without_permission(area, loop_device):
    write_policy(area, allow_rule(area).replace(f'"{area}/images/*.img"', '"/dev/loop*"'))
    line = error_line(run_mount(area, loop_device), area)
    assert line == (
        'ext4box: error: denied: no rule allows this (deny by default): rule "test"'
        " (10-test.toml:1) did not match: the image is a block device and the rule does not"
        " set block_devices = true"
    )


def test_block_device_with_permission_passes_the_policy(area, loop_device):
    rule = allow_rule(area, block_devices="true").replace(f'"{area}/images/*.img"', '"/dev/loop*"')
    write_policy(area, rule)
    assert error_line(run_mount(area, loop_device), area) == PODMAN_GATE


def test_oversized_image(area):
    write_policy(area, allow_rule(area, max_size='"1M"'))
    line = error_line(run_mount(area, area / "images/test.img"), area)
    assert line == (
        'ext4box: error: denied: no rule allows this (deny by default): rule "test"'
        " (10-test.toml:1) did not match: image size 4 MiB (4194304 bytes) exceeds max_size"
        " 1 MiB (1048576 bytes)"
    )


def test_digest_mismatch(area):
    write_policy(area, allow_rule(area, sha256=f'["{"ab" * 32}"]'))
    image = area / "images/test.img"
    actual = hashlib.sha256(image.read_bytes()).hexdigest()
    line = error_line(run_mount(area, image), area)
    assert line == (
        'ext4box: error: denied: no rule allows this (deny by default): rule "test"'
        f" (10-test.toml:1) did not match: image sha256 {actual} is not one of the rule's"
        " pinned digests"
    )


def test_digest_match_passes_the_policy(area):
    image = area / "images/test.img"
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    write_policy(area, allow_rule(area, sha256=f'["sha256:{digest}"]'))
    proc = run_mount(area, image)
    assert error_line(proc, area) == PODMAN_GATE
    assert events(proc)["mount_decision"]["sha256"] == digest


def test_rw_requested_where_policy_says_ro(area):
    write_policy(area, allow_rule(area, mode='"ro"'))
    line = error_line(run_mount(area, area / "images/test.img", "--rw"), area)
    assert line == (
        'ext4box: error: denied: no rule allows this (deny by default): rule "test"'
        " (10-test.toml:1) did not match: rw was requested but the rule allows only ro"
    )


def test_no_matching_rule(area):
    write_policy(
        area, '[[rule]]\nname = "elsewhere"\nimages = ["/srv/images/*.img"]\nusers = ["*"]\n'
    )
    line = error_line(run_mount(area, area / "images/test.img"), area)
    assert line == (
        f"ext4box: error: denied: no allow rule covers image {area}/images/test.img"
        " (deny by default)"
    )


def test_wrong_user(area):
    write_policy(area, allow_rule(area, users='["daemon"]'))
    line = error_line(run_mount(area, area / "images/test.img"), area)
    assert line == (
        'ext4box: error: denied: no rule allows this (deny by default): rule "test"'
        " (10-test.toml:1) did not match: user root (uid 0) is not in users [daemon]"
    )


def test_deny_rule_reason(area):
    deny = (
        '[[rule]]\nname = "quarantine"\naction = "deny"\n'
        f'images = ["{area}/images/*.img"]\ndescription = "images here are quarantined"\n\n'
    )
    write_policy(area, deny + allow_rule(area))
    line = error_line(run_mount(area, area / "images/test.img"), area)
    assert line == (
        'ext4box: error: denied by rule "quarantine" (10-test.toml:1): images here are quarantined'
    )


def test_image_already_mounted_read_write(area):
    write_policy(area, allow_rule(area, mode='"rw"'))
    image = area / "images/test.img"
    # An rw mount holds LOCK_EX on its open file description (inside the server).
    with open(image, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        line = error_line(run_mount(area, image), area)
    assert line == f"ext4box: error: image {image} is already mounted read-write"


def test_rw_refused_while_mounted_read_only(area):
    write_policy(area, allow_rule(area, mode='"rw"'))
    image = area / "images/test.img"
    with open(image, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_SH)
        line = error_line(run_mount(area, image, "--rw"), area)
        # Two read-only mounts may share the image.
        assert error_line(run_mount(area, image, "--ro"), area) == PODMAN_GATE
    assert line == (
        f"ext4box: error: image {image} is already mounted (a read-write mount needs it unused)"
    )


def test_refused_ext4_feature(area):
    # mkfs.ext4 makes a journal: refusing has_journal must refuse this image.
    write_policy(area, allow_rule(area, refuse_features='["encrypt", "has_journal"]'))
    image = area / "images/test.img"
    line = error_line(run_mount(area, image), area)
    assert line == (
        f"ext4box: error: refusing image {image}: it has ext4 feature(s) has_journal,"
        ' refused by rule "test"'
    )


def test_not_ext4(area):
    write_policy(area, allow_rule(area, refuse_features='["encrypt"]'))
    image = area / "images/zero.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    line = error_line(run_mount(area, image), area)
    assert line == (
        f"ext4box: error: image {image} is not a usable ext4 filesystem:"
        " no ext2/3/4 superblock (magic 0x0000)"
    )


def test_bad_policy_file(area):
    write_policy(area, allow_rule(area, moed='"ro"'))
    line = error_line(run_mount(area, area / "images/test.img"), area)
    assert line.startswith(
        f'ext4box: error: policy error: {area}/policy/10-test.toml:5: rule #1 "test" key "moed":'
        " unknown key"
    )


def test_mountpoint_must_be_a_directory(area):
    write_policy(area, allow_rule(area))
    (area / "mnt").rmdir()
    (area / "mnt").write_text("")
    proc = run_mount(area, area / "images/test.img")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ext4box: error: mountpoint {area}/mnt is not a directory"
    )
