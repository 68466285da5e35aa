"""`ext4box mount`, `ext4box umount`: the host helper (`list` is listing.py).

mount, in this order (each step only if the previous one passed):
  1. load the policy (all or nothing) and open the mountpoint once, as an
     fd (helper/mountpoint_fd.py): its path is what the policy judges and
     the fd is what the mount is attached to, whatever is swapped meanwhile;
  2. open the image by its real path, with exactly the requested access,
     and lock it (shared for ro, exclusive for rw);
  3. ask the policy (which may hash the image, under our lock), log the
     decision; a rule that judges the image's bytes (sha256, refuse_features)
     admits only an image nobody but root can change (helper/pinned.py);
     refuse features the matching rule names (superblock only), and tell the
     server to refuse them too, on the bytes it parses (MOUNT, protocol 2);
  4. find podman and the server image, mount /dev/fuse on the held fd;
  5. start the server container, hand it the two fds, wait for READY;
  6. record the mount. Any failure after 4 unmounts and removes the
     container again, so a failed mount leaves nothing behind.
Every failure is one HelperError line; cli.py prints it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from ext4box import bdi
from ext4box.handoff_protocol import HandoffError, PeerRefused
from ext4box.helper import (
    container,
    doctor,
    external,
    fusemount,
    handoff,
    mountpoint_fd,
    pinned,
    state,
)
from ext4box.helper.errors import HelperError
from ext4box.helper.image import OpenedImage, check_features, lock_image, open_image
from ext4box.log import get_logger
from ext4box.policy import (
    Decision,
    Identity,
    Policy,
    PolicyLoadError,
    Request,
    identity_of_uid,
    load_policy,
    sha256_of_fd,
)

log = get_logger("ext4box.helper")

DEFAULT_TIMEOUT = 30.0
GONE_TIMEOUT = 1.5  # how long umount waits for the server to exit by itself


@dataclass(frozen=True, slots=True)
class MountResult:
    record: state.MountRecord
    ready_seconds: float  # container start to READY
    # With an external server (compose, Kubernetes, systemd): the hand-off
    # socket, still open, so `--foreground` can watch it for the server's exit.
    channel: socket.socket | None = None


# -- mount ----------------------------------------------------------------------


def mount(
    image_arg: str,
    mountpoint_arg: str,
    *,
    mode: str = "ro",
    policy_dir: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    endpoint: external.Endpoint | None = None,
) -> MountResult:
    """Mount through a server container we start, or (endpoint) one already running."""
    _ensure_stdio()
    who = identity_of_uid(os.getuid(), os.getgid())
    policy = _load_policy(policy_dir)
    held = _hold_mountpoint(mountpoint_arg, who.uid)
    try:
        result = _mount_held(image_arg, held, mode, policy, who, timeout, endpoint)
    finally:
        held.close()
    _raise_read_ahead(held.path, timeout)
    return result


def _mount_held(
    image_arg: str,
    held: mountpoint_fd.HeldMountpoint,
    mode: str,
    policy: Policy,
    who: Identity,
    timeout: float,
    endpoint: external.Endpoint | None,
) -> MountResult:
    mountpoint = held.path  # decided once, on the fd the mount will be attached to
    image = open_image(image_arg, mode)
    try:
        lock_image(image)
        decision = policy.decide(
            Request(
                image=image.path,
                image_size=image.size,
                uid=who.uid,
                user=who.user,
                gids=who.gids,
                groups=who.groups,
                mode=mode,
                mountpoint=mountpoint,
                is_block_device=image.is_block_device,
                sha256=lambda: sha256_of_fd(image.fd),
            )
        )
        _log_decision(who.user, who.uid, image, mountpoint, decision)
        if not decision.allowed:
            raise HelperError(decision.reason)
        if pinned.pins_bytes(decision):
            pinned.check_unchangeable(image, decision)
        check_features(image, decision.refused_features, decision.rule)
        spec = _mount_spec(image, held, decision)
        if endpoint is not None:
            return _mount_external(endpoint, image, spec, decision, timeout)
        podman = doctor.preflight(mountpoint)  # everything a container start needs
        return _mount_and_serve(podman, image, spec, decision, timeout)
    finally:
        image.close()


def _raise_read_ahead(mountpoint: str, timeout: float) -> None:
    """Raise the new mount's read-ahead (see ext4box.bdi), as `ext4box serve` does
    for its own mounts; only root may. The server's FUSE_INIT reply would undo an
    earlier setting, and a statfs of the mount returns only once the kernel has
    processed it (in a thread: a server that stops answering must not hang us)."""
    if os.geteuid() != 0:
        return
    answered = threading.Event()

    def statfs() -> None:
        with contextlib.suppress(OSError):
            os.statvfs(mountpoint)
            answered.set()

    threading.Thread(target=statfs, daemon=True).start()
    if not answered.wait(timeout):
        log.info("read_ahead_not_set", mountpoint=mountpoint, why="statfs not answered")
        return
    bdi.set_read_ahead(mountpoint)


def _mount_spec(
    image: OpenedImage, held: mountpoint_fd.HeldMountpoint, decision: Decision
) -> fusemount.MountSpec:
    flags = decision.mount_flags
    return fusemount.MountSpec(
        mountpoint=held.path,
        dir_fd=held.fd,
        source=image.path,
        mode=image.mode,
        noexec="noexec" in flags,
        allow_other="allow_other" in flags,
        uid=os.getuid(),
        gid=os.getgid(),
    )


def _mount_external(
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
    record = state.MountRecord(
        name=name,
        image=image.path,
        mountpoint=mountpoint,
        mode=image.mode,
        container_id=endpoint.describe(),
        since=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        pid=peer.pid or None,
        uid=os.getuid(),
        flags=tuple(decision.mount_flags),
        rule=decision.rule,
        sha256=decision.sha256,
    )
    state.save(record)
    log.info("mounted", server=endpoint.describe(), image=image.path, mountpoint=mountpoint,
             mode=image.mode, ready_seconds=round(ready, 3))  # fmt: skip
    return MountResult(record, ready, sock)


def serve_until_stopped(result: MountResult) -> str:
    """`ext4box mount --foreground`: hold the mount until SIGTERM/SIGINT or the server exits.

    Then unmount (an unmount propagates to every peer of the mount, e.g. the
    host side of a compose or Kubernetes shared volume) and forget the record.
    Returns why it stopped.
    """
    import select
    import signal

    class _Stop(Exception):
        pass

    def _stop(signum: int, _frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    channel = result.channel
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    why = "server exited"
    try:
        while channel is not None:
            readable, _, _ = select.select([channel], [], [], 1.0)
            if readable:
                with contextlib.suppress(OSError):
                    if channel.recv(64):
                        continue  # the protocol sends nothing after READY; ignore it
                break
    except _Stop as stop:
        why = str(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if channel is not None:
            channel.close()
    with contextlib.suppress(HelperError):
        umount(result.record.mountpoint)
    log.info("stopped", reason=why, mountpoint=result.record.mountpoint)
    return why


def _mount_and_serve(
    podman: container.Podman,
    image: OpenedImage,
    spec: fusemount.MountSpec,
    decision: Decision,
    timeout: float,
) -> MountResult:
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
    record = state.MountRecord(
        name=name,
        image=image.path,
        mountpoint=mountpoint,
        mode=image.mode,
        container_id=container_id,
        since=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        pid=container.container_pid(podman, name),
        uid=os.getuid(),
        flags=tuple(decision.mount_flags),
        rule=decision.rule,
        sha256=decision.sha256,
    )
    state.save(record)
    log.info("mounted", container=name, image=image.path, mountpoint=mountpoint,
             mode=image.mode, ready_seconds=round(ready, 3))  # fmt: skip
    return MountResult(record, ready)


def _load_policy(policy_dir: str | None) -> Policy:
    try:
        return load_policy(policy_dir, check_ownership=True)
    except PolicyLoadError as err:
        raise HelperError(f"policy error: {err}") from None


def _hold_mountpoint(arg: str, uid: int) -> mountpoint_fd.HeldMountpoint:
    """Open the mountpoint once; everything after decides on and mounts onto this fd."""
    held = mountpoint_fd.hold(arg)
    try:
        mountpoint_fd.check_owner(held, uid)
        if fusemount.mounted_fstype(held.path) == fusemount.FSTYPE:
            raise HelperError(f"{held.path} is already an ext4box mount (see ext4box list)")
    except BaseException:
        held.close()
        raise
    return held


def _log_decision(
    user: str | None, uid: int, image: OpenedImage, mountpoint: str, decision: Decision
) -> None:
    log.info(
        "mount_decision",
        allowed=decision.allowed,
        user=user,
        uid=uid,
        image=image.path,
        image_size=image.size,
        block_device=image.is_block_device,
        sha256=decision.sha256,
        mode=image.mode,
        mountpoint=mountpoint,
        flags=list(decision.mount_flags) if decision.allowed else [],
        rule=decision.rule,
        rule_file=decision.file,
        reason=decision.reason,
    )


def _ensure_stdio() -> None:
    # With fd 0-2 closed, an image or socket fd could land on them and be
    # written to by accident (or be replaced by a child's dup2).
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


# -- umount ---------------------------------------------------------------------


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

