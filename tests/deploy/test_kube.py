"""compose/k8s/ext4box-pod.yaml: validated offline, then run with `podman kube play`.

The helper container mounts on the pod's "mnt" volume (Bidirectional), the
sidecar server serves it under the ext4box seccomp profile with no
capabilities, and the application container (another uid, no privileges)
reads the file through HostToContainer propagation.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path

import pytest

from deploy.conftest import HELLO, REPO, e2fsck_clean, fuse_mounted, make_scene, run, same_tree

pytestmark = pytest.mark.timeout(300)
MANIFEST = REPO / "compose/k8s/ext4box-pod.yaml"


def validator() -> str:
    found = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    if not found:
        reason = "kubernetes-validate is not installed (pip install kubernetes-validate)"
        print(reason)
        pytest.skip(reason)
    return found


def test_manifest_validates_against_the_kubernetes_schema(tmp_path):
    tool = validator()
    good = run(tool, "--strict", str(MANIFEST))
    assert good.returncode == 0, good.stdout + good.stderr
    print(f"\n{good.stdout.strip()}")
    # The validator does look: a misspelled field fails strict validation.
    broken = tmp_path / "broken.yaml"
    broken.write_text(MANIFEST.read_text().replace("readOnlyRootFilesystem", "readOnlyRootFS", 1))
    bad = run(tool, "--strict", str(broken))
    assert bad.returncode != 0


def localised(scene, tmp_path: Path) -> Path:
    """The manifest with its hostPath volumes pointed at the test's directories."""
    text = MANIFEST.read_text()
    for shipped, here in (
        ("path: /srv/ext4box/images", f"path: {scene.images}"),
        ("path: /srv/ext4box/mnt", f"path: {scene.mnt}"),
        ("path: /etc/ext4box/policy.d", f"path: {scene.policy}"),
    ):
        assert text.count(shipped) == 1, shipped
        text = text.replace(shipped, here)
    out = tmp_path / "pod.yaml"
    out.write_text(text)
    return out


def test_kube_play_app_reads_through_the_sidecar(default_server_image, tmp_path):
    if default_server_image != "localhost/ext4box:0.1.0":
        pytest.skip(f"the manifest names localhost/ext4box:0.1.0, not {default_server_image}")
    if run("podman", "image", "exists", "localhost/ext4box-base:bookworm").returncode != 0:
        pytest.skip("the app container uses localhost/ext4box-base:bookworm, which is missing")
    profiles = tmp_path / "seccomp"
    profiles.mkdir()
    shutil.copy(REPO / "seccomp/ext4box.json", profiles / "ext4box.json")
    with make_scene("/images", "/mnt/ext4box") as scene:
        manifest = localised(scene, tmp_path)
        play = run("podman", "kube", "play", "--network", "none",
                   "--seccomp-profile-root", str(profiles), str(manifest))  # fmt: skip
        try:
            assert play.returncode == 0, play.stdout + play.stderr
            deadline = time.monotonic() + 30
            logs = ""
            while "app: " not in logs:
                assert time.monotonic() < deadline, run(
                    "podman", "logs", "ext4box-demo-helper"
                ).stderr[-2000:]
                time.sleep(0.2)
                logs = run("podman", "logs", "ext4box-demo-app").stdout
            digest = hashlib.sha256(HELLO.encode()).hexdigest()
            assert f"app: {HELLO.strip()}" in logs
            assert f"{digest}  /data/hello.txt" in logs
            # Bidirectional: the mount is on the node (here: the host) too.
            assert fuse_mounted(scene.mnt)
            same_tree(scene.mnt, scene.source)
            report = run("podman", "logs", "ext4box-demo-server").stderr.splitlines()[0]
            for fact in ('"cap_effective": []', '"no_new_privs": true', '"seccomp": "filter"',
                         '"uid": 10001', '"interfaces": ["lo"]'):  # fmt: skip
                assert fact in report, report
            # A graceful stop lets the helper unmount (see compose/k8s/README.md).
            stop = run("podman", "pod", "stop", "-t", "10", "ext4box-demo")
            assert stop.returncode == 0, stop.stderr
            assert not fuse_mounted(scene.mnt)
            assert "unmounted /mnt/ext4box" in run("podman", "logs", "ext4box-demo-helper").stdout
        finally:
            down = run("podman", "kube", "down", str(manifest))
        assert down.returncode == 0, down.stderr
        assert run("podman", "pod", "exists", "ext4box-demo").returncode == 1
        e2fsck_clean(scene.images / "disk.img")
