"""What the broker does for one caller's `mount`.

The caller is who SO_PEERCRED says; everything else is the broker's own
(`BrokerSettings`, fixed at start). A mount, in order:
  1. open the image and the mountpoint as the caller (peer.open_as: the
     kernel checks every permission as them) and decide on the fds' real
     paths, read back from /proc/self/fd;
  2. the mountpoint must be a directory the caller owns, not already ours;
  3. lock the image, ask the policy (the broker's directory), refuse features;
  4. start the server container (root podman: a non-root host uid), mount
     FUSE on the held directory fd owned by the caller, hand the fds over
     the container's socketpair, wait for READY;
  5. record the mount with its owner's uid and its mount id.
Unmounting and listing are in broker_unmount.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import os
import secrets
import stat
import time
from dataclasses import dataclass

from ext4box.helper import container, devices, fusemount, handoff, mount_ids, state
from ext4box.helper.errors import HelperError
from ext4box.helper.image import OpenedImage, check_features, lock_image, open_image
from ext4box.helper.peer import Caller, open_as
from ext4box.log import get_logger
from ext4box.policy import Policy, PolicyLoadError, Request, load_policy, sha256_of_fd
from ext4box.service.protocol import HandoffError, ImageKind, Mode, MountRequest, PeerRefused

log = get_logger("ext4box.broker")

_DELETED = " (deleted)"


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Everything the broker decides with; none of it comes from a client."""

    policy_dir: str
    podman: container.Podman
    timeout: float = 30.0
    max_mounts_per_user: int = 16


# -- mount --------------------------------------------------------------------------


def mount_for(caller: Caller, image_arg: str, mountpoint_arg: str, mode: str,
              settings: BrokerSettings) -> dict[str, object]:  # fmt: skip
    policy = _load_policy(settings.policy_dir)
    _check_mount_count(caller, settings)
    dir_fd = _open_mountpoint_as(caller, mountpoint_arg)
    try:
        mountpoint = _check_mountpoint(caller, dir_fd, mountpoint_arg)
        device = devices.device_name(image_arg)
        # As the caller first: the kernel decides what they may open. Only a
        # device named under /dev may then be opened by the broker, and it is
        # kept only if a grant_access rule allows exactly this request.
        refused: HelperError | None = None
        try:
            image = _open_image_as(caller, device.node if device else image_arg, mode)
        except HelperError as as_caller:
            if device is None:
                raise
            refused, image = as_caller, devices.open_device(device, mode)
        try:
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
                    mode=mode,
                    mountpoint=mountpoint,
                    is_block_device=image.is_block_device,
                    sha256=lambda: sha256_of_fd(image.fd),
                    image_links=device.links if device else (),
                )
            )
            if refused is not None and not (decision.allowed and decision.grant_access):
                raise refused  # what the caller could not open stays unopened for them
            if not decision.allowed:
                raise HelperError(decision.reason)
            check_features(image, decision.refused_features, decision.rule)
            container.check_image(settings.podman)
            flags = tuple(decision.mount_flags)
            record, ready = _serve(caller, settings, image, dir_fd, mountpoint, flags,
                                   decision.rule, decision.sha256)  # fmt: skip
        finally:
            image.close()
    finally:
        os.close(dir_fd)
    return {"image": record.image, "mountpoint": record.mountpoint, "mode": record.mode,
            "container": record.name, "ready_seconds": round(ready, 3)}  # fmt: skip


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


def _open_mountpoint_as(caller: Caller, mountpoint_arg: str) -> int:
    def opener() -> tuple[int, str]:
        try:
            fd = os.open(mountpoint_arg, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            if err.errno == errno.ENOTCONN:
                raise HelperError(
                    f"mountpoint {mountpoint_arg} is a FUSE mount whose server is gone;"
                    f" run: ext4box umount {mountpoint_arg}"
                ) from None
            raise HelperError(f"mountpoint {mountpoint_arg}: {err.strerror}") from None
        return fd, ""

    return open_as(caller, opener).fd


def _check_mountpoint(caller: Caller, dir_fd: int, mountpoint_arg: str) -> str:
    """The directory's real path; it must be the caller's and not an ext4box mount."""
    st = os.fstat(dir_fd)
    path = fd_path(dir_fd)
    if not stat.S_ISDIR(st.st_mode) or path.endswith(_DELETED) or not path.startswith("/"):
        raise HelperError(f"mountpoint {mountpoint_arg} is not a directory")
    if st.st_uid != caller.uid:
        raise HelperError(
            f"mountpoint {path} belongs to uid {st.st_uid}: the broker mounts only on"
            " directories you own"
        )
    if fusemount.mounted_fstype(path) == fusemount.FSTYPE:
        raise HelperError(f"{path} is already an ext4box mount (see ext4box list)")
    return path


def fd_path(fd: int) -> str:
    """The path the kernel has for an fd (what a decision must be made on)."""
    return os.readlink(f"/proc/self/fd/{fd}")


# -- serving -------------------------------------------------------------------------


def _serve(caller: Caller, settings: BrokerSettings, image: OpenedImage, dir_fd: int,
           mountpoint: str, flags: tuple[str, ...], rule: str | None,
           sha256: str | None) -> tuple[state.MountRecord, float]:  # fmt: skip
    podman = settings.podman
    name = f"ext4box-{secrets.token_hex(6)}"
    log_file = state.log_path(name)
    labels = {container.LABEL: "1", "org.ext4box.image": image.path,
              "org.ext4box.owner": str(caller.uid)}  # fmt: skip
    started = time.monotonic()
    # The container starts before the mount exists, so conmon's copy of our
    # mount namespace holds no copy of the FUSE mount (see commands.py).
    try:
        container_id, sock = container.start(podman, name, log_file, labels, settings.timeout)
    except BaseException:
        _discard(podman, name, log_file)
        raise
    with sock:
        try:
            fuse_fd = mount_fuse_on(dir_fd, image, flags, caller)
        except BaseException:
            _discard(podman, name, log_file)
            raise
        # The caller may have renamed their directory since the decision; the
        # mount went onto that directory all the same. Record where it is now.
        where = mountpoint
        try:
            where = fd_path(dir_fd)
            mount_id = _new_mount_id(dir_fd, where)
            request = MountRequest(
                Mode.RO if image.mode == "ro" else Mode.RW,
                ImageKind.BLOCK if image.is_block_device else ImageKind.REGULAR,
                image.size,
                flags,
            )
            try:
                handoff.hand_off(sock, fuse_fd, image.fd, request, timeout=settings.timeout)
                handoff.wait_ready(sock, timeout=settings.timeout)
            except (PeerRefused, HandoffError) as failed:
                tail = container.log_tail(log_file)
                raise HelperError(
                    f"the server container {name} failed: {failed.reason}"
                    + (f"; its log: {tail}" if tail else "")
                ) from None
        except BaseException:
            _undo_mount(where)
            _discard(podman, name, log_file)
            raise
        finally:
            os.close(fuse_fd)
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
        rule=rule,
        sha256=sha256,
        mount_id=mount_id,
    )
    state.save(record)
    log.info("mounted", owner=caller.uid, container=name, image=image.path, mountpoint=where,
             decided_on=mountpoint, mode=image.mode, ready_seconds=round(ready, 3))  # fmt: skip
    return record, ready


def mount_fuse_on(dir_fd: int, image: OpenedImage, flags: tuple[str, ...], caller: Caller) -> int:
    """mount(2) a FUSE filesystem owned by the caller onto the held directory fd.

    Through /proc/self/fd/N the kernel mounts on the very directory the
    caller opened and the policy judged, whatever was renamed since.
    """
    try:
        fuse_fd = os.open(fusemount.FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise HelperError(f"cannot open {fusemount.FUSE_DEVICE}: {err.strerror}") from None
    options = [f"fd={fuse_fd}", "rootmode=40000", f"user_id={caller.uid}",
               f"group_id={caller.gid}", "default_permissions"]  # fmt: skip
    if "allow_other" in flags:
        options.append("allow_other")
    mount_flags = fusemount.MS_NOSUID | fusemount.MS_NODEV
    if image.mode == "ro":
        mount_flags |= fusemount.MS_RDONLY
    if "noexec" in flags:
        mount_flags |= fusemount.MS_NOEXEC
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.mount(
        os.fsencode(image.path), f"/proc/self/fd/{dir_fd}".encode(), fusemount.FSTYPE.encode(),
        ctypes.c_ulong(mount_flags), ",".join(options).encode(),
    )  # fmt: skip
    if result != 0:
        err = ctypes.get_errno()
        os.close(fuse_fd)
        raise HelperError(f"cannot mount on {fd_path(dir_fd)}: {os.strerror(err)}")
    return fuse_fd


def _new_mount_id(dir_fd: int, mountpoint: str) -> int:
    """The id of the FUSE mount just stacked on dir_fd's directory."""
    mount_id = mount_ids.mount_id_at(mountpoint)
    info = mount_ids.mount_infos().get(mount_id)
    if (
        info is None
        or info.fstype != fusemount.FSTYPE
        or info.parent_id != mount_ids.mount_id_of(dir_fd)
    ):
        raise HelperError(f"cannot find the new mount on {mountpoint}")
    return mount_id


def _undo_mount(mountpoint: str) -> None:
    """Undo a mount whose hand-off failed."""
    with contextlib.suppress(HelperError, OSError):
        mount_ids.unmount_exact(mountpoint, mount_ids.mount_id_at(mountpoint))


def _discard(podman: container.Podman, name: str, log_file: object) -> None:
    with contextlib.suppress(HelperError):
        container.remove(podman, name)
    with contextlib.suppress(OSError):
        os.unlink(str(log_file))
