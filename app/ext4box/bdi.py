"""The kernel's backing-device (bdi) settings of a FUSE mount: its read-ahead.

The kernel caps a FUSE mount's read-ahead at 128 KiB (the FUSE_INIT reply can
only lower it), so a streaming read reaches the server as 128 KiB requests and
each round trip costs more than the transfer. Raising the bdi's read_ahead_kb
after the mount lets the kernel ask for 1 MiB requests and keep several in
flight: measured here, cold sequential reads of a 512 MiB file went from about
440 MB/s at 128 KiB to about 1,450 MB/s at 4 MiB (the kernel's ext4 on a loop
device: 700-1,700 MB/s on the same image). Only root may write the setting;
for anyone else the mount keeps the kernel's default.

The mount is found through /proc/self/mountinfo, never by stat(2) or
realpath() of the mountpoint: called from the server itself, any syscall that
looks the mountpoint up waits for a request the server's own loop must answer
(a deadlock). Callers resolve the path before mounting.
"""

from __future__ import annotations

from pathlib import Path

from ext4box.log import get_logger

log = get_logger("ext4box.bdi")

READ_AHEAD_KB = 4096
_MOUNTINFO = Path("/proc/self/mountinfo")
_BDI = Path("/sys/class/bdi")


def mount_device(resolved_mountpoint: str, fstype: str = "fuse.ext4box") -> str | None:
    """"major:minor" of the newest mount of `fstype` at `resolved_mountpoint` (an
    absolute path without symlinks, resolved before the mount), or None."""
    target = resolved_mountpoint
    found = None
    for line in _MOUNTINFO.read_text().splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        # mountinfo escapes spaces and the like as octal: \040
        point = fields[4].encode().decode("unicode_escape")
        if point == target and sep + 1 < len(fields) and fields[sep + 1] == fstype:
            found = fields[2]
    return found


def set_read_ahead(mountpoint: str, kib: int = READ_AHEAD_KB) -> bool:
    """Raise the read-ahead of the FUSE mount at `mountpoint` (resolved before the
    mount, see mount_device); False (logged) when the mount is not found or the
    setting may not be written."""
    device = mount_device(mountpoint)
    if device is None:
        log.warning("read_ahead_not_set", mountpoint=mountpoint, why="mount not found")
        return False
    try:
        (_BDI / device / "read_ahead_kb").write_text(f"{kib}\n")
    except OSError as err:
        log.info("read_ahead_not_set", mountpoint=mountpoint, why=err.strerror)
        return False
    log.debug("read_ahead_set", mountpoint=mountpoint, kib=kib)
    return True
