"""Quota on read-write mounts: `ext4box serve -o rw` counts what the kernel's ext4 counts.

Usage: copies of one `-O quota` image (with and without project quota, 4 KiB
and 1 KiB blocks) get the same operations, run as several users: files
created, extended, truncated, deleted and renamed over, chown/chgrp moving
usage between ids, xattr blocks, directories, symlinks. Every operation must
have the same outcome on both. This machine's kernel (like many) is built
without CONFIG_QFMT_V2 and refuses to mount quota or project images
read-write, so its copy has the quota feature removed (tune2fs -O ^quota),
and `tune2fs -O quota` counts its usage afterwards from what the kernel
wrote. The quota files of both must then show the same usage for every user
and group (`debugfs lq`: what repquota shows), and both images must pass
`e2fsck -fn`, which recomputes the usage itself (project usage included).

Limits: hard block and inode limits, a group limit, a project limit and a
soft limit whose grace period runs out, set in the quota files (and read
back by debugfs), must answer EDQUOT exactly where the kernel's rule says:
an allocation that would take usage past a hard limit, or past a soft limit
once the grace period is over.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from rw_support import assert_fsck_clean, rw_mount, skip_unless_possible

from ext4box.ext4.format.quota_file import GRPQUOTA, PRJQUOTA, USRQUOTA
from support.facade import Ours
from support.kernel import kernel_mount
from support.serve import ServedMount, ext4box_argv, served

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

CHUNK = 4096
CAROL_BLOCK_LIMIT = 200  # KiB (setquota's unit)
CAROL_INODE_LIMIT = 6
ERIN_GROUP_BLOCK_LIMIT = 64
DAVE_SOFT_LIMIT = 100
FRANK_INODE_SOFT_LIMIT = 2
PROJECT_BLOCK_LIMIT = 300

PROJECT = 42
# (uid, gid) of the users of the workload.
ALICE, BOB, CAROL, DAVE, ERIN = (1000, 2000), (1001, 2001), (1003, 2003), (1004, 2004), (1006, 2006)
FRANK = (1007, 2007)
GRACE_S = 4  # block and inode grace periods for the soft-limit cases (setquota -t)

VARIANTS = {
    "4k-quota": ["-b", "4096", "-O", "quota"],
    "4k-quota-project": ["-b", "4096", "-O", "quota,project"],
    "1k-quota-project": ["-b", "1024", "-O", "quota,project"],
}
_FL_EXTENTS_PROJINHERIT = 0x80000 | 0x20000000

# Runs in a child that dropped to a user: applies JSON ops, prints their outcomes.
_CHILD = r"""
import errno, json, os, sys
out = []
for op, *args in json.loads(sys.argv[1]):
    done = 0
    try:
        if op == "write":
            path, offset, size, chunk = args
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                while done < size:
                    n = min(chunk, size - done)
                    done += os.pwrite(fd, bytes([(offset + done) % 251 or 1]) * n,
                                      offset + done)
                os.fsync(fd)
            finally:
                os.close(fd)
        elif op == "truncate":
            os.truncate(*args)
        elif op == "create":
            os.close(os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        elif op == "mkdir":
            os.mkdir(args[0])
        elif op == "unlink":
            os.unlink(args[0])
        elif op == "rmdir":
            os.rmdir(args[0])
        elif op == "symlink":
            os.symlink(*args)
        elif op == "link":
            os.link(*args)
        elif op == "rename":
            os.rename(*args)
        elif op == "setxattr":
            os.setxattr(args[0], args[1], b"v" * args[2])
        elif op == "chown":
            os.chown(*args)
        else:
            raise ValueError(op)
        out.append(["ok", done])
    except OSError as err:
        out.append([errno.errorcode.get(err.errno, str(err.errno)), done])
print(json.dumps(out))
"""


def _as_user(uid: int, gid: int, ops: list[list[object]], groups: tuple[int, ...] = ()
             ) -> list[list[object]]:
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
    argv += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    result = subprocess.run([*argv, sys.executable, "-I", "-c", _CHILD, json.dumps(ops)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)



def _accounting(root: Path) -> list[object]:
    """Operations within every limit, each user's batch in order; returns the outcomes."""
    u, p = root / "u", root / "proj"
    a = str(u / "a")
    steps: list[object] = []

    def run(user: tuple[int, int], ops: list[list[object]], groups: tuple[int, ...] = ()) -> None:
        steps.append([user, _as_user(*user, ops, groups)])

    run(ALICE, [["write", a, 0, 100_000, 65536], ["write", a, 100_000, 200_000, 65536],
                ["truncate", a, 10_000], ["mkdir", str(u / "adir")],
                *[["write", str(u / "adir" / f"f{i}"), 0, 1 + 3000 * i, 8192]
                  for i in range(30)],
                ["setxattr", a, "user.big", 600], ["symlink", "t" * 200, str(u / "alink")],
                ["symlink", "short", str(u / "slink")], ["link", a, str(u / "a2")],
                ["write", str(p / "p1"), 0, 50_000, CHUNK], ["mkdir", str(p / "sub")],
                ["write", str(p / "sub" / "p3"), 0, 5000, CHUNK]])
    run(BOB, [["write", str(u / "b"), 0, 40_000, CHUNK], ["write", str(u / "b2"), 0, 8192, CHUNK],
              ["rename", str(u / "b2"), str(u / "b")], ["unlink", str(u / "a2")],
              ["write", str(u / "b3"), 0, 70_000, 70_000],
              ["setxattr", str(u / "b3"), "user.big", 600],
              ["write", str(p / "p2"), 0, 30_000, CHUNK]])
    run((0, 0), [["chown", str(u / "b"), 1002, 2002],
                 ["chown", str(u / "adir" / "f3"), BOB[0], -1]])
    run(ALICE, [["chown", a, -1, 2005], ["unlink", str(u / "adir" / "f7")],
                ["rename", str(u / "adir" / "f8"), str(u / "adir" / "f9")],
                ["unlink", str(p / "p1")]], groups=(2000, 2005))
    return steps


def _usage(image: Path, qtypes: tuple[str, ...]) -> dict[str, list[str]]:
    """Every id's usage and limits per quota type, as `debugfs lq` reads the quota files
    (ids with nothing counted and no limits left out: the kernel drops such entries)."""
    out: dict[str, list[str]] = {}
    for qtype in qtypes:
        text = subprocess.run(["debugfs", "-R", f"lq {qtype}", str(image)], check=True,
                              capture_output=True, text=True).stdout
        rows = [line.split() for line in text.splitlines()[1:] if line.strip()]
        out[qtype] = [" ".join(r) for r in rows if r[0].isdigit() and any(v != "0" for v in r[1:])]
    return out


def _row(image: Path, qtype: str, qid: int) -> list[int]:
    """(space, block soft, block hard, inodes, inode soft, inode hard) of one id."""
    for row in _usage(image, (qtype,))[qtype]:
        fields = row.split()
        if int(fields[0]) == qid:
            return [int(v) for v in fields[1:7]]
    return [0] * 6


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A directory other users can traverse (the mounts live there)."""
    path = Path(tempfile.mkdtemp(prefix="ext4box-quota-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _debugfs_w(image: Path, *requests: str) -> None:
    for request in requests:
        subprocess.run(["debugfs", "-w", "-R", request, str(image)], check=True,
                       capture_output=True)


def _base_image(path: Path, mkfs_args: list[str], project: bool) -> Path:
    """A fresh quota image with /u (sticky, everyone's) and /proj (sticky; with the
    project feature, project 42 inherited), its quota files counting them."""
    with path.open("wb") as image:
        image.truncate(64 << 20)
    extended = "root_owner=0:0" + (",quotatype=usrquota:grpquota:prjquota" if project else "")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", extended, *mkfs_args, str(path)], check=True,
                   capture_output=True)
    _debugfs_w(path, "mkdir u", "sif u mode 041777", "mkdir proj", "sif proj mode 041777")
    if project:
        _debugfs_w(path, f"sif proj projid {PROJECT}",
                   f"sif proj flags {_FL_EXTENTS_PROJINHERIT:#x}")
    # debugfs does not count what it makes: e2fsck brings the quota files up to date.
    subprocess.run(["e2fsck", "-fy", str(path)], capture_output=True, check=False)
    assert_fsck_clean(path)
    return path


def _without_quota(image: Path) -> None:
    subprocess.run(["tune2fs", "-O", "^quota", str(image)], check=True, capture_output=True)
    features = subprocess.run(["dumpe2fs", "-h", str(image)], check=True, capture_output=True,
                              text=True).stdout
    assert " quota" not in features and " project" not in features


def _count_quota(image: Path) -> None:
    """tune2fs -O quota: e2fsprogs creates the quota files, counting every inode."""
    subprocess.run(["tune2fs", "-O", "quota", "-Q", "usrquota,grpquota", str(image)],
                   check=True, capture_output=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_quota_usage_matches_kernel(variant: str, scratch: Path) -> None:
    skip_unless_possible()
    if shutil.which("setpriv") is None or shutil.which("tune2fs") is None:
        pytest.skip("setpriv or tune2fs missing")
    work = scratch / variant
    work.mkdir()
    project = "project" in variant
    base = _base_image(work / "base.img", VARIANTS[variant], project)
    theirs, ours = work / "kernel.img", work / "ours.img"
    shutil.copyfile(base, theirs)
    shutil.copyfile(base, ours)
    _without_quota(theirs)

    with kernel_mount(theirs, work / "k", readonly=False) as root:
        expected = _accounting(root)
    with rw_mount(ours, work / "o") as handle:
        got = _accounting(handle.mountpoint)

    assert got == expected
    assert "EPERM" in json.dumps(expected)  # BOB may not unlink ALICE's a2 in sticky /u
    assert_fsck_clean(theirs)
    assert_fsck_clean(ours)
    _count_quota(theirs)
    assert_fsck_clean(theirs)
    assert _usage(ours, ("user", "group")) == _usage(theirs, ("user", "group"))
    if project:
        space = _row(ours, "project", PROJECT)[0]
        assert space > 0  # p2 and sub/p3 are counted to project 42 (e2fsck checked how much)


def _set_limits(image: Path, project: bool) -> None:
    """Write the limits into the quota files (what setquota does on a kernel mount that
    has quota support) and check that e2fsprogs reads them back."""
    facade = Ours(image)
    try:
        quota = facade.fs.quota
        assert quota is not None
        with facade.fs.lock:
            quota.set_limits(USRQUOTA, CAROL[0], block_hard=CAROL_BLOCK_LIMIT,
                             inode_hard=CAROL_INODE_LIMIT)
            quota.set_limits(GRPQUOTA, ERIN[1], block_hard=ERIN_GROUP_BLOCK_LIMIT)
            quota.set_limits(USRQUOTA, DAVE[0], block_soft=DAVE_SOFT_LIMIT)
            quota.set_limits(USRQUOTA, FRANK[0], inode_soft=FRANK_INODE_SOFT_LIMIT)
            quota.set_grace(USRQUOTA, GRACE_S, GRACE_S)
            if project:
                quota.set_limits(PRJQUOTA, PROJECT, block_hard=PROJECT_BLOCK_LIMIT)
    finally:
        facade.close()
    assert_fsck_clean(image)
    assert _row(image, "user", CAROL[0])[1:6] == [0, CAROL_BLOCK_LIMIT, 0, 0, CAROL_INODE_LIMIT]
    assert _row(image, "group", ERIN[1])[1:3] == [0, ERIN_GROUP_BLOCK_LIMIT]
    assert _row(image, "user", DAVE[0])[1:3] == [DAVE_SOFT_LIMIT, 0]
    assert _row(image, "user", FRANK[0])[4:6] == [FRANK_INODE_SOFT_LIMIT, 0]
    if project:
        assert _row(image, "project", PROJECT)[1:3] == [0, PROJECT_BLOCK_LIMIT]


def _allowed(limit_kib: int, used: int) -> int:
    """Bytes a user may still write in CHUNK-sized writes of new blocks (block-aligned
    chunks): every chunk whose blocks would take usage past the limit is refused."""
    return max(limit_kib * 1024 - used, 0) // CHUNK * CHUNK


def _used(paths: list[Path]) -> int:
    return sum(os.lstat(path).st_blocks * 512 for path in paths)


@pytest.mark.parametrize("variant", ["4k-quota-project", "1k-quota-project"])
def test_limits_answer_edquot(variant: str, scratch: Path) -> None:
    skip_unless_possible()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing")
    work = scratch / f"limits-{variant}"
    work.mkdir()
    project = "project" in variant
    image = _base_image(work / "base.img", VARIANTS[variant], project)
    _set_limits(image, project)

    mnt = work / "o"
    with served(image, mnt, ext4box_argv(image, mnt, "rw,usrquota,grpquota,prjquota")) as handle:
        u, p = handle.mountpoint / "u", handle.mountpoint / "proj"
        # Hard limits: CAROL's blocks and inodes.
        (first,) = _as_user(*CAROL, [["write", str(u / "c1"), 0, 300_000, CHUNK]])
        assert first == ["EDQUOT", _allowed(CAROL_BLOCK_LIMIT, 0)]
        creates = _as_user(*CAROL, [*[["create", str(u / f"c{i}")] for i in range(2, 8)],
                                    ["mkdir", str(u / "cdir")],
                                    ["symlink", "t" * 200, str(u / "clink")]])
        assert [r[0] for r in creates] == ["ok"] * 5 + ["EDQUOT"] * 3
        assert _as_user(*CAROL, [["unlink", str(u / "c1")],
                                 ["write", str(u / "c2"), 0, 100_000, CHUNK]]) == [
            ["ok", 0], ["ok", 100_000]]
        room = _allowed(CAROL_BLOCK_LIMIT, _used([u / "c2"]))
        assert _as_user(*CAROL, [["write", str(u / "c3"), 0, 200_000, CHUNK]]) == [
            ["EDQUOT", room]]
        # An xattr block is charged too: refused unless a whole block is left.
        left = CAROL_BLOCK_LIMIT * 1024 - _used([u / f"c{i}" for i in range(2, 7)])
        block_size = os.statvfs(u).f_bsize
        assert _as_user(*CAROL, [["setxattr", str(u / "c4"), "user.big", 600]]) == [
            ["EDQUOT" if left < block_size else "ok", 0]]
        # A group's hard limit, reached by data and then by a directory that must grow.
        edir = u / "edir"
        assert _as_user(*ERIN, [["mkdir", str(edir)]]) == [["ok", 0]]
        dir_bytes = _used([edir])
        assert _as_user(*ERIN, [["write", str(u / "e1"), 0, 100_000, CHUNK]]) == [
            ["EDQUOT", _allowed(ERIN_GROUP_BLOCK_LIMIT, dir_bytes)]]
        left = ERIN_GROUP_BLOCK_LIMIT * 1024 - _used([edir, u / "e1"])
        block_size = os.statvfs(u).f_bsize
        names = [str(edir / f"entry-with-a-long-name-{i:04}") for i in range(300)]
        created = [r[0] for r in _as_user(*ERIN, [["create", name] for name in names])]
        # Creates succeed while the directory has room or may grow; 300 long names need
        # more blocks than the group has left. (Once indexed, a name whose leaf has room
        # still goes in after another's leaf could not split.)
        assert set(created) == {"ok", "EDQUOT"} and created[0] == "ok"
        if left < block_size:  # not a block left: the first block fills, then nothing
            full = created.index("EDQUOT")
            assert created == ["ok"] * full + ["EDQUOT"] * (len(created) - full)
            assert os.stat(edir).st_size == block_size
        # A soft limit: passing it starts the grace period, which then runs out.
        assert _as_user(*DAVE, [["write", str(u / "d1"), 0, 150_000, 150_000]]) == [
            ["ok", 150_000]]
        frank = [str(u / f"g{i}") for i in range(5)]
        assert _as_user(*FRANK, [["create", frank[i]] for i in range(3)]) == [["ok", 0]] * 3
        time.sleep(GRACE_S + 1)
        # Past the inode soft limit too long: no new inode until usage is back under it
        # (which ends the grace period; passing the limit again starts a new one).
        assert [r[0] for r in _as_user(*FRANK, [
            ["create", frank[3]], ["unlink", frank[2]], ["create", frank[3]],
            ["create", frank[4]]])] == ["EDQUOT", "ok", "ok", "ok"]
        assert _as_user(*DAVE, [["write", str(u / "d2"), 0, CHUNK, CHUNK],
                                ["unlink", str(u / "d1")],
                                ["write", str(u / "d2"), 0, CHUNK, CHUNK]]) == [
            ["EDQUOT", 0], ["ok", 0], ["ok", CHUNK]]
        if project:
            # Project 42 counts /proj itself (root's) and whatever is made below it.
            assert _as_user(*ALICE, [["write", str(p / "p1"), 0, 200_000, CHUNK]]) == [
                ["ok", 200_000]]
            room = _allowed(PROJECT_BLOCK_LIMIT, _used([p, p / "p1"]))
            assert _as_user(*BOB, [["write", str(p / "p2"), 0, 200_000, CHUNK]]) == [
                ["EDQUOT", room]]
    assert_fsck_clean(image)
    space, _, _, inodes, _, _ = _row(image, "user", CAROL[0])
    assert space <= CAROL_BLOCK_LIMIT * 1024 and inodes == CAROL_INODE_LIMIT - 1  # c1 went
    assert _row(image, "group", ERIN[1])[0] <= ERIN_GROUP_BLOCK_LIMIT * 1024


def test_limits_enforced_only_as_mounted(scratch: Path) -> None:
    """As the kernel: limits only for the quota types named at mount (usage is
    counted regardless), never for root, and chgrp by a user checks the new
    group's limits (EDQUOT) while root's chown and chgrp pass them."""
    skip_unless_possible()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing")
    work = scratch / "as-mounted"
    work.mkdir()
    image = _base_image(work / "base.img", VARIANTS["4k-quota-project"], True)
    _set_limits(image, True)
    mnt = work / "o"

    def mount(options: str) -> AbstractContextManager[ServedMount]:
        return served(image, mnt, ext4box_argv(image, mnt, options))

    with mount("rw") as handle:  # counting only
        u = handle.mountpoint / "u"
        assert _as_user(*CAROL, [["write", str(u / "c1"), 0, 300_000, CHUNK],
                                 ["unlink", str(u / "c1")]]) == [["ok", 300_000], ["ok", 0]]
    with mount("rw,grpquota") as handle:  # group limits only
        u = handle.mountpoint / "u"
        assert _as_user(*CAROL, [["write", str(u / "c1"), 0, 300_000, CHUNK],
                                 ["unlink", str(u / "c1")]]) == [["ok", 300_000], ["ok", 0]]
        assert _as_user(*ERIN, [["write", str(u / "e1"), 0, 100_000, CHUNK],
                                ["unlink", str(u / "e1")]]) == [
            ["EDQUOT", _allowed(ERIN_GROUP_BLOCK_LIMIT, 0)], ["ok", 0]]
    with mount("rw,quota,grpquota") as handle:  # "quota" is usrquota
        u = handle.mountpoint / "u"
        # root is never refused: it writes CAROL past her hard limit and hands it over.
        assert _as_user(0, 0, [["write", str(u / "r1"), 0, 300_000, CHUNK],
                               ["chown", str(u / "r1"), CAROL[0], CAROL[1]]]) == [
            ["ok", 300_000], ["ok", 0]]
        assert _as_user(*CAROL, [["write", str(u / "c1"), 0, CHUNK, CHUNK]]) == [["EDQUOT", 0]]
        # A user's chgrp into a group with no room left: EDQUOT, nothing changes.
        alice = (ALICE[0], ALICE[1])
        assert _as_user(*alice, [["write", str(u / "a1"), 0, 100_000, CHUNK],
                                 ["chown", str(u / "a1"), -1, ERIN[1]]],
                        groups=(ALICE[1], ERIN[1])) == [["ok", 100_000], ["EDQUOT", 0]]
        assert os.stat(u / "a1").st_gid == ALICE[1]
        assert _as_user(0, 0, [["chown", str(u / "a1"), -1, ERIN[1]]]) == [["ok", 0]]
    assert_fsck_clean(image)
    assert _row(image, "user", CAROL[0])[0] > CAROL_BLOCK_LIMIT * 1024
    assert _row(image, "group", ERIN[1])[0] > ERIN_GROUP_BLOCK_LIMIT * 1024


# Runs as root in a child: files of many owners created, grown, chowned and removed,
# with a syncfs now and then, until the mount goes away under it.
_CRASH_WORKLOAD = r"""
import os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
fd = os.open(root, os.O_RDONLY)
try:
    for step in range(100000):
        name = os.path.join(root, "u", f"f{rng.randrange(40)}")
        op = rng.randrange(6)
        if op == 0 and os.path.exists(name):
            os.unlink(name)
        elif op == 1 and os.path.exists(name):
            os.chown(name, 1000 + rng.randrange(5), 2000 + rng.randrange(3))
        else:
            with open(name, "ab") as handle:
                handle.write(os.urandom(rng.choice((100, 5000, 70000))))
            if not os.stat(name).st_uid:
                os.chown(name, 1000 + rng.randrange(5), 2000 + rng.randrange(3))
        if step % 25 == 0:
            os.syncfs(fd) if hasattr(os, "syncfs") else os.fsync(fd)
        if step == 60:
            print("ready", flush=True)
except OSError:
    pass
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quota_consistent_after_kill_and_replay(seed: int, scratch: Path) -> None:
    """The quota blocks are journaled with the inodes they count: whatever commit a
    kill -9 interrupts, the replayed image (by e2fsck, and by our own rw open) counts
    exactly what it holds."""
    skip_unless_possible()
    work = scratch / f"crash-{seed}"
    work.mkdir()
    image = _base_image(work / "base.img", VARIANTS["4k-quota-project"], project=True)
    with rw_mount(image, work / "o") as handle:
        pass  # a clean mount first: the kill below must not be the first thing the image saw
    with served(image, work / "o", ext4box_argv(image, work / "o", "rw"),
                expect_exit_zero=False) as handle:
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", _CRASH_WORKLOAD, str(handle.mountpoint), str(seed)],
            stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.1 * seed)
        handle.process.kill()
        handle.process.wait()
        child.wait(timeout=60)
    features = subprocess.run(["dumpe2fs", "-h", str(image)], check=True, capture_output=True,
                              text=True).stdout
    assert "needs_recovery" in features  # the kill left a journal to replay
    by_e2fsck = work / "e2fsck.img"
    shutil.copyfile(image, by_e2fsck)
    subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(by_e2fsck)], check=False,
                   capture_output=True)
    assert_fsck_clean(by_e2fsck)
    Ours(image).close()  # our replay: a read-write open replays the journal
    assert_fsck_clean(image)
    assert _usage(image, ("user", "group", "project")) == _usage(
        by_e2fsck, ("user", "group", "project"))
