"""The two ways the helper mounts /dev/fuse, against the real kernel and fusermount3.

No server answers FUSE_INIT here, so nothing ever looks inside the
mountpoint: the checks read /proc/self/mountinfo and the fd itself only.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from appliance.helper_support import USER_PYTHON, fuse_access, public_dir, rootless_user, run_as
from ext4box.handoff_protocol import verify_fuse_fd
from ext4box.helper import fusemount
from ext4box.helper.errors import HelperError

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount(2), test user)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]


def _spec(mountpoint: Path, **kw: object) -> fusemount.MountSpec:
    fields = dict(mountpoint=str(mountpoint), source="/srv/images/a.img", mode="ro",
                  noexec=True, allow_other=False, uid=os.getuid(), gid=os.getgid())  # fmt: skip
    fields.update(kw)
    return fusemount.MountSpec(**fields)  # type: ignore[arg-type]


def _options(mountpoint: Path) -> tuple[str, set[str]]:
    with open("/proc/self/mountinfo") as table:
        for line in table:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(mountpoint):
                per_mount = set(left.split()[5].split(","))
                fstype, _source, super_options = right.split()[:3]
                return fstype, per_mount | set(super_options.split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


@pytest.mark.parametrize("how", ["mount2", "fusermount3"])
def test_root_mount_options_and_fd(tmp_path, how):
    if how == "fusermount3" and not shutil.which("fusermount3"):
        pytest.skip("fusermount3 is not installed")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    spec = _spec(mountpoint)
    mount = fusemount.mount_as_root if how == "mount2" else fusemount.mount_with_fusermount
    fd = mount(spec)
    try:
        verify_fuse_fd(fd)  # /dev/fuse, O_RDWR: what the server will verify
        fstype, options = _options(mountpoint)
        assert fstype == "fuse.ext4box"
        assert {"ro", "nosuid", "nodev", "noexec", "default_permissions"} <= options
        assert "allow_other" not in options
        assert f"user_id={os.getuid()}" in options
    finally:
        os.close(fd)  # nobody serves it now: the mount answers ENOTCONN
        assert fusemount.unmount(str(mountpoint)) is True
    assert fusemount.mounted_fstype(str(mountpoint)) is None
    assert fusemount.unmount(str(mountpoint)) is False


def test_root_mount_rw_allow_other_exec(tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    fd = fusemount.mount_as_root(_spec(mountpoint, mode="rw", noexec=False, allow_other=True))
    try:
        _, options = _options(mountpoint)
        assert {"rw", "nosuid", "nodev", "allow_other"} <= options
        assert "noexec" not in options and "ro" not in options
    finally:
        os.close(fd)
        fusemount.unmount(str(mountpoint))


def test_root_mount_refuses_a_symlinked_mountpoint_fd(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(HelperError, match=r"mountpoint .*link"):
        fusemount.mount_as_root(_spec(tmp_path / "link"))
    assert fusemount.mounted_fstype(str(tmp_path / "real")) is None


_USER_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from ext4box.helper import fusemount
    from ext4box.helper.errors import HelperError
    from ext4box.handoff_protocol import verify_fuse_fd
    spec = fusemount.MountSpec(mountpoint=sys.argv[1], source="/srv/images/a.img", mode="ro",
                               noexec=True, allow_other=False, uid=os.getuid(), gid=os.getgid())
    try:
        fd = fusemount.mount(spec)    # not root: fusermount3 + _FUSE_COMMFD
    except HelperError as err:
        print(err.line)
        sys.exit(1)
    verify_fuse_fd(fd)
    entry = fusemount.mounted_entry(sys.argv[1])
    os.close(fd)
    unmounted = fusemount.unmount(sys.argv[1])
    print(json.dumps({"fstype": entry.fstype, "source": entry.source,
                      "unmounted": unmounted, "after": fusemount.mounted_fstype(sys.argv[1])}))
    """
)


def test_unprivileged_fusermount3_commfd():
    if not shutil.which("fusermount3"):
        pytest.skip("fusermount3 is not installed")
    user = rootless_user()
    with public_dir() as scratch, fuse_access(user):
        mountpoint = scratch / "mnt"
        mountpoint.mkdir()
        os.chown(mountpoint, user.pw_uid, user.pw_gid)
        proc = run_as(user, USER_PYTHON, "-c", _USER_SCRIPT, str(mountpoint))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {
        "fstype": "fuse.ext4box",
        "source": "/srv/images/a.img",
        "unmounted": True,
        "after": None,
    }


def test_unprivileged_without_fuse_access_is_one_line():
    """/dev/fuse 0600 (this machine's default): fusermount3's reason, one line."""
    user = rootless_user()
    if os.stat("/dev/fuse").st_mode & 0o006:
        pytest.skip("/dev/fuse is accessible to everyone on this host")
    with public_dir() as scratch:
        mountpoint = scratch / "mnt"
        mountpoint.mkdir()
        os.chown(mountpoint, user.pw_uid, user.pw_gid)
        _refused_without_access(user, mountpoint)


def _refused_without_access(user, mountpoint: Path) -> None:
    proc = run_as(user, USER_PYTHON, "-c", _USER_SCRIPT, str(mountpoint))
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == (
        f"cannot mount on {mountpoint}: {shutil.which('fusermount3')}: failed to open /dev/fuse:"
        " Permission denied"
    )
    assert fusemount.mounted_fstype(str(mountpoint)) is None
