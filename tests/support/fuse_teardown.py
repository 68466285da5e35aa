"""After a test unmounts a FUSE mount, who keeps its server waiting, and may we end it?

A FUSE server sees its unmount only when the last copy of the mount is gone.
Every mount namespace created while the mount existed (another developer's
`unshare -m` pytest run on this shared machine, a container) holds a copy, so
unmounting in our namespace can leave the server blocked on /dev/fuse for as
long as that unrelated process lives.

A connection is named by the st_dev of its mount root, recorded right after
the mount: once unmounted here it is gone from our mountinfo, and a path would
then name whatever lies under the mountpoint (every process "holds" that).

"Ours" is decided per holder process, and any one of these makes it ours:
- it is in our own mount namespace (the unmount did not happen);
- it descends from this pytest process (a child our test or server started);
- its environment carries this run's RUN_MARK, which every process we start
  inherits: a daemon that double-forked away from our tree is still ours.
A holder that is none of these belongs to someone else. When every holder is
someone else's, we abort the connection through fusectl (the server then
reads ENODEV and ends as after an unmount, the foreign copies answer
ENOTCONN); when any holder is ours, that is a leak and the test fails.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

RUN_MARK = "EXT4BOX_TEST_RUN"
# Inherited by everything this run starts; kept if an outer run already set it.
os.environ.setdefault(RUN_MARK, uuid.uuid4().hex)

_FUSECTL = "/sys/fs/fuse/connections"
_POLL_S = 0.05
_HOLDER_SCAN_EVERY_S = 0.5
_UNMOUNT_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class FuseConnection:
    """One FUSE connection, named by its mount's device number."""

    device: int

    @classmethod
    def of(cls, mountpoint: Path) -> FuseConnection:
        return cls(os.stat(mountpoint).st_dev)

    @property
    def major_minor(self) -> str:
        """As the third field of /proc/*/mountinfo writes it."""
        return f"{os.major(self.device)}:{os.minor(self.device)}"

    @property
    def fusectl_name(self) -> str:
        """Its directory in fusectl: the kernel's dev_t (major << 20 | minor) in decimal."""
        return str((os.major(self.device) << 20) | os.minor(self.device))


@dataclass(frozen=True, slots=True)
class Holder:
    """A process whose mount namespace still has a copy of the mount."""

    pid: int
    comm: str
    namespace: str
    ours: str | None  # why it is ours, None if it is someone else's

    def describe(self) -> str:
        whose = f"ours: {self.ours}" if self.ours else "foreign"
        return f"pid {self.pid} ({self.comm}, {self.namespace}, {whose})"


def _mountinfo_lines(pid: str) -> list[list[str]]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [line.split() for line in f]


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(text):
        code = text[i + 1 : i + 4]
        if text[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def mounted_here(mountpoint: Path, connection: FuseConnection) -> bool:
    """Whether our namespace still has this connection mounted at `mountpoint`.

    Works on a dead mount too (server killed: stat answers ENOTCONN, and
    os.path.ismount says False).
    """
    where = os.path.abspath(mountpoint)
    return any(
        len(fields) > 4 and fields[2] == connection.major_minor and _unescape(fields[4]) == where
        for fields in _mountinfo_lines("self")
    )


def unmount(mountpoint: Path, connection: FuseConnection) -> None:
    """Unmount this connection at `mountpoint` (alive or dead); lazily as a last resort."""
    argv = ["umount", str(mountpoint)] if os.geteuid() == 0 else ["fusermount3", "-u",
                                                                   str(mountpoint)]
    last_error = ""
    for _ in range(_UNMOUNT_ATTEMPTS):
        if not mounted_here(mountpoint, connection):
            return
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return
        last_error = result.stderr.strip()
        time.sleep(_POLL_S * 4)  # EBUSY: a reader in the test is still letting go
    subprocess.run([*argv[:-1], "-l" if argv[0] == "umount" else "-z", str(mountpoint)],
                   capture_output=True, check=False)
    raise AssertionError(f"cannot unmount {mountpoint} (lazy unmount done): {last_error}")


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: the fields resume after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1].isdigit():
            parents[int(entry.name)] = int(fields[1])
    return parents


def _descends_from(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    for _ in range(len(parents) + 1):  # bounded: a pid table can change under us
        if pid == ancestor:
            return True
        parent = parents.get(pid)
        if parent is None or parent == pid:
            return False
        pid = parent
    return False


def _carries_our_mark(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except OSError:
        return False
    return f"{RUN_MARK}={os.environ[RUN_MARK]}".encode() in environ


def holders(connection: FuseConnection) -> list[Holder]:
    """Every process whose mount namespace has a copy of `connection`, with whose it is."""
    our_namespace = os.readlink("/proc/self/ns/mnt")
    parents = _parents()
    me = os.getpid()
    found = []
    for pid in parents:
        try:
            if not any(len(f) > 2 and f[2] == connection.major_minor
                       for f in _mountinfo_lines(str(pid))):  # fmt: skip
                continue
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue  # exited meanwhile
        ours = None
        if namespace == our_namespace:
            ours = "our mount namespace"
        elif _descends_from(pid, me, parents):
            ours = "our descendant"
        elif _carries_our_mark(str(pid)):
            ours = f"carries {RUN_MARK}"
        found.append(Holder(pid, comm, namespace, ours))
    return found


def abort(connection: FuseConnection) -> bool:
    """Abort `connection` through fusectl, mounted in a throwaway namespace of its own.

    False if the connection had already ended (its fusectl directory is gone).
    The throwaway namespace makes the fusectl mount harmless wherever pytest
    runs (its own private namespace, or the host's when run by hand): it
    appears nowhere else and goes away with the child. Mounting only when
    nothing is mounted there keeps it idempotent.
    """
    script = (f'mountpoint -q {_FUSECTL} || mount -t fusectl fusectl {_FUSECTL} || exit 1; '
              f'[ -d {_FUSECTL}/"$1" ] || exit 3; echo 1 > {_FUSECTL}/"$1"/abort')  # fmt: skip
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
         connection.fusectl_name],
        capture_output=True, text=True, check=False)  # fmt: skip
    if result.returncode == 3:
        return False
    if result.returncode != 0:
        raise AssertionError(
            f"cannot abort FUSE connection {connection.fusectl_name} through fusectl: "
            f"{result.stderr.strip()}"
        )
    return True


def _pin(connection: FuseConnection, mountpoint: Path, found: list[Holder]) -> int | None:
    """An O_PATH fd on a holder's copy of the mount, or None.

    While it is open the connection cannot end, so its minor cannot pass to
    somebody else's new FUSE mount between our look at the holders and the
    abort. (Opening the root needs nothing from the server.)
    """
    for holder in found:
        try:
            fd = os.open(f"/proc/{holder.pid}/root{os.path.abspath(mountpoint)}", os.O_PATH)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_dev == connection.device:
                return fd
        except OSError:
            pass
        os.close(fd)
    return None


def wait_for_server_exit(
    process: subprocess.Popen[bytes] | subprocess.Popen[str],
    connection: FuseConnection | None,
    mountpoint: Path,
    timeout_s: float,
) -> str | None:
    """Wait (up to `timeout_s`) for the server to end after our unmount.

    If copies of the mount held by others keep it waiting, abort the
    connection and wait again (up to `timeout_s`); returns the one-line note
    of that abort, or None if none was needed. Raises AssertionError naming
    the holders when the server does not end (the process is left running:
    the caller kills it).
    """
    deadline = time.monotonic() + timeout_s
    next_scan = time.monotonic()
    found: list[Holder] = []
    while process.poll() is None:
        now = time.monotonic()
        if now >= deadline:
            held = (f"; copies of the mount are still held by "
                    f"{', '.join(h.describe() for h in found)}" if found
                    else "; no process holds a copy of the mount")  # fmt: skip
            raise AssertionError(f"server did not exit within {timeout_s:.0f}s of the unmount"
                                 f"{held}")
        if connection is not None and now >= next_scan:
            next_scan = now + _HOLDER_SCAN_EVERY_S
            found = holders(connection)
            if found and all(h.ours is None for h in found) and os.geteuid() == 0:
                return _abort_and_wait(process, connection, mountpoint, found, timeout_s)
        time.sleep(_POLL_S)
    return None


def _abort_and_wait(
    process: subprocess.Popen[bytes] | subprocess.Popen[str],
    connection: FuseConnection,
    mountpoint: Path,
    found: list[Holder],
    timeout_s: float,
) -> str:
    # Without a pin (no holder's copy reachable) the window for a reused minor
    # is the few milliseconds until the write: accepted.
    pin = _pin(connection, mountpoint, found)
    try:
        aborted = abort(connection)
    finally:
        if pin is not None:
            os.close(pin)
    pids = ", ".join(str(h.pid) for h in found)
    if aborted:
        note = (f"aborted FUSE connection {connection.fusectl_name} ({connection.major_minor}): "
                f"copies held only by foreign pids {pids}")
        print(note, flush=True)
    else:
        note = f"FUSE connection {connection.major_minor} ended by itself (holders were {pids})"
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{note}; yet the server did not exit within {timeout_s:.0f}s "
                             f"after that") from None
    return note
