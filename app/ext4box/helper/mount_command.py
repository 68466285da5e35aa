"""`ext4box mount`: what does the helper check, in which order, before a server gets the fds?

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
Steps 4-6, and their variant for a server already running, are
helper/mount_server.py. `umount` is umount_command.py, `list` is listing.py,
`--foreground` is foreground.py. Every failure is one HelperError line;
cli.py prints it.
"""

from __future__ import annotations

import contextlib
import os
import threading

from ext4box import bdi
from ext4box.helper import doctor, external, fusemount, mount_server, mountpoint_fd, pinned
from ext4box.helper.errors import HelperError
from ext4box.helper.image import OpenedImage, check_features, lock_image, open_image
from ext4box.helper.mount_server import MountResult
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


def mount(
    image_arg: str,
    mountpoint_arg: str,
    *,
    mode: str = "ro",
    policy_dir: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    endpoint: external.Endpoint | None = None,
    server_options: tuple[str, ...] = (),
) -> MountResult:
    """Mount through a server container we start, or (endpoint) one already running.

    `server_options` (`-o`, names checked by the caller) are judged by the policy."""
    _ensure_stdio()
    who = identity_of_uid(os.getuid(), os.getgid())
    policy = _load_policy(policy_dir)
    held = _hold_mountpoint(mountpoint_arg, who.uid)
    try:
        result = _mount_held(image_arg, held, mode, policy, who, timeout, endpoint,
                             server_options)  # fmt: skip
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
    server_options: tuple[str, ...],
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
                server_options=server_options,
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
            return mount_server.serve_at_endpoint(endpoint, image, spec, decision, timeout)
        podman = doctor.preflight(mountpoint)  # everything a container start needs
        return mount_server.serve_in_container(podman, image, spec, decision, timeout)
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
    spec = fusemount.MountSpec(
        mountpoint=held.path,
        dir_fd=held.fd,
        source=image.path,
        mode=image.mode,
        noexec="noexec" in flags,
        allow_other="allow_other" in flags,
        uid=os.getuid(),
        gid=os.getgid(),
    )
    return fusemount.with_atime(spec, decision.server_options)


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
        server_options=list(decision.server_options),
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
