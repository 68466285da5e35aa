"""The `podman run` line the helper builds: the sandbox is not negotiable."""

from __future__ import annotations

import os
from pathlib import Path

from ext4box.helper import container


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


def test_without_profile_no_seccomp_option():
    assert not any(a.startswith("seccomp=") for a in _argv(_podman(seccomp_profile=None)))


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
