"""compose/compose.yaml brought up with podman-compose: server + helper, a host-visible mount.

The helper container mounts on a bind of the host's mount directory with
rshared propagation; the host reads the files, compares them with the
source tree, and `podman-compose down` (the helper's SIGTERM) unmounts.
A second test keeps the helper on the host (`ext4box mount --handoff-listen`)
and runs only the server from the compose file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

import pytest

from deploy.conftest import REPO, e2fsck_clean, fuse_mounted, make_scene, run, same_tree

pytestmark = pytest.mark.timeout(300)
COMPOSE_FILE = REPO / "compose/compose.yaml"


def podman_compose() -> str:
    found = shutil.which("podman-compose") or shutil.which(
        "podman-compose", path=str(Path(sys.executable).parent)
    )
    if not found:
        reason = "podman-compose is not installed (pip install podman-compose)"
        print(reason)
        pytest.skip(reason)
    return found


def compose_env(scene, server_image: str) -> dict[str, str]:
    return {
        "EXT4BOX_SERVER_IMAGE": server_image,
        "EXT4BOX_SECCOMP_PROFILE": str(REPO / "seccomp/ext4box.json"),
        "EXT4BOX_IMAGE_DIR": str(scene.images),
        "EXT4BOX_IMAGE_FILE": "disk.img",
        "EXT4BOX_POLICY_DIR": str(scene.policy),
        "EXT4BOX_HANDOFF_DIR": str(scene.handoff),
        "EXT4BOX_MOUNT_DIR": str(scene.mnt),
    }


def wait_for(predicate, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def allowed_syscalls(container: str) -> set[str]:
    """The seccomp allowlist podman actually gave the container (its OCI config)."""
    cid = run("podman", "inspect", "--format", "{{.Id}}", container, check=True).stdout.strip()
    config = json.loads(
        Path(f"/var/lib/containers/storage/overlay-containers/{cid}/userdata/config.json")
        .read_text()
    )  # fmt: skip
    seccomp = config["linux"]["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO"
    return {n for rule in seccomp["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
            for n in rule["names"]}  # fmt: skip


def profile_syscalls() -> set[str]:
    profile = json.loads((REPO / "seccomp/ext4box.json").read_text())
    return {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
            for n in rule["names"]}  # fmt: skip


def test_compose_up_mounts_on_the_host_and_down_unmounts(server_image):
    tool = podman_compose()
    project = f"ext4box-t{secrets.token_hex(3)}"
    with make_scene("/images", "/mnt/ext4box") as scene:
        env = compose_env(scene, server_image)
        compose = [tool, "-p", project, "-f", str(COMPOSE_FILE)]
        up = run(*compose, "up", "-d", env=env)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            server, helper = f"{project}_server_1", f"{project}_helper_1"
            wait_for(lambda: fuse_mounted(scene.mnt), "the FUSE mount on the host")
            same_tree(scene.mnt, scene.source)
            line = next(row for row in Path("/proc/self/mountinfo").read_text().splitlines()
                        if f" {scene.mnt} " in row and "fuse.ext4box" in row)  # fmt: skip
            assert {"ro", "nosuid", "nodev"} <= set(line.split()[5].split(","))
            # The server's sandbox is the appliance's: checked on the running container.
            fmt = ("{{.EffectiveCaps}}|{{.HostConfig.ReadonlyRootfs}}|{{.HostConfig.NetworkMode}}"
                   "|{{.HostConfig.SecurityOpt}}|{{.Config.User}}")  # fmt: skip
            shown = run("podman", "inspect", "--format", fmt, server, check=True).stdout.strip()
            caps, readonly, network, secopts, _user = shown.split("|")
            assert (caps, readonly, network) == ("[]", "true", "none"), shown
            assert "no-new-privileges" in secopts, shown
            assert allowed_syscalls(server) == profile_syscalls()
            # Stopping the helper unmounts everywhere; the server's session ends.
            run("podman", "stop", "-t", "10", helper, check=True)
            assert not fuse_mounted(scene.mnt)
            logs = run("podman", "logs", helper).stdout
            assert "unmounted /mnt/ext4box (SIGTERM)" in logs, logs
            wait_for(lambda: "exited" in run("podman", "inspect", "--format",
                     "{{.State.Status}}", server).stdout, "the server to exit")  # fmt: skip
            code = run("podman", "inspect", "--format", "{{.State.ExitCode}}", server).stdout
            assert code.strip() == "0"
        finally:
            down = run(*compose, "down", "-t", "10", env=env)
        assert down.returncode == 0, down.stderr
        assert not fuse_mounted(scene.mnt)
        assert run("podman", "container", "exists", server).returncode == 1
        e2fsck_clean(scene.images / "disk.img")


def test_compose_server_with_the_helper_on_the_host(server_image):
    tool = podman_compose()
    project = f"ext4box-t{secrets.token_hex(3)}"
    with make_scene("", "") as scene:
        image = scene.images / "disk.img"
        (scene.policy / "10-deploy.toml").write_text(
            f'[[rule]]\nname = "host"\nimages = ["{image}"]\nusers = ["root"]\n'
            f'mountpoints = ["{scene.mnt}"]\nmax_size = "64M"\n'
        )
        env = compose_env(scene, server_image)
        compose = [tool, "-p", project, "-f", str(COMPOSE_FILE)]
        up = run(*compose, "up", "-d", "server", env=env)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            sock = scene.handoff / "handoff.sock"
            ext4box = [sys.executable, "-m", "ext4box"]
            mounted = run(*ext4box, "mount", str(image), str(scene.mnt), "--policy",
                          str(scene.policy), "--handoff-listen", str(sock),
                          "--server-uid", "3000010001")  # fmt: skip
            assert mounted.returncode == 0, mounted.stderr
            assert f"server socket:{sock}" in mounted.stdout
            assert not sock.exists()  # one server per mount: the name is gone
            same_tree(scene.mnt, scene.source)
            listed = json.loads(run(*ext4box, "list", "--json", check=True).stdout or "[]")
            mine = [r for r in listed if r["mountpoint"] == str(scene.mnt)]
            assert [(r["container_id"], r["status"]) for r in mine] == [
                (f"socket:{sock}", "serving")
            ]
            run(*ext4box, "umount", str(scene.mnt), check=True)
            assert not fuse_mounted(scene.mnt)
            server = f"{project}_server_1"
            wait_for(lambda: "exited" in run("podman", "inspect", "--format",
                     "{{.State.Status}}", server).stdout, "the server to exit")  # fmt: skip
        finally:
            run(*compose, "down", "-t", "5", env=env)
        e2fsck_clean(image)


def test_compose_names_a_missing_setting():
    tool = podman_compose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXT4BOX_")}
    proc = run(tool, "-f", str(COMPOSE_FILE), "config", env=env)
    assert proc.returncode != 0
    print(f"\n{(proc.stdout + proc.stderr).strip().splitlines()[-1]}")
    assert "set EXT4BOX_" in proc.stdout + proc.stderr
