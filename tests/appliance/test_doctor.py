"""`ext4box doctor` and the mount's preflight, as an ordinary user on this host.

/dev/fuse is 0600 here, as on the machine issue 16 was found on: the user's
mount must say so in one line before any container starts, and doctor must
name it with its fix; with an ACL granting access the same line says ok.
"""

from __future__ import annotations

import os
import stat
import textwrap
from pathlib import Path

import pytest

from appliance.helper_support import ext4box_as, fuse_access, podman, public_dir, rootless_user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates a test user: root only")


def _fuse_closed_to_users() -> None:
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006:
        pytest.skip(f"/dev/fuse is {mode:04o} here: every user may open it")


@pytest.fixture
def scene():
    """An image, a policy allowing the test user, and a mountpoint the user owns."""
    user = rootless_user()
    with public_dir() as root:
        image = root / "a.img"
        with open(image, "wb") as f:
            f.truncate(4 << 20)
        os.system(f"mkfs.ext4 -q -F {image}")
        image.chmod(0o644)
        policy = root / "policy"
        policy.mkdir(mode=0o755)
        (policy / "10-test.toml").write_text(textwrap.dedent(f"""
            [[rule]]
            name = "doctor"
            images = ["{root}/*.img"]
            users = ["{user.pw_name}"]
            mountpoints = ["{root}/mnt"]
            """))  # fmt: skip
        (policy / "10-test.toml").chmod(0o644)
        mnt = root / "mnt"
        mnt.mkdir()
        os.chown(mnt, user.pw_uid, user.pw_gid)
        yield user, image, policy, mnt


def _lines(stdout: str) -> dict[str, str]:
    """check name -> its whole line."""
    out = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition(" ")
        name = rest.strip().split(":", 1)[0]
        out[name] = f"{status} {rest.strip()}"
    return out


def test_doctor_names_dev_fuse_and_its_fix(scene):
    _fuse_closed_to_users()
    user, _image, policy, mnt = scene
    proc = ext4box_as(user, "doctor", str(mnt), "--policy", str(policy))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = _lines(proc.stdout)
    assert lines["/dev/fuse"].startswith("missing /dev/fuse: /dev/fuse is mode 0600"), lines

    assert f"setfacl -m u:{user.pw_name}:rw /dev/fuse" in lines["/dev/fuse"]
    assert lines["policy"].startswith("ok "), lines["policy"]
    assert lines["mountpoint"] == f"ok mountpoint: {mnt}"
    assert "Traceback" not in proc.stderr
    with fuse_access(user):
        granted = ext4box_as(user, "doctor", str(mnt), "--policy", str(policy))
    assert _lines(granted.stdout)["/dev/fuse"] == "ok /dev/fuse: read-write"


def test_doctor_says_the_policy_directory_is_missing(scene):
    user, _image, policy, _mnt = scene
    proc = ext4box_as(user, "doctor", "--policy", str(policy / "nope"))
    assert proc.returncode == 1
    line = _lines(proc.stdout)["policy"]
    assert line.startswith("missing policy:") and "--policy DIR" in line, line


def test_mount_fails_on_dev_fuse_before_any_container_starts(scene):
    """Issue 16 item 4: /dev/fuse 0600 was found only after 12 s of container setup."""
    _fuse_closed_to_users()
    user, image, policy, mnt = scene
    before = podman("ps", "--all", "--format", "{{.Names}}", user=user, check=False).stdout
    proc = ext4box_as(user, "mount", str(image), str(mnt), "--policy", str(policy))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith(
        "ext4box: error: /dev/fuse is mode 0600, not read-write for uid"
    ), proc.stderr
    after = podman("ps", "--all", "--format", "{{.Names}}", user=user, check=False).stdout
    assert after == before  # no container was created (or left)
    assert f" {mnt} " not in Path("/proc/self/mountinfo").read_text()


def test_list_without_a_usable_runtime_dir_is_one_error_line(scene):
    """Issue 16 item 5: `ext4box list` died with a traceback (uncaught HelperError)."""
    user, image, _policy, _mnt = scene
    tmp = image.parent / "tmp"  # the fallback's parent, ours to break
    tmp.mkdir()
    os.chown(tmp, user.pw_uid, user.pw_gid)
    private = tmp / f"ext4box-run-{user.pw_uid}"
    no_session = {"XDG_RUNTIME_DIR": "", "TMPDIR": str(tmp)}  # as after `su -`
    empty = ext4box_as(user, "list", env=no_session)
    assert (empty.returncode, empty.stdout) == (0, "no mounts\n"), empty.stderr
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    private.chmod(0o711)  # what podman leaves it as: still private
    assert ext4box_as(user, "list", env=no_session).stdout == "no mounts\n"
    private.chmod(0o777)  # anyone could plant records: refused, in one line
    proc = ext4box_as(user, "list", env=no_session)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"ext4box: error: {private} is not a private directory")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
