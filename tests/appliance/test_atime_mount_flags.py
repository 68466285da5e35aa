"""The FUSE mount's atime flags say what the server's atime rule is, as the
kernel's own mounts say it: /proc/self/mountinfo of our mount against a tmpfs
mounted with the same options (the kernel's reading of them is the oracle).

Both ways the helper attaches a mount as root (fsmount's MOUNT_ATTR_* and the
mount(2) fallback's MS_*, forced by a seccomp filter that answers ENOSYS to
fsopen, as on an old kernel), and `ext4box serve`, which mounts through the
same code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.server_options_support import (
    ATIME_FLAGS,
    kernel_atime_flags,
    mount_options_of,
    public_scratch,
)
from support.serve import ext4box_argv, served, why_no_fuse

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts as root"),
    pytest.mark.skipif(why_no_fuse() is not None, reason=str(why_no_fuse())),
    pytest.mark.timeout(120),
]

CASES = ["relatime", "noatime", "strictatime", "nodiratime", "strictatime,nodiratime",
         "noatime,strictatime", "strictatime,norelatime,noatime"]  # fmt: skip

# Runs as root in a child: mount /dev/fuse as the helper does (no server: the
# flags are there before INIT), print the mount's options, undo it.
ATTACH = textwrap.dedent(
    """
    import errno, json, os, sys
    from ext4box.helper import fusemount, mountpoint_fd
    from ext4box.service import libseccomp as sc
    if sys.argv[3] == "mount2":
        sc.install(sc.ACT_ALLOW, [sc.Rule("fsopen", sc.act_errno(errno.ENOSYS))],
                   all_threads=False)
    held = mountpoint_fd.hold(sys.argv[1])
    spec = fusemount.MountSpec(mountpoint=held.path, dir_fd=held.fd, source=sys.argv[2],
                               mode="ro", noexec=False, allow_other=False, uid=0, gid=0)
    mounted = fusemount.mount_held(fusemount.with_atime(spec, sys.argv[4].split(",")))
    try:
        with open("/proc/self/mountinfo") as table:
            line = [row for row in table if row.split()[4] == held.path][-1]
        print(json.dumps({"options": line.split()[5], "mount_fd": mounted.mount_fd}))
    finally:
        os.close(mounted.fuse_fd)  # no server: closing aborts the connection
        fusemount.unmount_mounted(mounted, held.path)
        if mounted.mount_fd is None:
            fusemount.unmount(held.path)
    """
)


@pytest.fixture
def scratch() -> Iterator[Path]:
    with public_scratch() as path:
        yield path


@pytest.mark.parametrize("api", ["fsmount", "mount2"])
@pytest.mark.parametrize("options", CASES)
def test_helper_mount_shows_the_kernels_atime_flags(scratch: Path, api: str, options: str):
    mnt = scratch / "mnt"
    mnt.mkdir()
    proc = subprocess.run([sys.executable, "-c", ATTACH, str(mnt), str(scratch / "x.img"), api,
                           options], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    said = json.loads(proc.stdout.splitlines()[-1])  # after the log lines
    assert (said["mount_fd"] is None) is (api == "mount2")
    assert set(said["options"].split(",")) & ATIME_FLAGS == kernel_atime_flags(scratch, options)


@pytest.mark.parametrize("options", ["strictatime", "noatime,nodiratime"])
def test_serve_mount_shows_the_kernels_atime_flags(scratch: Path, options: str):
    image = scratch / "img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image), "8M"], check=True)
    mnt = scratch / "mnt"
    with served(image, mnt, ext4box_argv(image, mnt, f"ro,{options}", backend="native")):
        shown = mount_options_of(mnt) & ATIME_FLAGS
    assert shown == kernel_atime_flags(scratch, options)
