"""The `podman run` line the helper builds: the sandbox is not negotiable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ext4box.helper import container
from ext4box.helper.errors import HelperError


def _argv(podman: container.Podman) -> list[str]:
    return container.run_command(
        podman, "ext4box-test", Path("/run/x.log"), {container.LABEL: "1"}, 30.0
    )


def _podman(**kw: object) -> container.Podman:
    fields = dict(executable="/usr/bin/podman", env={}, image="localhost/ext4box:9",
                  seccomp_profile="/repo/seccomp/ext4box.json",
                  userns_args=("--userns=nomap",))  # fmt: skip
    fields.update(kw)
    return container.Podman(**fields)  # type: ignore[arg-type]


def test_hardening_flags_always_present():
    argv = _argv(_podman())
    joined = " ".join(argv)
    for flag in ("--rm", "--init", "--detach", "--pull=never", "--network=none",
                 "--cap-drop=all", "--read-only", "--preserve-fds=1", "--userns=nomap",
                 "--security-opt no-new-privileges",
                 "--security-opt seccomp=/repo/seccomp/ext4box.json"):  # fmt: skip
        assert flag in joined, flag
    # No host path is bind-mounted and no device is added: only fds go in.
    assert not {"-v", "--volume", "--mount", "--device", "--privileged"} & set(argv)
    assert argv[-5:] == ["localhost/ext4box:9", "--handoff-fd", "3", "--timeout", "30"]
    assert "path=/run/x.log" in argv


def test_without_profile_refuses_to_start(monkeypatch):
    """Issue 16 item 6: an install outside the checkout silently ran without the allowlist."""
    monkeypatch.setenv("EXT4BOX_SECCOMP_PROFILE", "/nonexistent/ext4box.json")
    with pytest.raises(HelperError) as refused:
        _argv(_podman(seccomp_profile=None))
    assert "no seccomp profile" in refused.value.line
    assert "/nonexistent/ext4box.json" in refused.value.line  # says where it looked
    assert "/usr/share/ext4box/seccomp/ext4box.json" in refused.value.line


def test_runtime_dir_accepts_podmans_0711(monkeypatch, tmp_path):
    """Issue 16 item 5: podman chmods the runtime dir to 0711; that is still private."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(container.tempfile, "gettempdir", lambda: str(tmp_path))
    first = container.runtime_dir()
    first.chmod(0o711)
    assert container.runtime_dir() == first
    first.chmod(0o755)  # others may list it: not private
    with pytest.raises(HelperError, match="not a private directory"):
        container.runtime_dir()


def test_runtime_dir_ignores_someone_elses_xdg(monkeypatch, tmp_path):
    """After a plain `su`, XDG_RUNTIME_DIR still names the previous user's directory."""
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 4321, 4321) if os.geteuid() == 0 else foreign.chmod(0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(foreign))
    monkeypatch.setattr(container.tempfile, "gettempdir", lambda: str(tmp_path))
    assert container.runtime_dir() == tmp_path / f"ext4box-run-{os.getuid()}"


def test_userns_choice():
    args = container._userns_args()
    if os.geteuid() != 0:
        assert args == ("--userns=nomap",)
    else:
        assert args in (
            ("--userns=auto",),
            (f"--uidmap=0:{container.ROOT_USERNS_BASE}:65536",
             f"--gidmap=0:{container.ROOT_USERNS_BASE}:65536"),
        )  # fmt: skip


def test_log_tail_reads_k8s_file_lines(tmp_path):
    log = tmp_path / "c.log"
    log.write_text(
        "2026-01-01T00:00:00.1+00:00 stderr F first\n"
        '2026-01-01T00:00:00.2+00:00 stderr F {"event": "handoff_refused", "reason": "bad fd"}\n'
        "2026-01-01T00:00:00.3+00:00 stderr F last words\n"
    )
    assert container.log_tail(log) == "first | handoff_refused: bad fd | last words"
    assert container.log_tail(tmp_path / "missing.log") == ""
