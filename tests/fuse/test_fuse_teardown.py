"""Does the shared `served()` teardown survive other people's copies of our mount,
still fail on copies of our own, and unmount a mount whose server was killed?

A "foreign" holder here is what another developer's `unshare -m` run is on
this machine: a process that is not our descendant (setsid --fork: its parent
exits at once, so it is reparented away from our tree), is in a mount namespace
of its own, and does not carry this run's RUN_MARK in its environment. An
"own" holder is the same process either as our child or carrying RUN_MARK
(a daemon that double-forked away from us is still our leak).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fuse_helpers import mkfs

from support import fuse_teardown, serve
from support.fuse_teardown import RUN_MARK, FuseConnection
from support.serve import ext4box_argv, served

_WAIT_S = 30.0  # bound on waiting for a holder to be set up or to go away
_HOLD = "echo $$ > \"$0\"; exec unshare --mount --propagation private sleep 600"


@pytest.fixture
def image(tmp_path: Path, fuse_env: None) -> Path:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "dir" / "file").write_text("hello\n")
    return mkfs(tree, tmp_path / "image.ext4", "8M")


def _wait_until_held(pid: int, connection: FuseConnection) -> None:
    """Until `pid` runs in a namespace of its own that has a copy of the mount."""
    ours = os.readlink("/proc/self/ns/mnt")
    deadline = time.monotonic() + _WAIT_S
    while time.monotonic() < deadline:
        with_copy = [h for h in fuse_teardown.holders(connection) if h.pid == pid]
        if with_copy and with_copy[0].namespace != ours:
            return
        time.sleep(0.05)
    raise AssertionError(f"holder {pid} did not get a copy of the mount within {_WAIT_S:.0f}s")


def _read_pid(pidfile: Path) -> int:
    deadline = time.monotonic() + _WAIT_S
    while time.monotonic() < deadline:
        text = pidfile.read_text() if pidfile.exists() else ""
        if text.endswith("\n"):
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"the holder did not write {pidfile} within {_WAIT_S:.0f}s")


def _start_detached_holder(pidfile: Path, connection: FuseConnection, *, marked: bool) -> int:
    """A holder outside our process tree; with our RUN_MARK or, like a stranger, without."""
    env = dict(os.environ)
    if not marked:
        del env[RUN_MARK]
    subprocess.run(["setsid", "--fork", "sh", "-c", _HOLD, str(pidfile)], env=env, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    pid = _read_pid(pidfile)
    _wait_until_held(pid, connection)
    return pid


def _kill_holder(pid: int) -> None:
    """SIGKILL a holder that is not our child and wait until it is gone (or a zombie)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + _WAIT_S
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.05)
    raise AssertionError(f"holder {pid} still runs {_WAIT_S:.0f}s after SIGKILL")


def _wait_until_stat_fails(dead_mount: Path) -> None:
    deadline = time.monotonic() + _WAIT_S
    while time.monotonic() < deadline:
        try:
            os.stat(dead_mount)
        except OSError as err:
            assert err.errno == errno.ENOTCONN, err
            return
        time.sleep(0.05)
    raise AssertionError(f"stat {dead_mount} still answers {_WAIT_S:.0f}s after the kill")


@pytest.mark.parametrize("options", ["ro", "rw"])
def test_copies_held_only_by_foreign_namespaces_get_the_connection_aborted(
    image: Path, tmp_path: Path, options: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mnt = tmp_path / "mnt"
    holder = None
    try:
        # served() insists that the server exits 0: an abort must end it as cleanly
        # as an unmount (rw: the journal is committed, e2fsck below is clean).
        with served(image, mnt, ext4box_argv(image, mnt, options)) as handle:
            assert handle.connection is not None
            connection = handle.connection
            if options == "rw":
                (mnt / "dir" / "new").write_text("written before the abort\n")
            holder = _start_detached_holder(tmp_path / "holder.pid", connection, marked=False)
        note = capsys.readouterr().out
        assert f"aborted FUSE connection {connection.fusectl_name} " in note
        assert f"foreign pids {holder}\n" in note
        # The stranger's copy is now dead, not served.
        with pytest.raises(OSError) as dead:
            os.stat(f"/proc/{holder}/root{mnt}/dir")
        assert dead.value.errno == errno.ENOTCONN
    finally:
        if holder is not None:
            _kill_holder(holder)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    if options == "rw":
        cat = subprocess.run(["debugfs", "-R", "cat /dir/new", str(image)], capture_output=True,
                             text=True, check=True)  # fmt: skip
        assert cat.stdout == "written before the abort\n"


@pytest.mark.parametrize("how", ["child", "detached with our RUN_MARK"])
def test_a_copy_held_by_our_own_process_still_fails_the_teardown(
    image: Path, tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short bound: the outcome (failure naming the holder) does not depend on it.
    monkeypatch.setattr(serve, "EXIT_TIMEOUT_S", 3.0)
    mnt = tmp_path / "mnt"
    child: subprocess.Popen[bytes] | None = None
    holder = None
    try:
        with pytest.raises(AssertionError) as failed, served(image, mnt) as handle:
            assert handle.connection is not None
            connection = handle.connection
            if how == "child":
                child = subprocess.Popen(
                    ["unshare", "--mount", "--propagation", "private", "sleep", "600"])
                holder = child.pid
                _wait_until_held(holder, connection)
            else:
                holder = _start_detached_holder(tmp_path / "holder.pid", connection,
                                                marked=True)  # fmt: skip
        message = str(failed.value)
        assert "server did not exit within 3s of the unmount" in message
        assert f"pid {holder} " in message
        assert f"pid {os.getpid()} " not in message  # our pytest holds nothing after the unmount
        assert handle.process.returncode is not None  # the fixture killed it
    finally:
        if child is not None:
            child.kill()
            child.wait()
        elif holder is not None:
            _kill_holder(holder)


def test_a_mount_whose_server_was_killed_is_unmounted(image: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    connection = None
    try:
        # rw, as test_rw_quota's crash test: its attributes lapse within a second
        # (ro ones are cached for minutes, and stat would keep answering).
        with served(image, mnt, ext4box_argv(image, mnt, "rw"), expect_exit_zero=False) as handle:
            connection = handle.connection
            handle.process.kill()
            handle.process.wait()
            # Once the kernel's cached attributes of the root lapse, even stat
            # answers ENOTCONN: the state in which os.path.ismount() says False.
            _wait_until_stat_fails(mnt)
        assert connection is not None
        assert not fuse_teardown.mounted_here(mnt, connection)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
