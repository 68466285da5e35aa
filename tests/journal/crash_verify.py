"""Read a replayed image with debugfs and check it against the crash Model.

debugfs reads the image without our code and without a kernel mount (a
damaged image after a journal-less crash is safe to read this way). The
checks, each a Finding of one kind:

- lost: a must-survive file is missing or differs; a unit an fsync made
  durable reads as zeros or was cut off.
- foreign: a file holds units (or xattr values) of another file, or of a
  file its name never held.
- stale: a unit of the right file at the wrong offset, or a generation never
  written there (a block mapped twice, or reused without being overwritten).
- garbage: bytes that are no workload unit (and not zeros).
- unreadable: debugfs could not open the image at all.
- namespace: a name or directory that name never held; size: a size that is
  not a whole number of units or beyond the largest the file ever had;
  xattr: a value never set under that name.

`STRICT_KINDS` fail every iteration; the others fail only where the image's
journal promises consistency (crash_support decides).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from crash_content import UNIT, UnitId, expected_bytes, parse_unit, parse_xattr_value
from crash_model import ROOT, Entry, FileState, Model

STRICT_KINDS = frozenset({"lost", "foreign", "stale", "garbage", "unreadable"})
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.+/-]+$")
_EA_LIST_LINE = re.compile(r"^\s+(\S+) \((\d+)\)")


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: /{self.path}: {self.detail}"


@dataclass(slots=True)
class ImageTree:
    dirs: set[str] = field(default_factory=set)
    files: dict[str, bytes] = field(default_factory=dict)
    others: dict[str, str] = field(default_factory=dict)
    xattrs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    debugfs_errors: str = ""


def _debugfs(image: Path, commands: list[str], scratch: Path) -> subprocess.CompletedProcess:
    script = scratch / "debugfs.cmds"
    script.write_text("\n".join(commands) + "\n")
    # -c (catastrophic mode) skips reading the allocation bitmaps: after a crash
    # without a journal a bitmap may not match its checksum in the group
    # descriptor yet (e2fsck fixes that), and debugfs would then refuse to open
    # the image at all, which read as every file missing.
    return subprocess.run(["debugfs", "-c", "-f", str(script), str(image)],
                          capture_output=True, text=True, errors="replace", check=False)


def read_image(image: Path, scratch: Path) -> ImageTree:
    """Every directory, regular file (content) and user.* xattr of the image."""
    dump = scratch / "rdump"
    shutil.rmtree(dump, ignore_errors=True)
    dump.mkdir(parents=True)
    tree = ImageTree()
    result = _debugfs(image, [f"rdump / {dump}"], scratch)
    tree.debugfs_errors = _errors(result.stderr)
    if "Filesystem not open" in result.stderr:
        raise RuntimeError(f"debugfs cannot open {image}: {tree.debugfs_errors[:400]}")
    for directory, subdirs, names in os.walk(dump):
        for name in subdirs + names:
            full = Path(directory, name)
            rel = str(full.relative_to(dump))
            st = full.lstat()
            if stat.S_ISDIR(st.st_mode):
                tree.dirs.add(rel)
            elif stat.S_ISREG(st.st_mode):
                tree.files[rel] = full.read_bytes()
            else:
                tree.others[rel] = stat.filemode(st.st_mode)
    shutil.rmtree(dump, ignore_errors=True)
    _read_xattrs(image, tree, scratch)
    return tree


def _errors(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("debugfs "))


def _read_xattrs(image: Path, tree: ImageTree, scratch: Path) -> None:
    paths = sorted(p for p in tree.files if _SAFE_PATH.match(p))
    if not paths:
        return
    listing = _debugfs(image, [f"ea_list /{p}" for p in paths], scratch).stdout
    names: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        if line.startswith("debugfs: ea_list /"):
            current = line.removeprefix("debugfs: ea_list /")
            continue
        match = _EA_LIST_LINE.match(line)
        if current is not None and match and match[1].startswith("user."):
            names.setdefault(current, []).append(match[1])
    values = scratch / "xattrs"
    shutil.rmtree(values, ignore_errors=True)
    values.mkdir()
    wanted = [(p, n, values / f"{i}-{j}") for i, p in enumerate(sorted(names))
              for j, n in enumerate(names[p])]
    if wanted:
        _debugfs(image, [f"ea_get -f {out} /{p} {n}" for p, n, out in wanted], scratch)
    for path, name, out in wanted:
        tree.xattrs.setdefault(path, {})[name] = out.read_bytes() if out.exists() else b""
    shutil.rmtree(values, ignore_errors=True)


def check(model: Model, tree: ImageTree) -> list[Finding]:
    findings: list[Finding] = []
    candidates = _resolve_dirs(model, tree, findings)
    for path, data in sorted(tree.files.items()):
        parent, _, name = path.rpartition("/")
        entries = _entries(model, candidates.get(parent, set()), name)
        fids = {i for kind, i in entries if kind == "f"}
        if parent in candidates and candidates[parent] and not fids:
            findings.append(Finding("namespace", path, "a file where no file ever was"))
        findings += _check_file(model, path, data, fids, tree.xattrs.get(path, {}))
    for path, kind in sorted(tree.others.items()):
        findings.append(Finding("namespace", path, f"unexpected file type {kind}"))
    findings += _check_survivors(model, tree)
    return findings


def _entries(model: Model, parents: set[int], name: str) -> set[Entry]:
    return set().union(*(model.entries_ever.get((p, name), set()) for p in parents))


def _resolve_dirs(model: Model, tree: ImageTree, findings: list[Finding]) -> dict[str, set[int]]:
    """Each directory path -> the directory ids it may be (empty: none it could be)."""
    candidates: dict[str, set[int]] = {"": {ROOT}}
    for path in sorted(tree.dirs, key=lambda p: p.count("/")):
        parent, _, name = path.rpartition("/")
        parents = candidates.get(parent, set())
        dids = {i for kind, i in _entries(model, parents, name) if kind == "d"}
        if parents and not dids:
            findings.append(Finding("namespace", path, "a directory where none ever was"))
        candidates[path] = dids
    return candidates


def _check_file(model: Model, path: str, data: bytes, fids: set[int],
                xattrs: dict[str, bytes]) -> list[Finding]:
    findings: list[Finding] = []
    if len(data) % UNIT:
        findings.append(Finding("size", path, f"size {len(data)} is not whole units"))
    owners: set[int] = set()
    units: list[UnitId | str | None] = []  # str: garbage, reported here
    for index in range(len(data) // UNIT):
        parsed = parse_unit(data[index * UNIT : (index + 1) * UNIT])
        units.append(parsed)
        if isinstance(parsed, str):
            findings.append(Finding("garbage", path, f"unit {index}: {parsed}"))
        elif parsed is not None:
            owners.add(parsed.file_id)
    for name, value in sorted(xattrs.items()):
        named = parse_xattr_value(value)
        if named is None:
            findings.append(Finding("garbage", path, f"xattr {name}: {value[:40]!r}"))
        else:
            owners.add(named[0])
    if len(owners) > 1:
        findings.append(Finding("foreign", path, f"data of files {sorted(owners)} in one file"))
        return findings
    if not owners:
        if fids and all(model.files[f].pinned for f in fids):
            findings.append(Finding("lost", path, "no data, but every file this name held "
                                    f"({sorted(fids)}) had fsynced data"))
        return findings
    (fid,) = owners
    if fid not in model.files or (fids and fid not in fids):
        findings.append(Finding("foreign", path, f"holds file {fid}'s data; the name only "
                                f"ever held {sorted(fids)}"))
        return findings
    f = model.files[fid]
    findings += _check_units(f, path, units)
    findings += _check_xattrs(f, path, xattrs)
    return findings


def _check_units(f: FileState, path: str, units: list[UnitId | str | None]) -> list[Finding]:
    findings = []
    if len(units) > f.max_units:
        findings.append(Finding("size", path, f"{len(units)} units, file {f.fid} never "
                                f"had more than {f.max_units}"))
    for index, unit in enumerate(units):
        if isinstance(unit, str):
            continue  # garbage, already reported
        if unit is None:
            if index in f.pinned:
                findings.append(Finding("lost", path, f"fsynced unit {index} reads as zeros"))
        elif unit.index != index:
            findings.append(Finding("stale", path, f"unit {index} holds unit {unit.index} "
                                    f"(gen {unit.gen})"))
        elif unit.gen not in f.ever.get(index, ()):
            findings.append(Finding("stale", path, f"unit {index} holds gen {unit.gen}, never "
                                    f"written there (written: {sorted(f.ever.get(index, ()))})"))
    cut = sorted(u for u in f.pinned if u >= len(units))
    if cut:
        findings.append(Finding("lost", path, f"fsynced units {cut[0]}..{cut[-1]} cut off "
                                f"(size {len(units)} units)"))
    return findings


def _check_xattrs(f: FileState, path: str, xattrs: dict[str, bytes]) -> list[Finding]:
    return [Finding("xattr", path, f"{name} = {value[:40]!r}... was never set on it")
            for name, value in sorted(xattrs.items())
            if value not in f.xattrs_ever.get(name, ())]


def _check_survivors(model: Model, tree: ImageTree) -> list[Finding]:
    findings = []
    for record in sorted(model.survive.values(), key=lambda r: r.path):
        data = tree.files.get(record.path)
        if data is None:
            said = f" (debugfs said: {tree.debugfs_errors[:400]})" if tree.debugfs_errors else ""
            findings.append(Finding("lost", record.path,
                                    f"fsynced file {record.fid} is missing{said}"))
            continue
        expected = expected_bytes(record.fid, list(record.gens))
        if data != expected:
            findings.append(Finding("lost", record.path, _difference(data, expected)))
        if record.xattrs is not None and tree.xattrs.get(record.path, {}) != record.xattrs:
            findings.append(Finding(
                "lost", record.path, f"fsynced xattrs {sorted(record.xattrs)} differ: found "
                f"{sorted(tree.xattrs.get(record.path, {}))}"))
    return findings


def _difference(data: bytes, expected: bytes) -> str:
    if len(data) != len(expected):
        return f"fsynced size {len(expected)}, found {len(data)}"
    first = next(i for i in range(0, len(data), UNIT)
                 if data[i : i + UNIT] != expected[i : i + UNIT])
    return (f"fsynced content differs from unit {first // UNIT}: found "
            f"{parse_unit(data[first : first + UNIT])}, expected "
            f"{parse_unit(expected[first : first + UNIT])}")
