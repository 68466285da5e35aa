"""How does `ext4box mount --foreground` hold its mount, and when does it let go?

With an external server the helper keeps the hand-off socket open; the
server's exit closes it. SIGTERM or SIGINT (a stopping service manager or
container) stops the wait too; either way the mount is then unmounted.
"""

from __future__ import annotations

import contextlib
import select
import signal

from ext4box.helper.errors import HelperError
from ext4box.helper.mount_server import MountResult
from ext4box.helper.umount_command import umount
from ext4box.log import get_logger

log = get_logger("ext4box.helper")


def serve_until_stopped(result: MountResult) -> str:
    """`ext4box mount --foreground`: hold the mount until SIGTERM/SIGINT or the server exits.

    Then unmount (an unmount propagates to every peer of the mount, e.g. the
    host side of a compose or Kubernetes shared volume) and forget the record.
    Returns why it stopped.
    """

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
