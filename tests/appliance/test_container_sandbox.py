"""The sandbox in the real container: the OCI profile seccomp/ext4box.json with
every run-time flag of the appliance, the self-test, and a full containerised
serve (host mounts and hands off the fds, the container serves, the host reads).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from appliance.fdmount import served_by_handoff
from appliance.test_container import (  # noqa: F401  (image is a fixture)
    REPO,
    SERVICE_ENTRYPOINT,
    image,
    podman,
    podman_env,
)
from support.serve import why_no_fuse

PROFILE = REPO / "seccomp" / "ext4box.json"
# The appliance's run-time flags (issue 4): rootful podman here, with a user
# namespace mapping container uid 0..65535 to unprivileged host ids.
SANDBOX = [
    "--rm", "--init", "--network=none", "--cap-drop=all",
    "--security-opt", "no-new-privileges", "--security-opt", f"seccomp={PROFILE}",
    "--read-only", "--uidmap=0:200000:65536", "--gidmap=0:200000:65536",
]  # fmt: skip

pytestmark = pytest.mark.timeout(900)


def test_self_test_in_the_sandboxed_container(image):  # noqa: F811
    proc = podman(
        "run", *SANDBOX, "--entrypoint", SERVICE_ENTRYPOINT, image, "--self-test", check=False
    )
    report = json.loads(proc.stdout)
    print("\n" + json.dumps({k: report[k] for k in ("not_denied", "broken", "ok")}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["ok"] is True and report["not_denied"] == [] and report["broken"] == []
    assert all(v["result"] == "denied" for v in report["stage1"].values()), report["stage1"]
    stage2 = dict(report["stage2"])
    assert stage2.pop("held_fd_read")["result"] == "works"
    assert stage2.pop("lock_down")["result"] == "installed"
    assert all(v == {"result": "denied", "errno": "EPERM"} for v in stage2.values()), stage2
    sandbox = report["sandbox"]
    assert sandbox["uid"] == 10001 and sandbox["initial_user_namespace"] is False
    assert sandbox["seccomp"] == "filter" and sandbox["no_new_privs"] is True
    assert sandbox["cap_effective"] == [] and sandbox["interfaces"] == ["lo"]


def _tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    for i in range(30):
        (tree / "dir" / f"f{i:02d}").write_bytes(os.urandom(i * 1000))
    (tree / "link").symlink_to("dir/f01")
    return tree


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if "lost+found" not in path.parts and not path.is_symlink():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.skipif(why_no_fuse() is not None or os.geteuid() != 0, reason="needs root + FUSE")
def test_containerised_serve(image, tmp_path):  # noqa: F811
    tree = _tree(tmp_path)
    img = tmp_path / "img.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "24M"], check=True)
    argv = [
        "podman", "run", *SANDBOX, "--preserve-fds=1", "--entrypoint", SERVICE_ENTRYPOINT,
        image, "--handoff-fd", "3",
    ]  # fmt: skip
    start = time.monotonic()
    with served_by_handoff(img, tmp_path / "mnt", argv, env=podman_env()) as served:
        ready = time.monotonic() - start
        assert _hashes(served.mountpoint) == _hashes(tree)
        assert os.readlink(served.mountpoint / "link") == "dir/f01"
    err = served.proc.stderr.read()
    print(f"\ncontainer start-to-ready {ready:.2f} s")
    assert served.proc.returncode == 0, err
    assert '"event": "stage2"' in err and '"seccomp_filters": 2' in err, err
