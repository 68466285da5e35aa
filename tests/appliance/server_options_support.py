"""Shared by the server-option tests: a quota image with a user's directory and
a hard block limit (written by our quota code, read back by `debugfs lq`), a
writer that runs as that user, and an atime probe.

The kernel's ext4 here is built without quota-file support (see
tests/rw/test_rw_quota.py), so the limit is written the way that test writes
it, and e2fsprogs is the oracle that the image holds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ext4box.ext4.format.quota_file import USRQUOTA
from support.facade import Ours

CHUNK = 4096
LIMIT_KIB = 120  # the user's hard block limit (setquota's unit)
ATIME_FLAGS = frozenset({"noatime", "relatime", "nodiratime"})  # what mountinfo can show
OLD_ATIME = 1_000_000_000  # before the file's mtime: relatime moves it, noatime never
PYTHON = "/usr/bin/python3"  # readable by every user (the venv may not be)

# Runs as the user: write CHUNK-sized chunks until refused; prints [errno name, bytes].
WRITER = r"""
import errno, json, os, sys
path, total, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
done, outcome = 0, "ok"
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
try:
    while done < total:
        done += os.write(fd, b"q" * min(chunk, total - done))
    os.fsync(fd)
except OSError as err:
    outcome = errno.errorcode.get(err.errno, str(err.errno))
finally:
    os.close(fd)
print(json.dumps([outcome, done]))
"""


@contextlib.contextmanager
def public_scratch() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="ext4box-srvopt-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def quota_image(path: Path, uid: int, gid: int) -> Path:
    """mkfs.ext4 -O quota -d of a tree with `u/` (the user's) and `old.txt` whose
    atime is older than its mtime; the user's hard block limit set to LIMIT_KIB."""
    with tempfile.TemporaryDirectory() as tree:
        (Path(tree) / "u").mkdir()
        os.chown(Path(tree) / "u", uid, gid)
        old = Path(tree) / "old.txt"
        old.write_text("read me\n")
        os.utime(old, (OLD_ATIME, OLD_ATIME + 100))
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "quota", "-E",
                        "root_owner=0:0", "-d", tree, str(path), "16M"],
                       check=True, capture_output=True)  # fmt: skip
    # mkfs -d does not count what it copies in: e2fsck brings the quota files up to date.
    subprocess.run(["e2fsck", "-fy", str(path)], capture_output=True, check=False)
    facade = Ours(path)
    try:
        assert facade.fs.quota is not None
        with facade.fs.lock:
            facade.fs.quota.set_limits(USRQUOTA, uid, block_hard=LIMIT_KIB)
    finally:
        facade.close()
    assert usage(path, uid)[2] == LIMIT_KIB  # e2fsprogs reads the limit back
    check = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    path.chmod(0o644)
    return path


def usage(image: Path, uid: int) -> list[int]:
    """(space in bytes, block soft, block hard, inodes, ...) of `uid`, as `debugfs lq user`."""
    text = subprocess.run(["debugfs", "-R", "lq user", str(image)], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    for line in text.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == str(uid):
            return [int(v) for v in fields[1:7]]
    return [0] * 6


def allowed_bytes(used: int) -> int:
    """What CHUNK-sized writes of new blocks get before EDQUOT: every chunk whose
    blocks would take usage past the hard limit is refused (the kernel's rule)."""
    return max(LIMIT_KIB * 1024 - used, 0) // CHUNK * CHUNK


def write_as(argv_prefix: list[str], path: Path, total: int) -> list[object]:
    proc = subprocess.run([*argv_prefix, PYTHON, "-I", "-c", WRITER, str(path), str(total),
                           str(CHUNK)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# Runs as the user: read a file whole, N times; prints the atime (ns) after each read.
ATIME_PROBE = r"""
import json, os, sys
path, times, out = sys.argv[1], int(sys.argv[2]), []
for _ in range(times):
    with open(path, "rb") as f:
        f.read()
    out.append(os.stat(path).st_atime_ns)
print(json.dumps(out))
"""


def atimes_after_reads(argv_prefix: list[str], path: Path, times: int) -> list[int]:
    """The atime after each of `times` reads (FUSE asks the server anew after a read)."""
    proc = subprocess.run([*argv_prefix, PYTHON, "-I", "-c", ATIME_PROBE, str(path), str(times)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def kernel_atime_flags(scratch: Path, options: str) -> set[str]:
    """The atime flags the kernel shows for a tmpfs mounted with `options` (the
    oracle for what a FUSE mount with the same options must show)."""
    where = scratch / "tmpfs-oracle"
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "ext4box-oracle", str(where)],
                   check=True)  # fmt: skip
    try:
        return mount_options_of(where) & ATIME_FLAGS
    finally:
        subprocess.run(["umount", str(where)], check=True)


def setpriv(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def read_and_stat_atime(path: Path) -> int:
    """Read `path` whole, then its atime (asked anew: FUSE drops it after a read)."""
    path.read_bytes()
    return os.stat(path).st_atime_ns // 1_000_000_000


def mount_options_of(mountpoint: Path) -> set[str]:
    """The per-mount options /proc/self/mountinfo shows for `mountpoint`."""
    with open("/proc/self/mountinfo") as table:
        line = next(row for row in table if row.split()[4] == str(mountpoint))
    return set(line.split()[5].split(","))


APPENDS = 20_000  # 4-byte O_APPEND writes: one round trip each without the cache
RECORD = b"ab\n\0"


# Runs as the user: N small O_APPEND writes, fsync; prints [size, sha256].
APPENDER = r"""
import hashlib, json, os, sys
path, count, record = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
try:
    for _ in range(count):
        os.write(fd, record)
    os.fsync(fd)
finally:
    os.close(fd)
with open(path, "rb") as f:
    print(json.dumps([os.stat(path).st_size, hashlib.sha256(f.read()).hexdigest()]))
"""


def small_appends(argv_prefix: list[str], path: Path, count: int = APPENDS) -> list[object]:
    """`count` RECORD-sized O_APPEND writes and an fsync, as `argv_prefix` runs
    them (setpriv, or [] for root); [size, sha256] of `path` after."""
    proc = subprocess.run([*argv_prefix, PYTHON, "-I", "-c", APPENDER, str(path), str(count),
                           RECORD.hex()], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def negotiated_flags(log: str) -> set[str]:
    """The INIT flags the native session agreed with the kernel, from its one
    `session ... backend=native ... flags=A,B,...` line (the server's own log:
    structlog's console lines on stdout, or in the container's log file)."""
    (flags,) = re.findall(r"\bsession\b.*\bbackend=native\b.*\bflags=([A-Z0-9_,]*)", log)
    return set(flags.split(","))
