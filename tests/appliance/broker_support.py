"""Shared by the broker tests: two real users, a scene they can reach, a real broker.

alice and bob are created with useradd (once; they persist like the rootless
user of the helper tests). The broker runs as root in the foreground on a
socket and state directory of its own, so nothing here disturbs a broker or
root mounts elsewhere on the machine; clients find it by EXT4BOX_BROKER_SOCKET.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.helper_support import ext4box_as, podman_env, run_as

ALICE = "ext4box-alice"
BOB = "ext4box-bob"
# A server image no storage has: a broker given it stops at the image check,
# right after the decision, and never starts a container.
ABSENT_IMAGE = "localhost/ext4box-absent:0"
PODMAN_GATE = (
    f"podman has no image {ABSENT_IMAGE} for uid 0 (build it with scripts/build-image.sh,"
    " or podman load it)"
)
_LENGTH = struct.Struct(">I")


def real_user(name: str) -> pwd.struct_passwd:
    """A real user (useradd), created if missing; skip if that cannot be done."""
    if os.geteuid() != 0:
        pytest.skip("creating users and running a broker needs root")
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    proc = subprocess.run(["useradd", "--create-home", name], capture_output=True, text=True)
    if proc.returncode != 0 and "already exists" not in proc.stderr:
        pytest.skip(f"cannot create user {name}: {proc.stderr.strip()}")
    return pwd.getpwnam(name)


@dataclass
class Scene:
    """A directory tree reachable by the users: root/{policy,state,sock,home/<user>/...}."""

    root: Path
    alice: pwd.struct_passwd
    bob: pwd.struct_passwd

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def socket(self) -> Path:
        return self.root / "sock/broker.sock"

    def home(self, user: pwd.struct_passwd) -> Path:
        return self.root / "home" / user.pw_name

    def client_env(self, **extra: str) -> dict[str, str]:
        return {"EXT4BOX_BROKER_SOCKET": str(self.socket), **extra}

    def ext4box(self, user: pwd.struct_passwd, *args: str, **env: str):
        return ext4box_as(user, *args, env=self.client_env(**env))


def make_scene(alice: pwd.struct_passwd, bob: pwd.struct_passwd) -> Scene:
    root = Path(tempfile.mkdtemp(prefix="ext4box-broker-"))
    root.chmod(0o755)
    scene = Scene(root, alice, bob)
    for sub in ("policy", "state", "sock", "home"):
        (root / sub).mkdir(mode=0o755)
    for user in (alice, bob):
        home = scene.home(user)
        (home / "mnt").mkdir(parents=True)
        for path in (home, home / "mnt"):
            os.chown(path, user.pw_uid, user.pw_gid)
            path.chmod(0o755)
    (scene.policy / "10-users.toml").write_text(
        textwrap.dedent(
            f"""
            [[rule]]
            name = "no-untrusted-images"
            action = "deny"
            images = ["{root}/**/untrusted-*.img"]
            description = "untrusted images are quarantined"

            [[rule]]
            name = "users-images"
            images = ["{root}/**"]
            users = ["{alice.pw_name}", "{bob.pw_name}"]
            mountpoints = ["{root}/home/*/mnt"]
            flags = ["noexec"]
            max_size = "64M"
            """
        )
    )
    return scene


def make_image(path: Path, files: dict[str, str], owner: pwd.struct_passwd | None,
               mode: int = 0o600) -> Path:  # fmt: skip
    """mkfs.ext4 -d of `files`, owned by `owner` (None: root) with `mode`."""
    with tempfile.TemporaryDirectory() as tree:
        for name, text in files.items():
            (Path(tree) / name).write_text(text)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, str(path), "8M"], check=True)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    path.chmod(mode)
    return path


@contextlib.contextmanager
def running_broker(
    scene: Scene, *extra: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """`ext4box broker --foreground` as root on the scene's socket; stopped with SIGTERM."""
    argv = [sys.executable, "-m", "ext4box", "broker", "--foreground", "--socket",
            str(scene.socket), "--policy", str(scene.policy), "--state-dir",
            str(scene.root / "state"), *extra]  # fmt: skip
    log = open(scene.root / "broker.log", "w")  # noqa: SIM115 - closed below
    broker = subprocess.Popen(argv, env={**podman_env(), "EXT4BOX_LOG_FORMAT": "json",
                                         **(env or {})},
                              stdout=log, stderr=subprocess.STDOUT, text=True, cwd="/")  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not scene.socket.exists():
            if broker.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the broker did not start: {broker_log(scene)}")
            time.sleep(0.05)
        yield broker
    finally:
        if broker.poll() is None:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(30)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()
        log.close()


def broker_log(scene: Scene) -> str:
    with contextlib.suppress(OSError):
        return (scene.root / "broker.log").read_text()[-3000:]
    return ""


def ask(scene: Scene, payload: bytes, timeout: float = 30) -> dict[str, object] | None:
    """Send raw bytes as root (a stranger as far as framing goes); the reply, if any."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(scene.socket))
        with contextlib.suppress(OSError):
            sock.sendall(payload)
        return read_reply(sock)


def read_reply(sock: socket.socket) -> dict[str, object] | None:
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    if len(data) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(data[:4])
    return json.loads(data[4 : 4 + length])


def frame(message: object) -> bytes:
    body = json.dumps(message).encode()
    return _LENGTH.pack(len(body)) + body


# Runs as a user: send one framed JSON request (argv[2]) to the socket (argv[1]).
RAW_CLIENT = textwrap.dedent(
    """
    import json, socket, struct, sys
    body = sys.argv[2].encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.sendall(struct.pack(">I", len(body)) + body)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    print(data[4:].decode())
    """
)


def ask_as(scene: Scene, user: pwd.struct_passwd, message: dict[str, object]) -> dict[str, object]:
    """Send a request as `user` over the real socket (SO_PEERCRED says who)."""
    proc = run_as(user, "/usr/bin/python3", "-c", RAW_CLIENT, str(scene.socket),
                  json.dumps(message))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one `ext4box: error:` line of a failed client run (exit 1)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ext4box: error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0].removeprefix("ext4box: error: ")


def mounted_at(path: Path) -> bool:
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4] == str(path) for line in table)


def remove_scene(scene: Scene) -> None:
    """Whatever a failed test left: mounts under the scene, their containers, the tree."""
    with open("/proc/self/mountinfo") as table:
        mounted = [line.split()[4] for line in table]
    for path in reversed(mounted):
        if path.startswith(f"{scene.root}/"):
            subprocess.run(["umount", "-l", path], capture_output=True)
    listed = subprocess.run(
        ["podman", "ps", "-a", "--filter", "label=org.ext4box.owner", "--format", "json"],
        env=podman_env(), capture_output=True, text=True, timeout=120, cwd="/",
    )  # fmt: skip
    with contextlib.suppress(ValueError):
        for row in json.loads(listed.stdout or "[]"):
            image = str((row.get("Labels") or {}).get("org.ext4box.image", ""))
            if image.startswith(f"{scene.root}/"):
                subprocess.run(["podman", "rm", "-f", row["Id"]], env=podman_env(),
                               capture_output=True, timeout=120, cwd="/")  # fmt: skip
    shutil.rmtree(scene.root, ignore_errors=True)
