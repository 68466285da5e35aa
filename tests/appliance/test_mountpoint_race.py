"""Issue 14, finding 2: a mountpoint swapped for a symbolic link after the
decision must not redirect the mount.

The scene stands in for the issue's: alice (a real user, useradd) owns
R/home/alice/mnt/etc, which the policy allows; R/sys/etc stands for /etc, which
a deny rule protects; alice swaps R/home/alice/mnt for a symbolic link to R/sys.
The mount is a real FUSE mount (nobody serves it: it only has to exist).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from appliance.helper_support import USER_PYTHON, as_user
from appliance.security_support import (
    ALICE,
    ext4box_root,
    fuse_mounts,
    local_user,
    make_image,
    scratch_root,
    write_policy,
)
from ext4box import handoff_protocol as protocol
from ext4box.helper import fusemount
from ext4box.helper.errors import HelperError
from ext4box.policy import Request, identity_of_uid, load_policy
from ext4box.service import receive
from support.serve import why_no_fuse

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts and creates users: root only"),
    pytest.mark.skipif(why_no_fuse() is not None, reason=str(why_no_fuse())),
    pytest.mark.timeout(300),
]

TRIES = 250

# alice, as herself: swap her mnt for a link to the protected tree and back,
# until told to stop. Prints how many swaps she made.
SWAPPER = textwrap.dedent(
    """
    import os, sys
    mnt, real, target, stop = sys.argv[1:5]
    swaps = 0
    while not os.path.exists(stop):
        os.rename(mnt, real)
        os.symlink(target, mnt)
        os.unlink(mnt)
        os.rename(real, mnt)
        swaps += 1
    print(swaps)
    """
)


def _scene(root: Path):
    alice = local_user(ALICE)
    home = root / "home/alice"
    (home / "mnt/etc").mkdir(parents=True)
    for path in (home, home / "mnt", home / "mnt/etc"):
        os.chown(path, alice.pw_uid, alice.pw_gid)
        path.chmod(0o755)
    (root / "home").chmod(0o755)
    protected = root / "sys/etc"
    protected.mkdir(parents=True)
    (root / "sys").chmod(0o755)
    images = root / "images"
    images.mkdir(mode=0o755)
    image = make_image(images / "a.img", {"sudoers": "alice ALL=(ALL) NOPASSWD: ALL\n"})
    policy = write_policy(
        root / "policy",
        f"""
        [[rule]]
        name = "protect-system"
        action = "deny"
        images = ["/**"]
        mountpoints = ["{root}/sys", "{root}/sys/**"]

        [[rule]]
        name = "alice-mnt"
        images = ["{images}/*.img"]
        users = ["root"]
        mountpoints = ["{home}/mnt/*"]
        """,
    )
    return alice, home, protected, image, policy


def _as_alice(alice, *argv: str) -> None:
    subprocess.run([*as_user(alice), *argv], check=True, cwd="/", env={"PATH": "/usr/bin:/bin"})


def _wait_for(path: Path, helper: subprocess.Popen[str]) -> None:
    while not path.exists():
        assert helper.poll() is None, helper.communicate()
        time.sleep(0.05)


def test_swap_during_the_wait_for_the_server_does_not_move_the_mount():
    """The issue's reproduction, through `ext4box mount`: the swap happens while
    the helper (policy decided) waits for the server to connect."""
    with scratch_root() as root:
        alice, home, protected, image, policy = _scene(root)
        handoff = root / "h"
        handoff.mkdir(mode=0o711)
        handoff.chmod(0o711)
        sock_path = handoff / "h.sock"
        target = home / "mnt/etc"
        helper = ext4box_root("mount", str(image), str(target), "--policy", str(policy),
                              "--handoff-listen", str(sock_path), "--server-uid", "0",
                              "--timeout", "30")  # fmt: skip
        try:
            _wait_for(sock_path, helper)  # decided; now waiting for a server
            _as_alice(alice, "mv", str(home / "mnt"), str(home / "mnt.real"))
            _as_alice(alice, "ln", "-s", str(root / "sys"), str(home / "mnt"))
            server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            server.settimeout(30)
            server.connect(str(sock_path))
            with server:
                packet, _ = protocol.recv_packet(server)
                low, high = protocol.decode_hello(packet)
                protocol.send_packet(
                    server, protocol.encode_hello_reply(receive.negotiate_version(low, high))
                )
                _, fds = protocol.recv_packet(server, max_fds=2)  # sent after the mount
                for fd in fds:
                    os.close(fd)
                landed = [m for m in fuse_mounts() if m.startswith(str(root))]
                protocol.reply_error(server, 5, "test server: looked, not serving")
            out, _ = helper.communicate(timeout=60)
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
        print(f"\nlanded on {landed}")
        assert str(protected) not in landed
        assert landed == [str(home / "mnt.real/etc")]
        assert helper.returncode == 1 and "mounted" not in out
        assert not [m for m in fuse_mounts() if m.startswith(str(root))]


def test_swap_race_in_a_loop_never_mounts_outside_the_decided_directory():
    from ext4box.helper import mountpoint_fd  # the fd-based mountpoint (issue 14)

    with scratch_root() as root:
        alice, home, protected, image, policy_dir = _scene(root)
        policy = load_policy(str(policy_dir), check_ownership=True)
        who = identity_of_uid(0, 0)
        swapper_script = root / "swapper.py"
        swapper_script.write_text(SWAPPER)
        swapper_script.chmod(0o644)
        stop = root / "stop"
        swapper = subprocess.Popen(
            [*as_user(alice), USER_PYTHON, str(swapper_script), str(home / "mnt"),
             str(home / "mnt.real"), str(root / "sys"), str(stop)],
            env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd="/",
        )  # fmt: skip
        outcomes = {"refused at open": 0, "denied by policy": 0, "mounted": 0}
        allowed = {str(home / "mnt/etc"), str(home / "mnt.real/etc")}
        try:
            for _ in range(TRIES):
                try:
                    held = mountpoint_fd.hold(str(home / "mnt/etc"))
                except HelperError:
                    outcomes["refused at open"] += 1
                    continue
                try:
                    decision = policy.evaluate(
                        Request(
                            image=str(image),
                            image_size=image.stat().st_size,
                            uid=0,
                            user=who.user,
                            gids=who.gids,
                            groups=who.groups,
                            mode="ro",
                            mountpoint=held.path,
                        )
                    )
                    if not decision.allowed:
                        outcomes["denied by policy"] += 1
                        continue
                    spec = fusemount.MountSpec(
                        mountpoint=held.path, dir_fd=held.fd, source=str(image), mode="ro",
                        noexec=True, allow_other=False, uid=0, gid=0,
                    )  # fmt: skip
                    mounted = fusemount.mount_held(spec)
                    try:
                        landed = [m for m in fuse_mounts() if m.startswith(str(root))]
                        assert str(protected) not in landed
                        assert len(landed) == 1 and landed[0] in allowed, landed
                        assert mounted.mount_fd is not None  # the new mount API was used
                        outcomes["mounted"] += 1
                    finally:
                        fusemount.unmount_mounted(mounted, held.path)
                        os.close(mounted.fuse_fd)
                finally:
                    held.close()
        finally:
            stop.write_text("")
            swaps, err = swapper.communicate(timeout=60)
        print(f"\n{TRIES} tries, alice swapped {swaps.strip()} times: {outcomes}")
        assert swapper.returncode == 0, err
        assert int(swaps) > 0
        assert outcomes["mounted"] > 0  # the race was run, not only refused
        assert sum(outcomes.values()) == TRIES
        assert not [m for m in fuse_mounts() if m.startswith(str(root))]


# Without the new mount API (and openat2), as on an old kernel: a seccomp
# filter in a child answers ENOSYS; the helper must still mount on the held
# directory, say so in its log, and the swap must still not move the mount.
FALLBACK = textwrap.dedent(
    """
    import errno, json, os, sys
    from ext4box import log
    from ext4box.helper import fusemount, mountpoint_fd
    from ext4box.service import libseccomp as sc
    log.setup("info")
    sc.install(sc.ACT_ALLOW, [sc.Rule(name, sc.act_errno(errno.ENOSYS))
                              for name in ("fsopen", "openat2")], all_threads=False)
    held = mountpoint_fd.hold(sys.argv[1])
    os.rename(sys.argv[2], sys.argv[3])      # the swap, after the decision
    os.symlink(sys.argv[4], sys.argv[2])
    spec = fusemount.MountSpec(mountpoint=held.path, dir_fd=held.fd, source=sys.argv[5],
                               mode="ro", noexec=True, allow_other=False, uid=0, gid=0)
    mounted = fusemount.mount_held(spec)
    print(json.dumps({"decided": held.path, "mount_fd": mounted.mount_fd}), flush=True)
    sys.stdin.read()                          # hold the fuse fd until told
    """
)


def test_without_the_new_mount_api_mount2_on_the_held_fd_is_logged_and_safe():
    with scratch_root() as root:
        _, home, protected, image, _ = _scene(root)
        child = subprocess.Popen(
            [sys.executable, "-c", FALLBACK, str(home / "mnt/etc"), str(home / "mnt"),
             str(home / "mnt.real"), str(root / "sys"), str(image)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "EXT4BOX_LOG_FORMAT": "json"}, cwd="/",
        )  # fmt: skip
        landed: list[str] = []
        try:
            assert child.stdout is not None
            said = json.loads(child.stdout.readline() or "{}")
            landed = [m for m in fuse_mounts() if m.startswith(str(root))]
        finally:
            _, err = child.communicate("", timeout=60)
            for where in landed:
                subprocess.run(["umount", "-l", where], capture_output=True, check=False)
        print(f"\n{said}, landed on {landed}")
        assert child.returncode == 0, err
        assert said == {"decided": str(home / "mnt/etc"), "mount_fd": None}
        assert landed == [str(home / "mnt.real/etc")] and str(protected) not in landed
        fallback = [json.loads(line) for line in err.splitlines() if "mount_api_fallback" in line]
        assert fallback and fallback[0]["using"] == "mount(2) on /proc/self/fd/N", err
