"""The diff walk: describe every entry of a mounted tree, then compare two descriptions.

A walk never changes what it records: it lstat()s an entry before reading it,
reads through read-only mounts only, and never follows symlinks. Errors are
recorded as values (per entry and field) instead of aborting the walk, so one
comparison reports every difference at once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

_READ_CHUNK = 1 << 20

_KINDS = {
    stat.S_IFREG: "reg",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "lnk",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}


@dataclass(frozen=True, slots=True)
class Entry:
    """Everything the diff walk compares about one path (relative to the mount root)."""

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    ino: int
    blocks: int
    link_target: bytes | None
    xattrs: tuple[tuple[bytes, bytes | str], ...] | str
    sha256: str | None
    children: tuple[str, ...] | None


def _error_text(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"error {name}"


def _xattrs(path: Path) -> tuple[tuple[bytes, bytes | str], ...] | str:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        return _error_text(exc)
    values: list[tuple[bytes, bytes | str]] = []
    for name in sorted(names):
        try:
            value: bytes | str = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            value = _error_text(exc)
        values.append((os.fsencode(name), value))
    return tuple(values)


def _content_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return _error_text(exc)
    try:
        while chunk := os.read(fd, _READ_CHUNK):
            digest.update(chunk)
    except OSError as exc:
        return _error_text(exc)
    finally:
        os.close(fd)
    return digest.hexdigest()


def describe(root: Path, relpath: str) -> Entry | str:
    """One entry's description, or an error string if even lstat fails."""
    path = root / relpath if relpath else root
    try:
        st = os.lstat(path)
    except OSError as exc:
        return _error_text(exc)
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), f"unknown {stat.S_IFMT(st.st_mode):o}")
    link_target = None
    if kind == "lnk":
        try:
            link_target = os.readlink(os.fsencode(path))
        except OSError as exc:
            link_target = _error_text(exc).encode()
    children = None
    if kind == "dir":
        try:
            children = tuple(sorted(os.listdir(path)))
        except OSError as exc:
            children = (_error_text(exc),)
    return Entry(
        path=relpath or ".",
        kind=kind,
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        nlink=st.st_nlink,
        size=st.st_size,
        atime_ns=st.st_atime_ns,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        rdev=st.st_rdev,
        ino=st.st_ino,
        blocks=st.st_blocks,
        link_target=link_target,
        xattrs=_xattrs(path),
        sha256=_content_sha256(path) if kind == "reg" else None,
        children=children,
    )


def walk(root: Path) -> dict[str, Entry | str]:
    """Describe every path under `root` (inclusive), keyed by relative path ('.' = root)."""
    result: dict[str, Entry | str] = {}
    pending = [""]
    while pending:
        relpath = pending.pop()
        entry = describe(root, relpath)
        result[relpath or "."] = entry
        if isinstance(entry, Entry) and entry.kind == "dir" and entry.children is not None:
            for name in entry.children:
                if name.startswith("error "):
                    continue
                pending.append(f"{relpath}/{name}" if relpath else name)
    return result


_COMPARED_FIELDS = tuple(f.name for f in fields(Entry) if f.name != "path")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text)} chars)"


def compare(
    reference: dict[str, Entry | str],
    candidate: dict[str, Entry | str],
    ref_label: str = "kernel",
    cand_label: str = "ext4box",
) -> list[str]:
    """Every difference between two walks, one readable line each (empty = identical)."""
    differences: list[str] = []
    for relpath in sorted(reference.keys() | candidate.keys()):
        ref = reference.get(relpath)
        cand = candidate.get(relpath)
        if ref is None:
            differences.append(f"{relpath}: only in {cand_label}")
            continue
        if cand is None:
            differences.append(f"{relpath}: only in {ref_label}")
            continue
        if isinstance(ref, str) or isinstance(cand, str):
            if ref != cand:
                differences.append(
                    f"{relpath}: lstat {ref_label}={_show(ref)} {cand_label}={_show(cand)}"
                )
            continue
        for name in _COMPARED_FIELDS:
            ref_value = getattr(ref, name)
            cand_value = getattr(cand, name)
            if ref_value != cand_value:
                differences.append(
                    f"{relpath}: {name}: {ref_label}={_show(ref_value)} "
                    f"{cand_label}={_show(cand_value)}"
                )
    return differences


def format_differences(differences: list[str], limit: int = 1000) -> str:
    """A summary by field, then every difference (up to `limit` lines)."""
    by_field = Counter(
        line.split(": ", 2)[1] if line.count(": ") >= 2 else "presence" for line in differences
    )
    summary = ", ".join(f"{name}: {count}" for name, count in by_field.most_common())
    lines = [f"{len(differences)} differences ({summary})"]
    lines.extend(differences[:limit])
    if len(differences) > limit:
        lines.append(f"... and {len(differences) - limit} more")
    return "\n".join(lines)
