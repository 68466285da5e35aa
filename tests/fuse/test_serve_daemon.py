"""`ext4box serve` as other FUSE servers behave (issue 16): it returns once the
mount is live and serves in the background, `-f` keeps it in the foreground,
systemd's NOTIFY_SOCKET hears READY=1, `umount` stops it, and the mount flags
it accepts (noatime, nodiratime) are the mount's.

Every case runs the real command on a real image, on both FUSE backends.
Background servers are found by their command line in our own mount
namespace, and waited for with a pidfd (they are not our children).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import EXT4BOX, env, mkfs

from support.mount_options import accepted_options
from support.serve import fuse_backend, why_no_fuse

_no_fuse = why_no_fuse()
pytestmark = [
    pytest.mark.skipif(_no_fuse is not None, reason=f"FUSE unavailable: {_no_fuse}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts as root (mount(2), umount)"),
]

# Both transports; only the one asked for when `make test` reruns tests/fuse
# with EXT4BOX_TEST_BACKEND=pyfuse3.
BACKENDS = (fuse_backend(),) if os.environ.get("EXT4BOX_TEST_BACKEND") else ("native", "pyfuse3")
COMMAND_TIMEOUT_S = 60.0  # a bound for a hung command, not a speed expectation


@pytest.fixture
def image(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_bytes(b"hello through the daemon\n")
    (tree / "dir").mkdir()
    return mkfs(tree, tmp_path / "disk.img", "16M")


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    # Whatever a failed test left: no mount and no server behind it.
    servers = server_pids(path)
    while fuse_mount_at(path) is not None:
        subprocess.run(["umount", "-l", str(path)], check=False)
    for pid in servers:
        with _pidfd(pid) as fd:
            if fd is not None:
                os.kill(pid, signal.SIGKILL)


def serve(image: Path, mnt: Path, *args: str, backend: str,
          environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`ext4box serve` as a user types it; captured output, so a daemon that
    kept our stdout or stderr open would hang this call."""
    return subprocess.run(
        [*EXT4BOX, "serve", str(image), str(mnt), *args, "-o", f"backend={backend}"],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=environ or env(),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def fuse_mount_at(path: Path) -> list[str] | None:
    """The mountinfo fields of the topmost fuse.ext4box mount at `path`, else None."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if fields[4] == str(path):
            found = fields + right.split() if right.startswith("fuse.ext4box ") else None
    return found


def server_pids(mnt: Path) -> list[int]:
    """Processes in our mount namespace serving `mnt` (their command line names it)."""
    own_ns = os.readlink("/proc/self/ns/mnt")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            same_ns = os.readlink(entry / "ns" / "mnt") == own_ns
        except OSError:
            continue
        if same_ns and b"serve" in argv and os.fsencode(mnt) in argv:
            pids.append(int(entry.name))
    return pids


class _pidfd:
    """A pidfd of `pid`, or None if it has already gone."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None

    def __enter__(self) -> int | None:
        try:
            self.fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self.fd = None
        return self.fd

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def wait_gone(pid: int) -> None:
    """Wait for `pid` to exit (it is not our child: a pidfd says when)."""
    with _pidfd(pid) as fd:
        if fd is None:
            return
        readable, _, _ = select.select([fd], [], [], COMMAND_TIMEOUT_S)
        assert readable, f"server {pid} still running {COMMAND_TIMEOUT_S:.0f} s after the unmount"


def e2fsck_clean(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- background: returns once live ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_returns_once_live_and_umount_stops_it(image: Path, mnt: Path, backend: str):
    result = serve(image, mnt, backend=backend)
    assert result.returncode == 0, result.stderr
    # The moment the command has returned: a FUSE mount that answers.
    assert fuse_mount_at(mnt) is not None, "serve returned before the mount existed"
    assert (mnt / "hello.txt").read_bytes() == b"hello through the daemon\n"
    [pid] = server_pids(mnt)
    assert os.getsid(pid) == pid, "the background server should lead its own session"
    subprocess.run(["umount", str(mnt)], check=True)
    wait_gone(pid)
    assert fuse_mount_at(mnt) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_background_rw_writes_and_leaves_a_clean_image(image: Path, mnt: Path, backend: str):
    result = serve(image, mnt, "-o", "rw", backend=backend)
    assert result.returncode == 0, result.stderr
    [pid] = server_pids(mnt)
    (mnt / "dir" / "new.txt").write_bytes(b"written by a daemon\n" * 1000)
    os.rename(mnt / "hello.txt", mnt / "dir" / "moved.txt")
    subprocess.run(["umount", str(mnt)], check=True)
    wait_gone(pid)
    e2fsck_clean(image)
    dumped = subprocess.run(["debugfs", "-R", "cat /dir/new.txt", str(image)],
                            capture_output=True, check=True)  # fmt: skip
    assert dumped.stdout == b"written by a daemon\n" * 1000


# -- errors: the exit status says the mount did not come up ---------------------


def _one_error_line(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ext4box: error: "), result.stderr
    assert text in lines[0], lines[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_image_fails_with_one_line(tmp_path: Path, mnt: Path, backend: str):
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(os.urandom(1 << 20))
    _one_error_line(serve(garbage, mnt, backend=backend), "not an ext2/3/4 filesystem")
    assert fuse_mount_at(mnt) is None and server_pids(mnt) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_mountpoint_fails_with_one_line(image: Path, mnt: Path, backend: str):
    # A mount whose server was killed: every access to it says ENOTCONN.
    first = subprocess.Popen([*EXT4BOX, "serve", "-f", str(image), str(mnt)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env())  # fmt: skip
    try:
        ready = serve_probe(mnt, first)
        assert ready, "the first server did not mount"
    finally:
        first.kill()
        first.wait()
    _one_error_line(serve(image, mnt, backend=backend), "not connected")
    assert server_pids(mnt) == []


def serve_probe(mnt: Path, process: subprocess.Popen[bytes]) -> bool:
    """Wait (on the mount table, as the foreground server has no other signal)
    until `process` has mounted; False if it exited first."""
    with open("/proc/self/mountinfo") as table:
        poller = select.poll()
        poller.register(table, select.POLLPRI | select.POLLERR)
        while fuse_mount_at(mnt) is None:
            if process.poll() is not None:
                return False
            poller.poll(1000)  # the table changed, or a second passed: look again
            table.seek(0)
            table.read()
    return True


# -- foreground and systemd ----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreground_stays_until_unmount(image: Path, mnt: Path, backend: str):
    server = subprocess.Popen(
        [*EXT4BOX, "serve", "-f", str(image), str(mnt), "-o", f"backend={backend}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env(),
    )  # fmt: skip
    try:
        assert serve_probe(mnt, server), server.communicate()[1]
        assert (mnt / "hello.txt").read_bytes() == b"hello through the daemon\n"
        # The process we started is the server: still here, the only one.
        assert server.poll() is None
        assert server_pids(mnt) == [server.pid]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        _, stderr = server.communicate(timeout=COMMAND_TIMEOUT_S)
    assert server.returncode == 0, stderr
    assert '"event": "unmounted"' in stderr  # its logs stayed on our stderr


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_notify_socket_hears_ready_once_live(image: Path, mnt: Path, tmp_path: Path,
                                             backend: str, abstract: bool):  # fmt: skip
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"ext4box-test-notify-{os.getpid()}-{backend}"
        listener.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        listener.bind(address)
    listener.settimeout(COMMAND_TIMEOUT_S)
    # No -f: under systemd (NOTIFY_SOCKET) the server stays the process systemd started.
    server = subprocess.Popen(
        [*EXT4BOX, "serve", str(image), str(mnt), "-o", f"backend={backend}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env={**env(), "NOTIFY_SOCKET": address},
    )  # fmt: skip
    try:
        with listener:
            message = listener.recv(4096)
        assert message == b"READY=1"
        # READY=1 comes after INIT: the mount is there and answers.
        assert fuse_mount_at(mnt) is not None
        assert (mnt / "hello.txt").read_bytes() == b"hello through the daemon\n"
        assert server.poll() is None and server_pids(mnt) == [server.pid]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        _, stderr = server.communicate(timeout=COMMAND_TIMEOUT_S)
    assert server.returncode == 0, stderr


# -- mount flags ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "options", "expected"),
    [
        ("native", "noatime", {"noatime"}),
        ("native", "nodiratime", {"nodiratime"}),
        ("native", "noatime,nodiratime", {"noatime", "nodiratime"}),
        # libfuse knows no nodiratime; noatime covers directories as well.
        ("pyfuse3", "noatime", {"noatime"}),
    ],
)
def test_atime_flags_are_the_mounts(image: Path, mnt: Path, backend: str, options: str,
                                    expected: set[str]):  # fmt: skip
    result = serve(image, mnt, "-o", options, backend=backend)
    assert result.returncode == 0, result.stderr
    [pid] = server_pids(mnt)
    fields = fuse_mount_at(mnt)
    assert fields is not None
    per_mount = set(fields[5].split(","))  # mountinfo field 6: the mount's own flags
    assert expected <= per_mount, fields[5]
    subprocess.run(["umount", str(mnt)], check=True)
    wait_gone(pid)


@pytest.mark.parametrize(("backend", "option"),
                         [(backend, option) for backend in BACKENDS
                          for option in accepted_options(backend)])  # fmt: skip
def test_every_accepted_option_mounts(image: Path, mnt: Path, backend: str, option: str):
    """An option ext4box accepts must not be refused further down (libfuse,
    fusermount3, mount(2)): issue 18 item 4 found `-o nodiratime` accepted
    and then refused by libfuse."""
    result = serve(image, mnt, "-o", option, backend=backend)
    assert result.returncode == 0, result.stderr
    [pid] = server_pids(mnt)
    assert fuse_mount_at(mnt) is not None
    assert (mnt / "hello.txt").read_bytes() == b"hello through the daemon\n"
    subprocess.run(["umount", str(mnt)], check=True)
    wait_gone(pid)
    e2fsck_clean(image)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fstab_only_options_are_ignored(image: Path, mnt: Path, backend: str):
    options = "ro,defaults,noauto,auto,nofail,_netdev,user,users,x-systemd.automount"
    result = serve(image, mnt, "-o", options, backend=backend)
    assert result.returncode == 0, result.stderr
    [pid] = server_pids(mnt)
    assert (mnt / "hello.txt").exists()
    subprocess.run(["umount", str(mnt)], check=True)
    wait_gone(pid)
