"""compose/systemd/ext4box-broker.{socket,service}: verified statically, and the
socket-activation path run for real with systemd-socket-activate.

This machine has no systemd as PID 1: `systemd-analyze verify` checks the
units, and systemd-socket-activate passes a listening stream socket exactly as
the socket unit does (LISTEN_FDS=1, LISTEN_PID, the socket as fd 3).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from deploy.conftest import REPO, podman_env, run
from deploy.test_systemd import analyze, unit_directives
from docs.snippets import snippet

UNITS = REPO / "compose/systemd"
SERVICE = "ext4box-broker.service"
SOCKET = "ext4box-broker.socket"
# Any of these would give the broker a private mount namespace, where the
# mounts it makes for users would be invisible to them.
NAMESPACING = ("PrivateMounts", "PrivateTmp", "ProtectSystem", "ProtectHome", "ReadOnlyPaths",
               "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
               "PrivateDevices", "ProtectKernelTunables", "ProtectControlGroups",
               "MountFlags", "RootDirectory", "PrivateUsers", "DynamicUser")  # fmt: skip


def test_broker_units_verify_cleanly(tmp_path):
    tool = analyze()
    for unit in (SERVICE, SOCKET):
        text = (UNITS / unit).read_text()
        (tmp_path / unit).write_text(
            text.replace("/usr/bin/ext4box", str(Path(sys.executable).parent / "ext4box"))
        )
    proc = run(tool, "verify", str(tmp_path / SOCKET), str(tmp_path / SERVICE))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def test_broker_unit_directives():
    socket_lines = (UNITS / SOCKET).read_text().splitlines()
    assert unit_directives("\n".join(socket_lines), "ListenStream") == ["/run/ext4box/broker.sock"]
    for directive in ("Accept=no", "SocketUser=root", "SocketMode=0666", "DirectoryMode=0755"):
        assert directive in socket_lines, directive
    service = (UNITS / SERVICE).read_text()
    assert "User=root" in service.splitlines() and "KillMode=process" in service.splitlines()
    [exec_start] = unit_directives(service, "ExecStart")
    argv = exec_start.split()
    assert argv[:2] == ["/usr/bin/ext4box", "broker"] and "--foreground" not in argv
    assert argv[argv.index("--policy") + 1] == "/etc/ext4box/policy.d"
    present = [key for key in NAMESPACING if unit_directives(service, key)]
    assert present == [], f"these would hide the broker's mounts from users: {present}"


def test_readme_systemd_form_enables_these_units():
    """The README's broker section shows a systemd form next to the foreground one
    (tests/docs/test_readme_broker.py runs that); the form cannot run on a host
    without systemd, so what it names is checked here, against the units tested
    below: it enables the socket (activation), not the service."""
    code = snippet("Broker or direct: which mode am I in?", "systemctl daemon-reload")
    commands = [part.split() for part in code.split("#")[0].split("&&")]
    assert commands == [["systemctl", "daemon-reload"],
                        ["systemctl", "enable", "--now", SOCKET]], code  # fmt: skip
    assert (UNITS / SOCKET).exists() and (UNITS / SERVICE).exists()


def test_socket_activated_broker_answers_and_refuses_garbage(tmp_path):
    analyze()
    activate = shutil.which("systemd-socket-activate")
    if not activate:
        pytest.skip("systemd-socket-activate is not installed (package systemd)")
    if os.geteuid() != 0:
        pytest.skip("the broker runs as root")
    scene = Path(tempfile_dir())
    try:
        policy = scene / "policy"
        policy.mkdir(mode=0o755)
        sock = scene / "broker.sock"
        broker = subprocess.Popen(
            [activate, "-l", str(sock), sys.executable, "-m", "ext4box", "broker",
             "--policy", str(policy), "--state-dir", str(scene / "state")],
            env={**podman_env(), "EXT4BOX_LOG_FORMAT": "json"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                assert time.monotonic() < deadline and broker.poll() is None, "no socket"
                time.sleep(0.05)
            # The first connection starts the broker (activation), garbage is refused...
            assert _ask(sock, b"\x00\x00\x00\x02{]") == {
                "version": 1,
                "ok": False,
                "error": "bad request: message is not UTF-8 JSON",
            }
            # ...and it keeps serving on the same inherited socket.
            assert _ask(sock, _frame({"version": 1, "op": "list"})) == {
                "version": 1,
                "ok": True,
                "mounts": [],
            }
            assert broker.poll() is None
        finally:
            broker.send_signal(signal.SIGTERM)
            try:
                _, err = broker.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                broker.kill()
                _, err = broker.communicate()
        started = [json.loads(line) for line in err.splitlines() if "broker_started" in line]
        assert started and started[0]["socket"] == "systemd", err[-2000:]
    finally:
        shutil.rmtree(scene, ignore_errors=True)


def tempfile_dir() -> str:
    path = tempfile.mkdtemp(prefix="ext4box-broker-unit-")
    os.chmod(path, 0o755)
    return path


def _frame(message: object) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def _ask(path: Path, payload: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data[4:])
