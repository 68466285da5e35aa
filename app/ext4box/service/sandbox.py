"""The service looks at its own sandbox before it serves a single request.

`inspect()` reads what the kernel says about this process (capabilities,
no_new_privs, seccomp, ids, user namespace, network interfaces) and
`check(report, allow_privileged)` refuses to go on when the process is more
privileged than the appliance is configured to be: the container runs with
--cap-drop=all, no-new-privileges, a seccomp profile and --network=none, so
finding any of those missing means the deployment is wrong, and serving
hostile images from such a process would throw the sandbox away silently.

Everything comes from /proc (no sockets: the netns's interfaces are read from
/proc/self/net/dev), so the report can be taken anywhere in start-up.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

SECCOMP_MODES = {0: "disabled", 1: "strict", 2: "filter"}

# Bit numbers from linux/capability.h, for readable reports.
CAPABILITY_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
    "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
    "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
    "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
    "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
    "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)  # fmt: skip

MAX_STATUS_BYTES = 64 * 1024
MAX_INTERFACES = 256


class SandboxError(Exception):
    """The sandbox could not be read, or it is weaker than configured."""


class SandboxViolation(SandboxError):
    """The process is more privileged than configured; `reasons` lists why."""

    def __init__(self, reasons: tuple[str, ...]) -> None:
        super().__init__(
            "refusing to serve, the sandbox is weaker than configured: "
            + "; ".join(reasons)
            + " (use --allow-privileged to serve anyway)"
        )
        self.reasons = reasons


@dataclass(frozen=True, slots=True)
class SandboxReport:
    uid: int  # real, effective, saved
    euid: int
    suid: int
    gid: int
    egid: int
    sgid: int
    cap_effective: int
    cap_permitted: int
    cap_bounding: int
    cap_ambient: int
    no_new_privs: bool
    seccomp_mode: int  # 0 disabled, 1 strict, 2 filter
    seccomp_filters: int  # -1 when the kernel does not report it
    initial_user_namespace: bool  # uid_map is the identity map of all ids
    interfaces: tuple[str, ...]  # network interfaces of our network namespace

    @property
    def real_root(self) -> bool:
        """uid 0 of the host, not a mapped root inside a user namespace."""
        return self.initial_user_namespace and 0 in (self.uid, self.euid, self.suid)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view for the structured start-up log."""
        out = asdict(self)
        for field in ("cap_effective", "cap_permitted", "cap_bounding", "cap_ambient"):
            out[field] = capability_names(getattr(self, field))
        out["seccomp"] = SECCOMP_MODES.get(self.seccomp_mode, str(self.seccomp_mode))
        out["interfaces"] = list(self.interfaces)
        out["real_root"] = self.real_root
        return out


def capability_names(mask: int) -> list[str]:
    names = []
    for bit in range(mask.bit_length()):
        if mask >> bit & 1:
            names.append(CAPABILITY_NAMES[bit] if bit < len(CAPABILITY_NAMES) else f"cap_{bit}")
    return names


def inspect(proc: str = "/proc/self") -> SandboxReport:
    status = _parse_status(_read_bounded(f"{proc}/status"))
    uid, euid, suid = os.getresuid()
    gid, egid, sgid = os.getresgid()
    return SandboxReport(
        uid=uid,
        euid=euid,
        suid=suid,
        gid=gid,
        egid=egid,
        sgid=sgid,
        cap_effective=_hex_field(status, "CapEff"),
        cap_permitted=_hex_field(status, "CapPrm"),
        cap_bounding=_hex_field(status, "CapBnd"),
        cap_ambient=_hex_field(status, "CapAmb", default=0),
        no_new_privs=_int_field(status, "NoNewPrivs") == 1,
        seccomp_mode=_int_field(status, "Seccomp"),
        seccomp_filters=_int_field(status, "Seccomp_filters", default=-1),
        initial_user_namespace=_is_identity_map(_read_bounded(f"{proc}/uid_map")),
        interfaces=_interfaces(_read_bounded(f"{proc}/net/dev")),
    )


def check(report: SandboxReport, allow_privileged: bool) -> tuple[str, ...]:
    """Return the reasons the sandbox is weak; raise unless allowed.

    An empty tuple means the sandbox is as configured. With
    allow_privileged the reasons are returned for the caller to log.
    """
    reasons = []
    if report.real_root:
        reasons.append("running as real root (uid 0 of the initial user namespace)")
    if report.cap_effective or report.cap_permitted or report.cap_ambient:
        held = capability_names(report.cap_effective | report.cap_permitted | report.cap_ambient)
        shown = ",".join(held[:6]) + (",..." if len(held) > 6 else "")
        reasons.append(f"holds {len(held)} capabilities ({shown})")
    if not report.no_new_privs:
        reasons.append("no_new_privs is not set")
    if report.seccomp_mode == 0:
        reasons.append("no seccomp filter is installed")
    others = [name for name in report.interfaces if name != "lo"]
    if others:
        reasons.append(f"network interfaces other than lo are visible: {','.join(others)}")
    if reasons and not allow_privileged:
        raise SandboxViolation(tuple(reasons))
    return tuple(reasons)


def _read_bounded(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATUS_BYTES + 1)
    except OSError as exc:
        raise SandboxError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_STATUS_BYTES:
        raise SandboxError(f"{path} is larger than {MAX_STATUS_BYTES} bytes")
    return data.decode("ascii", "replace")


def _parse_status(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def _hex_field(status: dict[str, str], key: str, default: int | None = None) -> int:
    return _field(status, key, 16, default)


def _int_field(status: dict[str, str], key: str, default: int | None = None) -> int:
    return _field(status, key, 10, default)


def _field(status: dict[str, str], key: str, base: int, default: int | None) -> int:
    if key not in status:
        if default is None:
            raise SandboxError(f"/proc status has no {key} field")
        return default
    try:
        return int(status[key], base)
    except ValueError:
        raise SandboxError(f"/proc status field {key} is not a number: {status[key]!r}") from None


def _is_identity_map(uid_map: str) -> bool:
    # The initial user namespace maps all 2**32-1 ids onto themselves.
    return uid_map.split() == ["0", "0", "4294967295"]


def _interfaces(net_dev: str) -> tuple[str, ...]:
    names = []
    for line in net_dev.splitlines()[2:]:  # two header lines
        name, sep, _ = line.partition(":")
        if sep:
            names.append(name.strip())
        if len(names) > MAX_INTERFACES:
            raise SandboxError(f"more than {MAX_INTERFACES} network interfaces")
    return tuple(names)
