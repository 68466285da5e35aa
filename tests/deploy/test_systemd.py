"""compose/systemd/: static verification, and the socket-activation path run for real.

This machine has no systemd as PID 1, so the units cannot be started here:
`systemd-analyze verify` checks them statically (and must print nothing),
the unit's syscall allowlist must be the seccomp profile's, and
systemd-socket-activate (the same Accept=yes semantics: one connected
SOCK_SEQPACKET socket as fd 3 per connection) runs `ext4box service
--handoff-fd 3` while the helper mounts with --handoff-connect.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.conftest import REPO, e2fsck_clean, fuse_mounted, make_scene, podman_env, run, same_tree

UNITS = REPO / "compose/systemd"
SERVICE = "ext4box-server@.service"
SOCKET = "ext4box-server.socket"


def _systemd_tools() -> None:
    """Install Debian's systemd package (its tools only: nothing is started) if missing."""
    if not shutil.which("systemd-analyze") and os.geteuid() == 0:
        subprocess.run(["bash", str(REPO / "scripts/install-deps.sh"), "systemd"],
                       capture_output=True, check=False)  # fmt: skip


def analyze() -> str:
    _systemd_tools()
    found = shutil.which("systemd-analyze")
    if not found:
        reason = "systemd-analyze is not installed (apt-get install systemd)"
        print(reason)
        pytest.skip(reason)
    return found


def unit_directives(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_units_verify_cleanly(tmp_path):
    tool = analyze()
    # verify insists the ExecStart binary exists: point it at this checkout's.
    for unit in (SERVICE, SOCKET):
        text = (UNITS / unit).read_text()
        (tmp_path / unit).write_text(
            text.replace("/usr/bin/ext4box", str(Path(sys.executable).parent / "ext4box"))
        )
    instance = tmp_path / "ext4box-server@0.service"
    shutil.copy(tmp_path / SERVICE, instance)
    proc = run(tool, "verify", str(tmp_path / SOCKET), str(instance))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr
    # verify does read the directives: a misspelled key or syscall is reported.
    broken = tmp_path / "ext4box-broken@0.service"
    broken.write_text(instance.read_text().replace("ProtectSystem=", "ProtectSystm=")
                      .replace("SystemCallFilter=access", "SystemCallFilter=acess"))  # fmt: skip
    noisy = run(tool, "verify", str(broken))
    assert "Unknown key 'ProtectSystm'" in noisy.stderr
    assert "acess" in noisy.stderr
    exposure = run(tool, "security", "--offline=yes", str(instance))
    print(f"\n{exposure.stdout.strip().splitlines()[-1]}")
    assert " SAFE " in exposure.stdout.strip().splitlines()[-1]


def test_service_sandbox_directives():
    text = (UNITS / SERVICE).read_text()
    required = ["DynamicUser=yes", "PrivateNetwork=yes", "ProtectSystem=strict",
                "NoNewPrivileges=yes", "PrivateDevices=yes", "RestrictAddressFamilies=AF_UNIX",
                "SystemCallArchitectures=native"]  # fmt: skip
    for directive in required:
        assert directive in text.splitlines(), directive
    assert unit_directives(text, "CapabilityBoundingSet") == [""]
    assert unit_directives(text, "AmbientCapabilities") == [""]
    listed = {name for line in unit_directives(text, "SystemCallFilter") for name in line.split()}
    profile = json.loads((REPO / "seccomp/ext4box.json").read_text())
    allowed = {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
               for n in rule["names"]}  # fmt: skip
    assert listed == allowed, (sorted(listed - allowed), sorted(allowed - listed))
    socket_text = (UNITS / SOCKET).read_text().splitlines()
    assert "Accept=yes" in socket_text and "SocketMode=0600" in socket_text
    assert any(line.startswith("ListenSequentialPacket=") for line in socket_text)


def test_socket_activation_serves_a_mount():
    _systemd_tools()
    activate = shutil.which("systemd-socket-activate")
    if not activate:
        pytest.skip("systemd-socket-activate is not installed (package systemd)")
    with make_scene("", "") as scene:
        image = scene.images / "disk.img"
        (scene.policy / "10-deploy.toml").write_text(
            f'[[rule]]\nname = "systemd"\nimages = ["{image}"]\nusers = ["root"]\n'
            f'mountpoints = ["{scene.mnt}"]\nmax_size = "64M"\n'
        )
        sock = scene.handoff / "server.sock"
        # As the unit's ExecStart, but root on the host without the unit's
        # sandbox, so the service is told it may run weaker than configured.
        server = subprocess.Popen(
            [activate, "--seqpacket", "--accept", "-l", str(sock), sys.executable, "-m",
             "ext4box", "service", "--handoff-fd", "3", "--allow-privileged"],
            env=podman_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                assert time.monotonic() < deadline and server.poll() is None, "no socket"
                time.sleep(0.05)
            ext4box = [sys.executable, "-m", "ext4box"]
            mounted = run(*ext4box, "mount", str(image), str(scene.mnt), "--policy",
                          str(scene.policy), "--handoff-connect", str(sock))  # fmt: skip
            assert mounted.returncode == 0, mounted.stderr
            same_tree(scene.mnt, scene.source)
            run(*ext4box, "umount", str(scene.mnt), check=True)
            assert not fuse_mounted(scene.mnt)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                _, err = server.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                _, err = server.communicate()
        assert '"event": "ready"' in err, err[-2000:]
        e2fsck_clean(image)


def test_connect_without_a_listener_is_one_line(tmp_path):
    with make_scene("", "") as scene:
        image = scene.images / "disk.img"
        (scene.policy / "10-deploy.toml").write_text(
            f'[[rule]]\nname = "systemd"\nimages = ["{image}"]\nusers = ["root"]\n'
            f'mountpoints = ["{scene.mnt}"]\nmax_size = "64M"\n'
        )
        proc = run(sys.executable, "-m", "ext4box", "mount", str(image), str(scene.mnt),
                   "--policy", str(scene.policy), "--handoff-connect",
                   str(tmp_path / "none.sock"))  # fmt: skip
        assert proc.returncode == 1
        line = proc.stderr.strip().splitlines()[-1]
        assert line == (
            f"ext4box: error: no ext4box server is listening on {tmp_path / 'none.sock'}"
            " (start its socket unit: systemctl start ext4box-server.socket)"
        )
        assert not fuse_mounted(scene.mnt)
