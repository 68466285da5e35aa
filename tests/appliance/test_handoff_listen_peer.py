"""Issue 14, finding 1: a stranger must not take /dev/fuse and the image from
`ext4box mount --handoff-listen`.

Real users: root runs the helper; `ext4box-stranger` (useradd) tries, for as
long as the helper runs, to connect to the hand-off socket and play the
server (HELLO_REPLY, take the fds, write to the image, READY); a second user
stands for the server's uid and runs the real `ext4box service` on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from appliance.helper_support import USER_PYTHON, as_user, user_env
from appliance.security_support import (
    SERVER,
    STRANGER,
    ext4box_root,
    local_user,
    make_image,
    scratch_root,
    write_policy,
)
from support.serve import why_no_fuse

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts and creates users: root only"),
    pytest.mark.skipif(why_no_fuse() is not None, reason=str(why_no_fuse())),
    pytest.mark.timeout(180),
]

# The stranger: only the standard library, the wire format written out by hand.
STRANGER_SCRIPT = textwrap.dedent(
    """
    import array, errno, json, os, socket, struct, sys
    path, stop = sys.argv[1], sys.argv[2]
    seen = {"missing": 0, "refused": 0, "connected": 0, "fds": 0, "wrote": 0}
    while not os.path.exists(stop):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        try:
            s.connect(path)
        except OSError as e:
            key = "refused" if e.errno in (errno.EACCES, errno.EPERM) else "missing"
            seen[key] += 1
            s.close()
            continue
        seen["connected"] += 1
        try:
            hello = s.recv(64)
            low, high = struct.unpack(">IHHI", hello[:12])[1:3]
            s.send(struct.pack(">IHH", 0x45584852, low, 0))
            room = socket.CMSG_SPACE(4 * 4)
            data, anc, _, _ = s.recvmsg(4096, room)
            fds = [fd for lvl, kind, raw in anc for fd in array.array("i", raw)]
            seen["fds"] += len(fds)
            for fd in fds:
                try:
                    os.pwrite(fd, b"stranger was here", 4096 * 8)
                    seen["wrote"] += 1
                except OSError:
                    pass
            s.send(struct.pack(">II", 0x45584F4B, 0))
        except OSError:
            pass
        finally:
            s.close()
    print(json.dumps(seen))
    """
)


def _scene(root: Path, *, mode: str = "rw") -> tuple[Path, Path, Path, Path]:
    images = root / "images"
    images.mkdir(mode=0o755)
    image = make_image(images / "a.img", {"hello.txt": "hello through the hand-off\n"})
    mnt = root / "mnt"
    mnt.mkdir()
    policy = write_policy(
        root / "policy",
        f"""
        [[rule]]
        name = "handoff"
        images = ["{images}/*.img"]
        users = ["root"]
        mountpoints = ["{mnt}"]
        mode = "{mode}"
        """,
    )
    handoff = root / "h"
    handoff.mkdir()
    handoff.chmod(0o711)  # the mode the README recommended
    return image, mnt, policy, handoff / "h.sock"


def _start_stranger(root: Path, sock: Path):
    stranger = local_user(STRANGER)
    script = root / "stranger.py"
    script.write_text(STRANGER_SCRIPT)
    script.chmod(0o644)
    stop = root / "stop"
    proc = subprocess.Popen(
        [*as_user(stranger), USER_PYTHON, str(script), str(sock), str(stop)],
        env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    return proc, stop


def _stranger_saw(proc, stop: Path) -> dict[str, int]:
    stop.write_text("")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_listen_without_server_uid_is_refused_and_a_stranger_gets_nothing():
    # The reproduction of issue 14 as written: no --server-uid, a 0711 directory.
    with scratch_root() as root:
        image, mnt, policy, sock = _scene(root)
        before = _digest(image)
        stranger, stop = _start_stranger(root, sock)
        try:
            helper = ext4box_root("mount", str(image), str(mnt), "--rw", "--policy", str(policy),
                                  "--handoff-listen", str(sock), "--timeout", "8")  # fmt: skip
            out, err = helper.communicate(timeout=60)
        finally:
            seen = _stranger_saw(stranger, stop)
        print(f"\nstranger: {seen}; helper: {err.strip().splitlines()[-1]}")
        assert helper.returncode == 1
        assert "mounted" not in out
        assert err.strip().splitlines()[-1] == (
            "ext4box: error: --handoff-listen needs --server-uid UID: only the server's uid may"
            " connect and receive /dev/fuse and the image"
        )
        assert (seen["connected"], seen["fds"], seen["wrote"]) == (0, 0, 0)
        assert _digest(image) == before


def test_stranger_cannot_even_connect_when_a_server_uid_is_named():
    server = local_user(SERVER)
    with scratch_root() as root:
        image, mnt, policy, sock = _scene(root)
        before = _digest(image)
        stranger, stop = _start_stranger(root, sock)
        try:
            helper = ext4box_root("mount", str(image), str(mnt), "--rw", "--policy", str(policy),
                                  "--handoff-listen", str(sock), "--server-uid",
                                  str(server.pw_uid), "--timeout", "5")  # fmt: skip
            out, err = helper.communicate(timeout=60)
        finally:
            seen = _stranger_saw(stranger, stop)
        print(f"\nstranger: {seen}; helper: {err.strip().splitlines()[-1]}")
        assert helper.returncode == 1
        assert "mounted" not in out
        assert err.strip().splitlines()[-1] == (
            f"ext4box: error: no ext4box server connected to {sock} within 5 s (is the server"
            f" running as uid {server.pw_uid} with --handoff-socket {sock}?)"
        )
        # The socket existed (the stranger was turned away by its mode, 0600
        # and owned by the server's uid) and it never got a connection.
        assert seen["refused"] > 0
        assert (seen["connected"], seen["fds"], seen["wrote"]) == (0, 0, 0)
        assert _digest(image) == before


def test_a_listening_directory_others_can_list_is_refused():
    server = local_user(SERVER)
    with scratch_root() as root:
        image, mnt, policy, sock = _scene(root)
        sock.parent.chmod(0o755)
        helper = ext4box_root("mount", str(image), str(mnt), "--policy", str(policy),
                              "--handoff-listen", str(sock), "--server-uid", str(server.pw_uid),
                              "--timeout", "5")  # fmt: skip
        out, err = helper.communicate(timeout=60)
        assert helper.returncode == 1
        assert "mounted" not in out
        assert err.strip().splitlines()[-1] == (
            f"ext4box: error: hand-off socket directory {sock.parent} has mode 0755 and owner"
            " uid 0; use a directory of root's (or yours) with mode 0700, or 0711 so the"
            " server's uid can reach its socket"
        )


def test_the_server_uid_connects_and_serves():
    """The positive control: the real service, as the server's uid, gets the mount."""
    server = local_user(SERVER)
    with scratch_root() as root:
        image, mnt, policy, sock = _scene(root, mode="ro")
        service = subprocess.Popen(
            [*as_user(server), USER_PYTHON, "-m", "ext4box", "service", "--handoff-socket",
             str(sock), "--connect-wait", "60", "--allow-privileged", "--timeout", "30"],
            env=user_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd="/",
        )  # fmt: skip
        try:
            helper = ext4box_root("mount", str(image), str(mnt), "--policy", str(policy),
                                  "--handoff-listen", str(sock), "--server-uid",
                                  str(server.pw_uid), "--timeout", "30")  # fmt: skip
            out, err = helper.communicate(timeout=90)
            assert helper.returncode == 0, err
            assert out.startswith(f"mounted {image} on {mnt} (ro, server socket:{sock},")
            assert (mnt / "hello.txt").read_text() == "hello through the hand-off\n"
            done = ext4box_root("umount", str(mnt))
            assert done.wait(timeout=60) == 0, done.stderr.read() if done.stderr else ""
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
            try:
                service.wait(timeout=30)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait()
        assert service.returncode == 0, service.stderr.read() if service.stderr else ""


@pytest.mark.parametrize("uid", ["-1", "4294967295"])
def test_a_server_uid_that_is_no_uid_is_refused(uid):
    # chown(-1) would leave the socket as it is: never accept that as "a uid".
    helper = ext4box_root("mount", "/nonexistent.img", "/nonexistent", "--handoff-listen",
                          "/run/nonexistent/h.sock", "--server-uid", uid)  # fmt: skip
    out, err = helper.communicate(timeout=60)
    assert helper.returncode == 1 and "mounted" not in out
    assert err.strip().splitlines()[-1] == (
        f"ext4box: error: --server-uid {uid} is not a uid (0 to 4294967294)"
    )
