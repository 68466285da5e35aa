"""The README's broker section, copy-pasted: root starts `ext4box broker --foreground`
as written, then an ordinary user runs the user snippet as written and mounts
through that broker (real user, real broker, real podman).

Everything happens in a private mount namespace with fresh /run/ext4box (root's,
0755, where the broker puts its socket and records), /etc/ext4box, /home and
/tmp, so neither the host's broker nor its homes are touched. The systemd form
is the same service socket-activated; tests/deploy/test_systemd_broker.py runs
those units through systemd-socket-activate.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from appliance.broker_support import ALICE, real_user
from appliance.helper_support import user_env
from docs.snippets import FAILED, REPO, run_snippet, snippet
from support.server_image import server_image

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs a root broker, creates a user, podman"),
]
SECTION = "Broker or direct: which mode am I in?"


def test_readme_foreground_broker_serves_an_ordinary_user_as_written():
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed")
    image_ref = server_image()
    root_part = snippet(SECTION, "install -d -m 0755 /etc/ext4box/policy.d")
    user_part = snippet(SECTION, "mkdir -p ~/mnt")
    alice = real_user(ALICE)
    home = alice.pw_dir
    env = user_env(alice)
    as_alice = (f"setpriv --reuid={alice.pw_uid} --regid={alice.pw_gid} --init-groups"
                f" env -i HOME={home} USER={alice.pw_name} LOGNAME={alice.pw_name}"
                f" PATH=/tmp/bin:/usr/local/bin:/usr/bin:/bin PYTHONPATH={env['PYTHONPATH']}"
                " PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8")  # fmt: skip
    # Around the snippets, only what a real machine already has: ext4box on the
    # user's PATH (here the checkout, run by Debian's python3), a home, an image.
    script = f"""
install -d -m 0755 /tmp/bin
printf '#!/bin/sh\\nexec /usr/bin/python3 -m ext4box "$@"\\n' > /tmp/bin/ext4box
chmod 0755 /tmp/bin/ext4box
install -d -o {alice.pw_uid} -g {alice.pw_gid} -m 0755 {home}
mkfs.ext4 -q -d examples/tree {home}/disk.img 16M >/dev/null
chown {alice.pw_uid}:{alice.pw_gid} {home}/disk.img && chmod 0600 {home}/disk.img
{root_part}
broker=$!
trap 'kill $broker 2>/dev/null; wait $broker' EXIT
cat > /tmp/as-user.sh <<'USER_SNIPPET'
trap 'echo "{FAILED} $? $BASH_COMMAND" >&2' ERR
{user_part}USER_SNIPPET
{as_alice} bash /tmp/as-user.sh
grep -c " {home}/mnt " /proc/self/mountinfo || echo "{home}/mnt: not mounted"
"""
    path = f"{REPO / '.venv/bin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    outcome = run_snippet(
        script,
        fresh=("/etc/ext4box", "/home", "/tmp"),
        private=("/run/ext4box",),
        # root's environment: the broker takes its server image from it (this
        # checkout's content-tagged build); the user's environment is the one above.
        env={"PATH": path, "HOME": "/root", "LANG": "C.UTF-8", "EXT4BOX_SERVER_IMAGE": image_ref},
    )
    assert outcome.failed == [], outcome.stderr[-3000:]
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    lines = outcome.stdout.splitlines()
    assert lines[0] == "broker mode", outcome.stdout
    assert lines[1].startswith(f"mounted {home}/disk.img on {home}/mnt (ro, container ext4box-")
    assert lines[1].endswith("via the broker)"), lines[1]
    assert (REPO / "examples/tree/hello.txt").read_text() in outcome.stdout
    [row] = [line for line in lines if line.startswith(f"{home}/disk.img ")]  # ext4box list
    assert row.split()[1:4] == [f"{home}/mnt", "ro", alice.pw_name] and row.endswith("serving")
    assert lines[-2:] == ["0", f"{home}/mnt: not mounted"], outcome.stdout  # after umount
    assert "advisory" not in outcome.stderr
    print(f"\n{sys.executable}: README broker snippets ok\n{outcome.stdout}")
