"""compose/k8s/README.md's "Run it here", copy-pasted as root on a fresh /srv, /etc/ext4box
and /var/lib/kubelet (tmpfs in a private mount namespace). Issue 16 item 7."""

from __future__ import annotations

import os

import pytest

from docs.snippets import REPO, run_snippet, snippet

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="rootful podman kube play: root only"),
]


def test_kube_readme_snippet_runs_as_written(default_server_image):
    code = snippet("Run it here (podman 4.3)", "source scripts/podman-env.sh",
                   REPO / "compose/k8s/README.md")  # fmt: skip
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root",
           "LANG": "C.UTF-8", "TMPDIR": "/tmp"}  # fmt: skip
    outcome = run_snippet(
        f"timeout 600 bash -e <<'SNIPPET'\n{code}SNIPPET\n",
        fresh=("/srv", "/etc/ext4box", "/var/lib/kubelet"), env=env,
    )  # fmt: skip
    assert outcome.failed == [], outcome.stderr[-3000:]
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    assert "app: Hello from inside an ext4 image" in outcome.stdout
