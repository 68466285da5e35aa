"""Active mounts, one JSON file each, in a per-user runtime directory.

Root keeps them in /run/ext4box/mounts, other users in
$XDG_RUNTIME_DIR/ext4box/mounts (tmpfs: a reboot forgets mounts that no
longer exist), or /tmp/ext4box-run-UID/ext4box/mounts without a session.
The container's log file sits next to its record. Root's `list` also reads
every user's records from those places (other_users_records), trusting
only files that the directory's owner owns.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ext4box.helper.errors import HelperError

ROOT_STATE_DIR = Path("/run/ext4box/mounts")
MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class MountRecord:
    name: str  # container name, also the record's file name
    image: str
    mountpoint: str
    mode: str
    container_id: str
    since: str  # ISO 8601, UTC
    pid: int | None  # the server's host pid (podman inspect), when known
    uid: int
    flags: tuple[str, ...]
    rule: str | None
    sha256: str | None = None
    mount_id: int | None = None  # the kernel's mount id (broker mounts: unmount checks it)

    def to_json(self) -> str:
        data = asdict(self)
        data["flags"] = list(self.flags)
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MountRecord:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        data = {key: value for key, value in data.items() if key in known}
        data["flags"] = tuple(data.get("flags", ()))
        return cls(**data)


def use_root_state_dir(path: Path) -> None:
    """Keep root's records elsewhere (`ext4box broker --state-dir`, for tests)."""
    global ROOT_STATE_DIR
    ROOT_STATE_DIR = path


def state_dir() -> Path:
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    from ext4box.helper.container import runtime_dir

    return runtime_dir() / "ext4box" / "mounts"


def ensure_state_dir() -> Path:
    path = state_dir()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as err:
        raise HelperError(f"cannot create state directory {path}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise HelperError(f"state directory {path} is not a directory owned by uid {os.geteuid()}")
    return path


def log_path(name: str) -> Path:
    return ensure_state_dir() / f"{name}.log"


def save(record: MountRecord) -> None:
    directory = ensure_state_dir()
    tmp = directory / f".{record.name}.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(record.to_json())
    os.replace(tmp, directory / f"{record.name}.json")


def load_all() -> list[MountRecord]:
    directory = state_dir()
    records = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            with open(directory / name, encoding="utf-8") as f:
                records.append(MountRecord.from_json(f.read(MAX_RECORD_BYTES)))
        except (OSError, ValueError, TypeError):
            continue  # a torn or foreign file is not a mount
    return sorted(records, key=lambda r: r.since)


def other_users_records() -> list[MountRecord]:
    """Root's view of every other user's mounts, from where their helpers keep them.

    A user writes their own records, so a record counts only if its
    directories and file belong to one uid, and its uid is that owner's.
    """
    candidates: list[tuple[Path, Path]] = []  # (runtime dir, its mounts dir)
    for pattern_dir, prefix in (
        (Path("/run/user"), ""),
        (Path(tempfile.gettempdir()), "ext4box-run-"),
    ):
        try:
            names = os.listdir(pattern_dir)
        except OSError:
            continue
        for name in names:
            if name.startswith(prefix) and name[len(prefix) :].isdigit():
                runtime = pattern_dir / name
                candidates.append((runtime, runtime / "ext4box" / "mounts"))
    records = []
    for runtime, mounts in candidates:
        owner = _owner_of_dirs(runtime, runtime / "ext4box", mounts)
        if owner is None or owner == os.geteuid():
            continue
        records.extend(r for r in _read_records(mounts, owner) if r.uid == owner)
    return sorted(records, key=lambda r: r.since)


def _owner_of_dirs(*paths: Path) -> int | None:
    owners = set()
    for path in paths:
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        owners.add(st.st_uid)
    return owners.pop() if len(owners) == 1 else None


def _read_records(directory: Path, owner: int) -> list[MountRecord]:
    records = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            fd = os.open(
                directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
                continue
            records.append(MountRecord.from_json(os.read(fd, MAX_RECORD_BYTES).decode()))
        except (OSError, ValueError, TypeError):
            continue  # a torn or foreign file is not a mount
        finally:
            os.close(fd)
    return records


def find(mountpoint: str) -> MountRecord | None:
    for record in load_all():
        if record.mountpoint == mountpoint:
            return record
    return None


def forget(record: MountRecord) -> None:
    directory = state_dir()
    for path in (directory / f"{record.name}.json", directory / f"{record.name}.log"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
