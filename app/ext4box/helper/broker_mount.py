"""What the broker does for one caller's `mount`.

The caller is who SO_PEERCRED says; everything else is the broker's own
(`BrokerSettings`, fixed at start). A mount, in order:
  1. open the mountpoint and the image as the caller (peer.open_as: the
     kernel checks every permission as them); the mountpoint exactly as the
     root helper opens it (mountpoint_fd.hold: no link in any component),
     then judged on the fd: its path from /proc/self/fd, its owner, who
     must be the caller, and not already an ext4box mount;
  2. lock the image, ask the policy (the broker's directory); a rule that
     judges the image's bytes admits only an image no one but root can
     change (pinned.py); refuse the features the rule names;
  3. start the server container (root podman: a non-root host uid), attach
     FUSE to the held directory fd with the new mount API
     (fusemount.mount_held), hand the fds and the refused features over the
     container's socketpair, wait for READY;
  4. record the mount with its owner's uid and its mount id, read from the
     mount's own fd. A failure after the mount undoes it through that fd.
Unmounting and listing are in broker_unmount.py.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import secrets
import stat
import time
from dataclasses import dataclass

from ext4box.helper import (
    container,
    devices,
    fusemount,
    handoff,
    mount_ids,
    mountpoint_fd,
    pinned,
    state,
)
from ext4box.helper.errors import HelperError
from ext4box.helper.image import OpenedImage, check_features, lock_image, open_image
from ext4box.helper.peer import Caller, open_as
from ext4box.log import get_logger
from ext4box.policy import Decision, Policy, PolicyLoadError, Request, load_policy, sha256_of_fd

log = get_logger("ext4box.broker")


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Everything the broker decides with; none of it comes from a client."""

    policy_dir: str
    podman: container.Podman
    timeout: float = 30.0
    max_mounts_per_user: int = 16


# -- mount --------------------------------------------------------------------------


def mount_for(caller: Caller, image_arg: str, mountpoint_arg: str, mode: str,
              settings: BrokerSettings,
              server_options: tuple[str, ...] = ()) -> dict[str, object]:  # fmt: skip
    policy = _load_policy(settings.policy_dir)
    _check_mount_count(caller, settings)
    held = _hold_mountpoint_as(caller, mountpoint_arg)
    try:
        image, refused, device = _open_image_for(caller, image_arg, mode)
        try:
            decision = _decide(policy, caller, image, held.path, device, refused,
                               server_options)  # fmt: skip
            container.check_image(settings.podman)
            spec = fusemount.MountSpec(
                mountpoint=held.path,
                dir_fd=held.fd,
                source=image.path,
                mode=image.mode,
                noexec="noexec" in decision.mount_flags,
                allow_other="allow_other" in decision.mount_flags,
                uid=caller.uid,
                gid=caller.gid,
            )
            spec = fusemount.with_atime(spec, decision.server_options)
            record, ready = _serve(caller, settings, image, spec, decision)
        finally:
            image.close()
    finally:
        held.close()
    return {"image": record.image, "mountpoint": record.mountpoint, "mode": record.mode,
            "container": record.name, "ready_seconds": round(ready, 3)}  # fmt: skip


def _open_image_for(
    caller: Caller, image_arg: str, mode: str
) -> tuple[OpenedImage, HelperError | None, devices.DeviceName | None]:
    """The image, opened as the caller first: the kernel decides what they may open.

    Only a device named under /dev may then be opened by the broker itself;
    the caller's refusal comes back with it, and _decide keeps the device only
    if a grant_access rule allows exactly this request."""
    device = devices.device_name(image_arg)
    try:
        return _open_image_as(caller, device.node if device else image_arg, mode), None, device
    except HelperError as as_caller:
        if device is None:
            raise
        return devices.open_device(device, mode), as_caller, device


def _decide(
    policy: Policy,
    caller: Caller,
    image: OpenedImage,
    mountpoint: str,
    device: devices.DeviceName | None,
    refused: HelperError | None,
    server_options: tuple[str, ...],
) -> Decision:
    """Lock the image and ask the broker's policy; enforce what it decided."""
    try:
        lock_image(image)
    except HelperError:
        if refused is not None:
            raise refused from None  # say nothing about a device not granted
        raise
    decision = policy.decide(
        Request(
            image=image.path,
            image_size=image.size,
            uid=caller.uid,
            user=caller.identity.user,
            gids=caller.identity.gids,
            groups=caller.identity.groups,
            mode=image.mode,
            mountpoint=mountpoint,
            is_block_device=image.is_block_device,
            sha256=lambda: sha256_of_fd(image.fd),
            image_links=device.links if device else (),
            server_options=server_options,  # judged: the caller asked, the rule decides
        )
    )
    if refused is not None and not (decision.allowed and decision.grant_access):
        raise refused  # what the caller could not open stays unopened for them
    if not decision.allowed:
        raise HelperError(decision.reason)
    # The caller may own the image: a rule that judges its bytes must not
    # trust bytes they can change after this decision (helper/pinned.py).
    if pinned.pins_bytes(decision):
        pinned.check_unchangeable(image, decision)
    check_features(image, decision.refused_features, decision.rule)
    return decision


def _check_mount_count(caller: Caller, settings: BrokerSettings) -> None:
    """Each mount is a container: one user must not be able to start them without end."""
    if caller.is_root:
        return
    mine = sum(1 for record in state.load_all() if record.uid == caller.uid)
    if mine >= settings.max_mounts_per_user:
        raise HelperError(
            f"you have {mine} ext4box mounts, the broker's limit per user;"
            " unmount one first (see ext4box list)"
        )


def _load_policy(directory: str) -> Policy:
    try:
        return load_policy(directory, check_ownership=True)
    except PolicyLoadError as err:
        raise HelperError(f"the broker's policy is broken, ask root to fix it: {err}") from None


def _open_image_as(caller: Caller, image_arg: str, mode: str) -> OpenedImage:
    """The image opened by the caller's own rights, adopted on the broker's side."""

    def opener() -> tuple[int, str]:
        opened = open_image(image_arg, mode)  # every refusal is a HelperError line
        return opened.fd, opened.path

    got = open_as(caller, opener)
    try:
        return _adopt_image(got.fd, got.note, image_arg, mode)
    except BaseException as failed:
        os.close(got.fd)
        if isinstance(failed, OSError):
            why = failed.strerror or str(failed)
            if failed.errno == errno.EACCES:  # root is refused only by a FUSE mount's owner check
                why += " (it is on a FUSE mount only you may access)"
            raise HelperError(f"the broker cannot use image {image_arg}: {why}") from None
        raise


def _adopt_image(fd: int, opened_path: str, image_arg: str, mode: str) -> OpenedImage:
    """Check the fd a child opened against what was asked (OSError passes up)."""
    path = fd_path(fd)
    if path != opened_path:
        raise HelperError(f"image {image_arg} changed while it was being opened; try again")
    st = os.fstat(fd)
    is_block = stat.S_ISBLK(st.st_mode)
    if not (is_block or stat.S_ISREG(st.st_mode)):
        raise HelperError(f"refusing image {image_arg}: not a regular file or block device")
    access = os.O_RDONLY if mode == "ro" else os.O_RDWR
    if (os.get_blocking(fd), _access_mode(fd)) != (True, access):
        raise HelperError(f"image {image_arg} was not opened as asked; refusing it")
    size = os.lseek(fd, 0, os.SEEK_END) if is_block else st.st_size
    os.lseek(fd, 0, os.SEEK_SET)
    return OpenedImage(path, fd, mode, is_block, size)


def _access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def _hold_mountpoint_as(caller: Caller, mountpoint_arg: str) -> mountpoint_fd.HeldMountpoint:
    """The mountpoint opened once, as the caller, the way the root helper opens it
    (mountpoint_fd.hold: no symbolic link in any component); then judged on the
    fd: its path as the kernel reports it, and its owner, who must be the caller."""

    def opener() -> tuple[int, str]:
        held = mountpoint_fd.hold(mountpoint_arg)  # every refusal is a HelperError line
        return held.fd, held.path

    fd = open_as(caller, opener).fd
    try:
        held = mountpoint_fd.adopt(fd, mountpoint_arg)  # read anew here, not the child's word
        if held.owner != caller.uid:
            raise HelperError(
                f"mountpoint {held.path} belongs to uid {held.owner}: the broker mounts only on"
                " directories you own"
            )
        if fusemount.mounted_fstype(held.path) == fusemount.FSTYPE:
            raise HelperError(f"{held.path} is already an ext4box mount (see ext4box list)")
    except BaseException:
        os.close(fd)
        raise
    return held


def fd_path(fd: int) -> str:
    """The path the kernel has for an fd (what a decision must be made on)."""
    return os.readlink(f"/proc/self/fd/{fd}")


# -- serving -------------------------------------------------------------------------


def _serve(caller: Caller, settings: BrokerSettings, image: OpenedImage,
           spec: fusemount.MountSpec,
           decision: Decision) -> tuple[state.MountRecord, float]:  # fmt: skip
    podman = settings.podman
    name = f"ext4box-{secrets.token_hex(6)}"
    log_file = state.log_path(name)
    labels = {container.LABEL: "1", "org.ext4box.image": image.path,
              "org.ext4box.owner": str(caller.uid)}  # fmt: skip
    flags = tuple(decision.mount_flags)
    request = handoff.mount_request(image, decision)  # with the features the server refuses
    started = time.monotonic()
    # The container starts before the mount exists, so conmon's copy of our
    # mount namespace holds no copy of the FUSE mount (see mount_command.py).
    try:
        container_id, sock = container.start(podman, name, log_file, labels, settings.timeout)
    except BaseException:
        container.discard(podman, name, log_file)
        raise
    with sock:
        try:
            # Attached to the held fd (fsmount + move_mount): the very directory
            # the caller opened and the policy judged, whatever was renamed since.
            mounted = fusemount.mount_held(spec)
        except BaseException:
            container.discard(podman, name, log_file)
            raise
        # The caller may have renamed their directory since the decision; the
        # mount went onto that directory all the same. Record where it is now.
        where = spec.mountpoint
        try:
            where = fd_path(mounted.mount_fd if mounted.mount_fd is not None else spec.dir_fd)
            mount_id = mount_ids.id_of_new_mount(mounted.mount_fd, spec.dir_fd, where)
            handoff.hand_off_to_container(name, log_file, sock, mounted.fuse_fd, image.fd,
                                          request, settings.timeout)  # fmt: skip
        except BaseException:
            _undo_mount(mounted, where)
            container.discard(podman, name, log_file)
            raise
        finally:
            os.close(mounted.fuse_fd)
            mounted.release_mount_fd()
    ready = time.monotonic() - started
    record = state.MountRecord(
        name=name,
        image=image.path,
        mountpoint=where,
        mode=image.mode,
        container_id=container_id,
        since=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        pid=container.container_pid(podman, name),
        uid=caller.uid,
        flags=flags,
        rule=decision.rule,
        sha256=decision.sha256,
        mount_id=mount_id,
    )
    state.save(record)
    log.info("mounted", owner=caller.uid, container=name, image=image.path, mountpoint=where,
             decided_on=spec.mountpoint, mode=image.mode, mount_id=mount_id,
             ready_seconds=round(ready, 3))  # fmt: skip
    return record, ready


def _undo_mount(mounted: fusemount.Mounted, mountpoint: str) -> None:
    """Undo a mount whose hand-off failed: through the mount's own fd (new mount
    API); after the mount(2) fallback, by id through a link-free parent fd
    (never by a path the caller could redirect meanwhile)."""
    if mounted.mount_fd is not None:
        fusemount.unmount_mounted(mounted, mountpoint)
        return
    with contextlib.suppress(HelperError, OSError):
        mount_ids.unmount_exact(mountpoint, mount_ids.mount_id_at(mountpoint))
