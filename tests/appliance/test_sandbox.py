"""The service's self-inspection against the kernel, in real restricted processes.

Oracles are the kernel's own answers through other doors than /proc/self/status
(prctl, capget, if_nameindex, getresuid) and processes we restrict for real:
unshare(1) for network and user namespaces, setresuid to drop capabilities,
prctl for no_new_privs and an allow-all seccomp BPF filter.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from ext4box.service import sandbox

REPO = Path(__file__).resolve().parents[2]
PR_GET_SECCOMP = 21
PR_GET_NO_NEW_PRIVS = 39
SYS_CAPGET = 125  # x86_64
LINUX_CAPABILITY_VERSION_3 = 0x20080522

libc = ctypes.CDLL(None, use_errno=True)


def _capget() -> tuple[int, int]:
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two of {effective, permitted, inheritable}
    if libc.syscall(SYS_CAPGET, header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    effective = data[0] | data[3] << 32
    permitted = data[1] | data[4] << 32
    return effective, permitted


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="capget syscall number is x86_64's")
def test_report_matches_the_kernel():
    report = sandbox.inspect()
    assert (report.cap_effective, report.cap_permitted) == _capget()
    assert report.no_new_privs == bool(libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0))
    assert report.seccomp_mode == libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0)
    assert (report.uid, report.euid, report.suid) == os.getresuid()
    assert (report.gid, report.egid, report.sgid) == os.getresgid()
    assert set(report.interfaces) == {name for _, name in socket.if_nameindex()}


# Runs as root in a child, restricts itself step by step, then asks main() for
# the self-report. The system python3 runs it: after the uid drop, nobody must
# still be able to read the interpreter's lazily imported stdlib modules.
SYSTEM_PYTHON = "/usr/bin/python3"
CHILD = textwrap.dedent(
    """
    import ctypes, os, sys
    sys.path.insert(0, {app!r})
    from ext4box.service import main as service_main
    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret, what):
        if ret != 0:
            raise OSError(ctypes.get_errno(), what)

    if {seccomp!r}:
        # One BPF instruction: return SECCOMP_RET_ALLOW for every syscall.
        insn = (ctypes.c_uint16 * 4)(0x06, 0, 0, 0)
        ctypes.memmove(ctypes.addressof(insn) + 4, (ctypes.c_uint32 * 1)(0x7FFF0000), 4)
        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        prog = Prog(1, ctypes.addressof(insn))
        # Still root: CAP_SYS_ADMIN lets us install it without no_new_privs.
        check(libc.prctl(22, 2, ctypes.byref(prog), 0, 0), "PR_SET_SECCOMP")
    if {no_new_privs!r}:
        check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    if {drop!r}:
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)  # clears permitted and effective caps
    sys.exit(service_main.main(["--self-report"]))
    """
)


def _self_report(*, seccomp=True, no_new_privs=True, drop=True, wrap=("unshare", "--net")):
    if os.getuid() != 0:
        pytest.skip("needs root to build the restricted child")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is missing")
    script = CHILD.format(
        app=str(REPO / "app"), seccomp=seccomp, no_new_privs=no_new_privs, drop=drop
    )
    proc = subprocess.run(
        [*wrap, SYSTEM_PYTHON, "-c", script], capture_output=True, text=True, timeout=60
    )
    if proc.returncode not in (0, 3) or not proc.stdout:
        pytest.fail(f"child failed ({proc.returncode}): {proc.stderr}")
    return proc.returncode, json.loads(proc.stdout)


def test_fully_restricted_process_passes():
    code, report = _self_report()
    assert code == 0, report
    assert report["refused"] is False and report["weaknesses"] == []
    assert report["uid"] == report["euid"] == 65534
    assert report["cap_effective"] == report["cap_permitted"] == []
    assert report["no_new_privs"] is True
    assert report["seccomp"] == "filter" and report["seccomp_filters"] >= 1
    assert report["interfaces"] == ["lo"]


@pytest.mark.parametrize(
    ("missing", "reason"),
    [
        ({"seccomp": False}, "no seccomp filter is installed"),
        ({"no_new_privs": False}, "no_new_privs is not set"),
    ],
)
def test_each_missing_layer_is_named(missing, reason):
    code, report = _self_report(**missing)
    assert code == 3
    assert report["refused"] is True
    assert report["weaknesses"] == [reason]


def test_root_with_capabilities_is_refused():
    code, report = _self_report(drop=False)
    assert code == 3
    assert report["real_root"] is True
    assert report["weaknesses"][0] == "running as real root (uid 0 of the initial user namespace)"
    assert report["weaknesses"][1].startswith("holds ")
    assert "sys_admin" in report["cap_effective"]


def test_host_network_is_refused():
    if {name for _, name in socket.if_nameindex()} == {"lo"}:
        pytest.skip("this host has no interface but lo")
    code, report = _self_report(wrap=())
    assert code == 3
    assert len(report["weaknesses"]) == 1
    assert report["weaknesses"][0].startswith("network interfaces other than lo are visible")


def test_mapped_root_in_a_user_namespace_is_not_real_root():
    # Root inside a fresh user namespace holds every capability there, which
    # is still more than configured, but it is not the host's root.
    code, report = _self_report(drop=False, wrap=("unshare", "--user", "--map-root-user", "--net"))
    assert code == 3
    assert report["initial_user_namespace"] is False
    assert report["real_root"] is False
    assert report["uid"] == 0
    assert not any("real root" in reason for reason in report["weaknesses"])
    assert any(reason.startswith("holds ") for reason in report["weaknesses"])


def test_allow_privileged_returns_the_reasons_instead_of_raising():
    report = sandbox.inspect()
    reasons = sandbox.check(report, allow_privileged=True)
    if not reasons:
        pytest.skip("the test process is itself fully sandboxed")
    with pytest.raises(sandbox.SandboxViolation) as refused:
        sandbox.check(report, allow_privileged=False)
    assert refused.value.reasons == reasons
    assert "--allow-privileged" in str(refused.value)
