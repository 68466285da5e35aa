"""`ext4box umount`: which mounts may this user unmount, and what is cleaned up after?

Unmounting ends the FUSE session; the record is forgotten, and a server
container this helper started is waited for (or removed). A server it did
not start is left to its orchestrator.
"""

from __future__ import annotations

import os

from ext4box.helper import container, external, fusemount, state
from ext4box.helper.errors import HelperError
from ext4box.log import get_logger

log = get_logger("ext4box.helper")

GONE_TIMEOUT = 1.5  # how long umount waits for the server to exit by itself


def umount(mountpoint_arg: str) -> str:
    """Unmount, stop the server, forget the record; returns what was unmounted."""
    absolute = os.path.normpath(os.path.abspath(mountpoint_arg))
    # realpath would stat a dead mount (ENOTCONN); it tolerates that, and
    # records hold resolved paths, so try both spellings.
    try:
        candidates = {absolute, os.path.realpath(absolute)}
    except OSError:  # a link removed while realpath read it
        candidates = {absolute}
    record = next((r for r in state.load_all() if r.mountpoint in candidates), None)
    path = record.mountpoint if record else absolute
    entry = fusemount.mounted_entry(path)
    mounted = entry is not None and entry.fstype == fusemount.FSTYPE
    if record is None and not mounted:
        raise HelperError(f"{mountpoint_arg} is not an ext4box mount (see ext4box list)")
    if entry is not None and mounted:
        _check_may_unmount(path, entry)
        if not fusemount.unmount(path):
            raise HelperError(f"cannot unmount {path}: it is not a mount this user can unmount")
        if os.geteuid() == 0:
            fusemount.abort_connection(entry.device)
    if record is not None and external.is_external(record.container_id):
        # A server we did not start: unmounting ends its session; its
        # orchestrator (compose, kubelet, systemd) reaps it.
        state.forget(record)
        log.info("unmounted", server=record.container_id, mountpoint=path, image=record.image)
    elif record is not None:
        podman = container.find_podman()
        # Unmounting normally ends the FUSE session: the server exits and
        # --rm removes it. If a copy of the mount in another mount namespace
        # keeps the session alive, SIGTERM makes the server stop serving.
        if not container.wait_gone(podman, record.name, GONE_TIMEOUT):
            container.remove(podman, record.name)
        state.forget(record)
        log.info("unmounted", container=record.name, mountpoint=path, image=record.image)
    return path


def _check_may_unmount(path: str, entry: fusemount.MountEntry) -> None:
    """Only root and the user who mounted it (the FUSE user_id=) may unmount."""
    owner = entry.owner_uid
    if os.geteuid() != 0 and owner != os.getuid():
        whose = f"uid {owner}" if owner is not None else "another user"
        raise HelperError(
            f"{path} is an ext4box mount of {whose}, not yours (uid {os.getuid()});"
            " only its owner or root can unmount it"
        )
