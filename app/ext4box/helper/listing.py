"""`ext4box list`: which ext4box mounts exist, whose they are, and are they served?

A user sees the mounts their own helper recorded. Root sees its own, every
user's (state.other_users_records) and any ext4box mount in the mount table
that nobody recorded (an `ext4box serve`, or a record lost), so nothing
mounted is invisible to the administrator.
"""

from __future__ import annotations

import errno
import json
import os
import pwd

from ext4box.helper import container, external, fusemount, state
from ext4box.helper.errors import HelperError
from ext4box.policy.text import printable

NO_RECORD = "-"


def list_mounts() -> list[dict[str, object]]:
    records = state.load_all()
    rows = [_row(record, known) for record, known in _with_container_states(records)]
    if os.geteuid() == 0:
        rows += [_row(record, _pid_state(record.pid)) for record in state.other_users_records()]
        recorded = {str(row["mountpoint"]) for row in rows}
        rows += [
            _unrecorded_row(entry)
            for entry in _ext4box_mounts()
            if entry.mountpoint not in recorded
        ]
    return rows


def _with_container_states(
    records: list[state.MountRecord],
) -> list[tuple[state.MountRecord, str | None]]:
    if not records:
        return []
    try:
        statuses = container.running_containers(container.find_podman())
    except HelperError:
        statuses = {}
    return [(record, statuses.get(record.name)) for record in records]


def _pid_state(pid: int | None) -> str | None:
    """Another user's container is not in our podman: is its server process alive?"""
    if not pid:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "running"


def _row(record: state.MountRecord, container_state: str | None) -> dict[str, object]:
    return {
        "image": record.image,
        "mountpoint": record.mountpoint,
        "mode": record.mode,
        "user": user_name(record.uid),
        "uid": record.uid,
        "container": record.name,
        "container_id": record.container_id,
        "since": record.since,
        "pid": record.pid,
        "status": _status(record.mountpoint, record.container_id, container_state),
    }


def _unrecorded_row(entry: fusemount.MountEntry) -> dict[str, object]:
    return {
        "image": entry.source,
        "mountpoint": entry.mountpoint,
        "mode": NO_RECORD,
        "user": NO_RECORD,
        "uid": None,
        "container": NO_RECORD,
        "container_id": None,
        "since": NO_RECORD,
        "pid": None,
        "status": _status(entry.mountpoint, None, "running") + " (no ext4box record)",
    }


def _ext4box_mounts() -> list[fusemount.MountEntry]:
    try:
        table = fusemount.mount_table()
    except OSError:
        return []
    return [entry for entry in table if entry.fstype == fusemount.FSTYPE]


def _status(mountpoint: str, container_id: str | None, container_state: str | None) -> str:
    if container_id and external.is_external(container_id):
        container_state = "running"  # not ours to inspect: the mount says it all
    if fusemount.mounted_fstype(mountpoint) != fusemount.FSTYPE:
        return "not mounted"
    try:
        os.stat(mountpoint)
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            return "server gone"
        if err.errno != errno.EACCES:
            return f"error: {err.strerror}"
        # Another user's mount without allow_other: the kernel refuses even
        # root without asking the server, so only its process can tell.
    if container_state is None:
        return "server gone"
    return "serving" if container_state == "running" else container_state


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def format_table(rows: list[dict[str, object]]) -> str:
    header = ("IMAGE", "MOUNTPOINT", "MODE", "USER", "CONTAINER", "SINCE", "STATUS")
    keys = ("image", "mountpoint", "mode", "user", "container", "since", "status")
    # Paths are users' names: an escape sequence in one must not reach root's terminal.
    table = [header] + [tuple(printable(str(row[key])) for key in keys) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def format_json(rows: list[dict[str, object]]) -> str:
    return json.dumps(rows, indent=1)
