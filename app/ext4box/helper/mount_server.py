"""Who serves an allowed mount, and how do the fds reach it?

Either a server container started here (podman), or a server already running
that the helper meets at a socket (--handoff-listen/--handoff-connect:
compose, Kubernetes, systemd). Both mount /dev/fuse on the held mountpoint,
hand the server the fuse and image fds (helper/handoff.py), wait for READY
and record the mount (helper/state.py); a failure unmounts and, for a
container, removes it again, so nothing is left behind.
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket
import time
from dataclasses import dataclass

from ext4box.handoff_protocol import HandoffError, PeerRefused
from ext4box.helper import container, external, fusemount, handoff, state
from ext4box.helper.errors import HelperError
from ext4box.helper.image import OpenedImage
from ext4box.log import get_logger
from ext4box.policy import Decision

log = get_logger("ext4box.helper")


@dataclass(frozen=True, slots=True)
class MountResult:
    """A mount made: its record, the time to READY, and an external server's socket."""

    record: state.MountRecord
    ready_seconds: float  # container start to READY
    # With an external server (compose, Kubernetes, systemd): the hand-off
    # socket, still open, so `--foreground` can watch it for the server's exit.
    channel: socket.socket | None = None


def serve_in_container(
    podman: container.Podman,
    image: OpenedImage,
    spec: fusemount.MountSpec,
    decision: Decision,
    timeout: float,
) -> MountResult:
    """Start a server container, then mount and hand it the fds; wait for READY."""
    mountpoint = spec.mountpoint
    request = handoff.mount_request(image, decision)
    name = f"ext4box-{secrets.token_hex(6)}"
    log_file = state.log_path(name)
    labels = {container.LABEL: "1", "org.ext4box.image": image.path}
    started = time.monotonic()
    # The container starts before the mount exists: podman's conmon runs in a
    # mount namespace copied from ours at start, and a copy of our FUSE mount
    # there would keep the connection alive after `ext4box umount`.
    try:
        container_id, sock = container.start(podman, name, log_file, labels, timeout)
    except BaseException:
        container.discard(podman, name, log_file)
        raise
    with sock:
        try:
            mounted = fusemount.mount_held(spec)
        except BaseException:
            container.discard(podman, name, log_file)
            raise
        try:
            handoff.hand_off_to_container(name, log_file, sock, mounted.fuse_fd, image.fd,
                                          request, timeout)  # fmt: skip
        except BaseException:
            fusemount.unmount_mounted(mounted, mountpoint)
            container.discard(podman, name, log_file)
            raise
        finally:
            os.close(mounted.fuse_fd)  # the server holds its own copy now (or nobody does)
            mounted.release_mount_fd()
    ready = time.monotonic() - started
    record = _save_record(name, image, mountpoint, container_id,
                          container.container_pid(podman, name), decision)  # fmt: skip
    log.info("mounted", container=name, image=image.path, mountpoint=mountpoint,
             mode=image.mode, ready_seconds=round(ready, 3))  # fmt: skip
    return MountResult(record, ready)


def serve_at_endpoint(
    endpoint: external.Endpoint,
    image: OpenedImage,
    spec: fusemount.MountSpec,
    decision: Decision,
    timeout: float,
) -> MountResult:
    """Meet the server at endpoint first, then mount: no server, nothing to undo."""
    mountpoint = spec.mountpoint
    started = time.monotonic()
    sock, peer = external.open_channel(endpoint, timeout)
    name = f"ext4box-{secrets.token_hex(6)}"
    try:
        request = handoff.mount_request(image, decision)
        mounted = fusemount.mount_held(spec)
        try:
            handoff.hand_off(sock, mounted.fuse_fd, image.fd, request, timeout=timeout)
            handoff.wait_ready(sock, timeout=timeout)
        except (PeerRefused, HandoffError) as failed:
            fusemount.unmount_mounted(mounted, mountpoint)
            what = "refused" if isinstance(failed, PeerRefused) else "failed"
            raise HelperError(f"the server at {endpoint.path} {what}: {failed.reason}") from None
        except BaseException:
            fusemount.unmount_mounted(mounted, mountpoint)
            raise
        finally:
            os.close(mounted.fuse_fd)
            mounted.release_mount_fd()
    except BaseException:
        sock.close()
        raise
    ready = time.monotonic() - started
    record = _save_record(name, image, mountpoint, endpoint.describe(), peer.pid or None,
                          decision)  # fmt: skip
    log.info("mounted", server=endpoint.describe(), image=image.path, mountpoint=mountpoint,
             mode=image.mode, ready_seconds=round(ready, 3))  # fmt: skip
    return MountResult(record, ready, sock)


def _save_record(
    name: str,
    image: OpenedImage,
    mountpoint: str,
    server: str,
    pid: int | None,
    decision: Decision,
) -> state.MountRecord:
    """Record a mount that answers (`ext4box list`, `umount` and the broker read it)."""
    record = state.MountRecord(
        name=name,
        image=image.path,
        mountpoint=mountpoint,
        mode=image.mode,
        container_id=server,
        since=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        pid=pid,
        uid=os.getuid(),
        flags=tuple(decision.mount_flags),
        rule=decision.rule,
        sha256=decision.sha256,
    )
    state.save(record)
    return record
