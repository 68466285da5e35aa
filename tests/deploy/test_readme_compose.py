"""The README's compose sequence, copy-pasted as root on a fresh /srv, /mnt and /etc/ext4box
(tmpfs in a private mount namespace). Issue 16 item 7: as written it failed with runc's
rlimit error (no podman-env.sh), a missing policy directory and a missing image."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

from deploy.test_compose import podman_compose
from docs.snippets import run_snippet, snippet

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="rootful podman-compose: root only"),
]
HANDOFF_DIR = Path("/run/ext4box-handoff")  # the snippet creates it on the real /run


def test_readme_compose_snippet_runs_as_written(default_server_image):
    tool = podman_compose()
    code = snippet("Deployments", "source scripts/podman-env.sh")
    existed = HANDOFF_DIR.exists()
    # A user's shell: podman-compose on PATH, nothing of ours in the environment.
    env = {"PATH": f"{Path(tool).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
           "HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}  # fmt: skip
    try:
        outcome = run_snippet(code, fresh=("/srv", "/mnt", "/etc/ext4box"), env=env)
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                HANDOFF_DIR.rmdir()
    assert outcome.failed == [], outcome.stderr[-3000:]
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    assert "hello.txt" in outcome.stdout.split()  # ls /mnt/a, through the helper's mount
    print(f"\n{sys.executable}: compose snippet ok")
