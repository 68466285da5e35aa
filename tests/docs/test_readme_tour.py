"""The README's 30-second tour, copy-pasted on a fresh machine (issue 16 items 2 and 3).

It used to name an image nobody had, raced the background `serve` (the next
command wrote under the mountpoint before the mount existed) and failed on a
missing policy directory.
"""

from __future__ import annotations

import os
import shutil

import pytest

from docs.snippets import REPO, run_snippet, snippet

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts in its own mount namespace")


def test_tour_runs_as_written():
    if not (REPO / ".venv/bin/ext4box").exists():
        pytest.skip("no .venv (make deps)")
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed")
    code = snippet("A 30-second tour", "mkfs.ext4")
    outcome = run_snippet(code)
    # Exactly one command fails, by design: the example policy denies the image.
    assert [(status, cmd.split()[:3]) for status, cmd in outcome.failed] == [
        (1, [".venv/bin/ext4box", "policy", "check"])
    ], outcome.stderr
    assert "hello.txt" in outcome.stdout  # ls -l of the mount
    assert "Hello" in outcome.stdout or "hello" in outcome.stdout
    assert "DENIED" in outcome.stdout.upper()
    assert "error:" not in outcome.stderr.replace("ext4box: error: denied", "")
