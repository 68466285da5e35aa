"""What the figures were measured on: the machine, the tools, the code and the server's caches."""

from __future__ import annotations

import dataclasses
import inspect
import os
import platform
import re
import subprocess
from pathlib import Path

from common import REPO
from support.serve import ext4box_executable


def _run(argv: list[str], *, strip: bool = True) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({err})"
    out = proc.stdout + proc.stderr
    return out.strip() if strip else out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return 0.0


def _disk_under(path: Path) -> str:
    """The filesystem and block device holding `path`, with the device's model."""
    found = _run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(path)]).split()
    if len(found) < 2:
        return "unknown"
    source, fstype = found[0], found[1]
    disk = source
    parent = _run(["lsblk", "-n", "-d", "-o", "PKNAME", source]).strip()
    if parent and "not a block device" not in parent:
        disk = f"/dev/{parent}"
    size = _run(["lsblk", "-n", "-d", "-o", "SIZE", disk]) or "?"
    model = _run(["lsblk", "-n", "-d", "-o", "MODEL", disk]) or "no model name"
    rotational = _run(["lsblk", "-n", "-d", "-o", "ROTA", disk]) == "1"
    kind = "rotational" if rotational else "non-rotational"
    return f"{fstype} on {source} ({disk}: {size}, {model}, reported {kind})"


def _version(argv: list[str], pattern: str) -> str:
    found = re.search(pattern, _run(argv))
    return found.group(0) if found else "unknown"


def git_state() -> dict[str, object]:
    head = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    # Not stripped: porcelain lines start with a status column that may be a space.
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                 strip=False).splitlines()
    return {"commit": head, "dirty": bool(dirty), "dirty_files": [line[3:] for line in dirty][:40]}


def server_caches() -> dict[str, object]:
    """The cache sizes `ext4box serve` uses: read from the code, since serve takes no option."""
    found: dict[str, object] = {}
    try:
        from ext4box.ext4.read.filesystem import CacheSizes

        found["CacheSizes (ext4/filesystem.py)"] = {
            f.name: f.default for f in dataclasses.fields(CacheSizes)}
    except Exception as err:  # the other helper may be reshaping it: report, never fail
        found["CacheSizes (ext4/filesystem.py)"] = f"unreadable: {err!r}"
    try:
        from ext4box.iomap.engine import IOMapEngine

        params = inspect.signature(IOMapEngine.__init__).parameters.values()
        found["IOMapEngine (iomap/engine.py)"] = {
            p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    except Exception as err:
        found["IOMapEngine (iomap/engine.py)"] = f"unreadable: {err!r}"
    try:
        from ext4box.fuse import attrs

        found["FUSE timeouts (fuse/attrs.py)"] = {
            name: getattr(attrs, name) for name in dir(attrs) if name.endswith("_TIMEOUT")}
    except Exception as err:
        found["FUSE timeouts (fuse/attrs.py)"] = f"unreadable: {err!r}"
    helptext = _run([*ext4box_executable(), "serve", "--help"])
    # The flags only ("-o OPT[,OPT...]", "--debug"): argparse wraps their help text.
    flags = [re.split(r"\s{2,}", line.strip())[0] for line in helptext.splitlines()
             if line.strip().startswith("-")]
    found["serve options"] = flags
    found["serve has cache-size options"] = "cache" in helptext.lower()
    return found


def _hypervisor() -> str:
    found = re.search(r"Hypervisor vendor:\s*(\S+)", _run(["lscpu"]))
    return found.group(1) if found else "none"


def load_average() -> list[float]:
    """1/5/15-minute load: other work on the machine skews every figure."""
    return [round(x, 2) for x in os.getloadavg()]


def describe(work: Path) -> dict[str, object]:
    return {
        "cpu": _cpu_model(),
        "hypervisor": _hypervisor(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "kernel": platform.release(),
        "disk": _disk_under(work),
        "python": platform.python_version(),
        "fuse2fs": _version(["fuse2fs", "-V"], r"fuse2fs \S+"),
        "libfuse (fuse2fs)": _version(["fuse2fs", "-V"], r"(?<=FUSE library version: )\S+"),
        "fio": _version(["fio", "--version"], r"fio-\S+"),
        "e2fsprogs": _version(["mkfs.ext4", "-V"], r"mke2fs \S+"),
        "load_at_start": load_average(),
        "git": git_state(),
        "server_caches": server_caches(),
    }
