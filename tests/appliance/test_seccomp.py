"""The two seccomp stages: the service's own filter (stage 2), run for real in
child processes, and the OCI profile seccomp/ext4box.json checked against
libseccomp's syscall table. (The profile in a real container:
test_container_sandbox.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ext4box.service import libseccomp, lockdown

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "seccomp" / "ext4box.json"

# What the OCI profile must never allow, unconditionally or at all.
FORBIDDEN = {
    "mount", "umount2", "fsopen", "fsmount", "fsconfig", "move_mount", "open_tree",
    "pivot_root", "chroot", "ptrace", "process_vm_readv", "process_vm_writev", "bpf",
    "keyctl", "add_key", "request_key", "unshare", "setns", "capset", "setuid", "setgid",
    "setresuid", "setresgid", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "reboot", "swapon", "swapoff", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "open_by_handle_at", "name_to_handle_at",
    "pidfd_getfd", "personality", "acct", "syslog", "memfd_create", "bind", "listen",
    "accept", "accept4",
}  # fmt: skip

CHILD = textwrap.dedent(
    """
    import errno, json, os, socket, sys, threading
    sys.path.insert(0, {app!r})
    from ext4box.service import lockdown
    held = os.open({held!r}, os.O_RDONLY | os.O_CLOEXEC)
    lockdown.prepare()
    lockdown.lock_down()
    out = {{}}
    def attempt(name, call):
        try:
            call()
            out[name] = "allowed"
        except OSError as exc:
            out[name] = errno.errorcode[exc.errno]
    attempt("open_new", lambda: os.open({new!r}, os.O_RDONLY))
    attempt("create", lambda: os.open({new!r} + ".x", os.O_WRONLY | os.O_CREAT))
    attempt("socket_unix", lambda: socket.socket(socket.AF_UNIX))
    attempt("socketpair", socket.socketpair)
    attempt("pipe", os.pipe)
    attempt("fork", lambda: os.fork() or None)
    attempt("execve", lambda: os.execv("/bin/true", ["true"]))
    out["held_read"] = os.pread(held, 100, 0).decode()
    # The native FUSE loop is one thread: stage 2 refuses clone.
    try:
        threading.Thread(target=lambda: None).start()
        out["thread"] = "allowed"
    except RuntimeError:
        out["thread"] = "refused"
    print(json.dumps(out))
    """
)


def test_stage2_denies_new_files_and_keeps_held_fds(tmp_path: Path) -> None:
    held = tmp_path / "held.txt"
    held.write_text("held content")
    new = tmp_path / "other.txt"
    new.write_text("never read")
    code = CHILD.format(app=str(REPO / "app"), held=str(held), new=str(new))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for name in ("open_new", "create", "socket_unix", "socketpair", "pipe", "fork", "execve"):
        assert out[name] == "EPERM", (name, out)
    assert out["held_read"] == "held content"
    assert out["thread"] == "refused"
    assert not (tmp_path / "other.txt.x").exists()


def test_self_test_stage2_on_the_host() -> None:
    """Unconfined, stage 1 allows things (we are root); stage 2 must deny all."""
    proc = subprocess.run(
        [sys.executable, "-m", "ext4box.service.main", "--self-test", "--allow-privileged"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(proc.stdout)
    stage2 = report["stage2"]
    assert stage2.pop("lock_down") == {"result": "installed"}
    assert stage2.pop("held_fd_read") == {"result": "works"}
    assert stage2.pop("thread_start") == {"result": "denied", "errno": "EPERM"}
    assert stage2 and all(v == {"result": "denied", "errno": "EPERM"} for v in stage2.values()), (
        stage2
    )
    # As root without a sandbox, stage 1 lets things through: the self-test says so.
    assert proc.returncode == 1 and report["ok"] is False
    assert report["stage1"]["socket_af_inet"]["result"] == "allowed"


def _profile() -> dict:
    return json.loads(PROFILE.read_text())


def test_profile_is_an_allowlist_of_known_syscalls() -> None:
    profile = _profile()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1
    assert profile["architectures"] == ["SCMP_ARCH_X86_64"]
    seen = set()
    for entry in profile["syscalls"]:
        for name in entry["names"]:
            assert libseccomp.resolve(name) >= 0, f"{name} is not an x86_64 syscall"
            seen.add(name)
        assert entry["action"] in ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO")
    assert not seen & FORBIDDEN, seen & FORBIDDEN


def test_profile_argument_filters() -> None:
    by_name: dict[str, list[dict]] = {}
    for entry in _profile()["syscalls"]:
        for name in entry["names"]:
            by_name.setdefault(name, []).append(entry)
    # socket: AF_UNIX only; no socketpair at all (the native FUSE loop has no
    # event loop wakeup pair)
    (entry,) = by_name["socket"]
    assert entry["args"] == [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]
    assert "socketpair" not in by_name
    # clone: never with a namespace flag; clone3 answers ENOSYS (flags unseen)
    (clone,) = by_name["clone"]
    (cond,) = clone["args"]
    assert cond["op"] == "SCMP_CMP_MASKED_EQ" and cond["valueTwo"] == 0
    assert cond["value"] & 0x10000000 and cond["value"] & 0x00020000  # NEWUSER, NEWNS
    assert cond["value"] == lockdown.CLONE_NAMESPACES
    (clone3,) = by_name["clone3"]
    assert clone3["action"] == "SCMP_ACT_ERRNO" and clone3["errnoRet"] == 38
    # ioctl: only named requests, never TIOCSTI (0x5412)
    requests = {e["args"][0]["value"] for e in by_name["ioctl"]}
    assert all(len(e["args"]) == 1 and e["args"][0]["index"] == 1 for e in by_name["ioctl"])
    assert 0x5412 not in requests


def test_stage2_allows_nothing_the_profile_forbids() -> None:
    allowed_by_profile = {n for e in _profile()["syscalls"] for n in e["names"]}
    stage2 = {rule.syscall for rule in lockdown.rules(writable=False)}
    # Stage 2 only narrows; the rw additions arrive with the write path.
    assert stage2 - allowed_by_profile <= {"statx", "epoll_pwait", "epoll_pwait2", "ppoll",
                                           "select", "pselect6", "clock_gettime", "clock_getres",
                                           "gettimeofday", "get_robust_list", "sched_getaffinity",
                                           "membarrier", "exit"}  # fmt: skip
    assert not stage2 & {"openat", "open", "creat", "execve", "socket", "socketpair", "pipe2"}


@pytest.mark.parametrize("name", ["openat", "execve", "socket", "mount", "ptrace"])
def test_stage2_rule_names_resolve(name: str) -> None:
    assert libseccomp.resolve(name) >= 0
