"""What the broker does for one caller's `umount` and `list`.

A caller unmounts only mounts recorded as theirs (root: any), and only the
very mount the broker made (mount_ids.unmount_exact checks the recorded id).
Listing shows a caller their own records (root: everyone's) and never touches
a mount's files: a stat of a path a user controls could hang on their own
FUSE server.
"""

from __future__ import annotations

import os

from ext4box.helper import container, fusemount, listing, mount_ids, state
from ext4box.helper.broker_mount import BrokerSettings
from ext4box.helper.errors import HelperError
from ext4box.helper.peer import Caller
from ext4box.log import get_logger

log = get_logger("ext4box.broker")


def umount_for(caller: Caller, mountpoint_arg: str, settings: BrokerSettings) -> dict[str, object]:
    path = os.path.normpath(mountpoint_arg)
    record = next((r for r in state.load_all() if r.mountpoint == path), None)
    if record is None:
        raise HelperError(f"{mountpoint_arg} is not an ext4box mount (see ext4box list)")
    if record.uid != caller.uid and not caller.is_root:
        raise HelperError(
            f"{record.mountpoint} is not your mount (it belongs to uid {record.uid});"
            " only its owner or root can unmount it"
        )
    mounted = record.mount_id is not None and record.mount_id in mount_ids.mount_infos()
    if mounted:
        device = mount_ids.unmount_exact(record.mountpoint, record.mount_id)
        fusemount.abort_connection(device)
    # Unmounting ends the FUSE session and the server exits (--rm removes it);
    # a server that lingers is stopped.
    if not container.wait_gone(settings.podman, record.name, 1.5):
        container.remove(settings.podman, record.name)
    state.forget(record)
    log.info("unmounted", by=caller.uid, owner=record.uid, container=record.name,
             mountpoint=record.mountpoint, image=record.image, was_mounted=mounted)  # fmt: skip
    return {"mountpoint": record.mountpoint}


def list_for(caller: Caller, settings: BrokerSettings) -> dict[str, object]:
    """The caller's mounts (root: everyone's). Nothing here touches a mount's
    files: a stat of a path a user controls could hang on their FUSE server."""
    records = [r for r in state.load_all() if caller.is_root or r.uid == caller.uid]
    statuses = container.running_containers(settings.podman) if records else {}
    live = mount_ids.mount_infos()
    rows = []
    for record in records:
        if record.mount_id is None or record.mount_id not in live:
            status = "not mounted"
        else:
            status = "serving" if statuses.get(record.name) == "running" else "server gone"
        rows.append({"image": record.image, "mountpoint": record.mountpoint,
                     "mode": record.mode, "user": listing.user_name(record.uid),
                     "container": record.name,
                     "container_id": record.container_id, "since": record.since,
                     "pid": record.pid, "uid": record.uid, "status": status})  # fmt: skip
    return {"mounts": rows}
