"""Fast-commit replay: kernel crash snapshots whose journal ends in fast commits.

Each workload runs on a kernel mount of a fast_commit image (each step made
durable by fsync of the file it changed: a fast commit when the kernel finds
the change eligible, a full commit otherwise), and the image is copied while
still mounted. The reference is the kernel's own replay (a rw mount of a
copy), then `e2fsck -fy`: the kernel's replay of a created directory leaves
its link counts and i_blocks for e2fsck to repair, which ext4box's replay
gets right directly. e2fsprogs 1.47.0's fast-commit replay fails on these
images ("Bad address while recovering journal"), so e2fsck's replay is a
reference only where it succeeds.

Times: the kernel's replay stamps directories and linked inodes with the time
of the replay, and so does ours; a time that differs only because both sides
set it after the snapshot was taken is not a difference.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from journal_support import (
    e2fsck_clean,
    fsync_path,
    journal_device_block,
    needs_recovery,
    opened,
    run,
)

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Corrupt, Unsupported
from ext4box.ext4.format.superblock import Superblock
from ext4box.ext4.journal.fast_commit import TAG_HEAD, TAG_TAIL, scan_fast_commits
from ext4box.ext4.journal.recovery import plan_recovery
from ext4box.ext4.read.filesystem import CacheSizes, Filesystem
from support.fileops import truncate_by_fd
from support.kernel import kernel_mount
from support.serve import ext4box_argv, served, why_no_fuse
from support.walk import Entry, compare, format_differences, walk

pytestmark = pytest.mark.usefixtures("need_kernel_mounts")

_TL = struct.Struct("<HH")
_TIME_FIELDS = ("atime_ns", "mtime_ns", "ctime_ns")


def _write(path: Path, data: bytes, *, append: bool = False, at: int | None = None) -> None:
    """Write and fsync the file (a fast commit when the kernel finds it eligible)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0)
    fd = os.open(path, flags, 0o644)
    try:
        if at is not None:
            os.pwrite(fd, data, at)
        else:
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _setup(mnt: Path) -> None:
    """Files and a directory made durable by one full commit (fsync of a directory)."""
    (mnt / "d").mkdir()
    for i in range(5):
        _write(mnt / f"pre{i}", bytes([65 + i]) * 20000)
    fsync_path(mnt)


def _creates_and_appends(mnt: Path) -> None:
    _write(mnt / "f1", b"hello" * 1000)
    _write(mnt / "d" / "f2", b"x" * 9000)
    _write(mnt / "f1", b"more" * 3000, append=True)
    _write(mnt / "empty", b"")


def _overwrites_and_truncates(mnt: Path) -> None:
    _write(mnt / "pre0", b"Z" * 5000)  # in place: an INODE tag only
    truncate_by_fd(mnt / "pre1", 3000)
    fsync_path(mnt / "pre1")
    truncate_by_fd(mnt / "pre2", 70000)  # grows through the descriptor: a hole
    fsync_path(mnt / "pre2")
    _write(mnt / "pre3", b"tail" * 100, append=True)


def _names(mnt: Path) -> None:
    os.link(mnt / "pre3", mnt / "d" / "hard3")
    fsync_path(mnt / "pre3")
    os.rename(mnt / "pre4", mnt / "ren4")
    fsync_path(mnt / "ren4")
    (mnt / "sub").mkdir()
    _write(mnt / "sub" / "in", b"inside" * 100)
    os.unlink(mnt / "pre0")
    fsync_path(mnt / "pre1")


def _fragmented(mnt: Path) -> None:
    # Every other block, each fsynced: more extents than the inode's root holds, so the
    # replay grows the tree (a tree block allocated while the ranges are replayed).
    for i in range(0, 24, 2):
        _write(mnt / "frag", bytes([i]) * 4096, at=i * 4096)


def _full_commit_fallback(mnt: Path) -> None:
    _write(mnt / "before", b"b" * 3000)
    os.symlink("pre1", mnt / "sym")  # not fast-commit eligible: the next fsync is a full commit
    fsync_path(mnt / "pre1")
    _write(mnt / "after", b"a" * 3000)


WORKLOADS = {
    "creates-appends": _creates_and_appends,
    "overwrites-truncates": _overwrites_and_truncates,
    "names": _names,
    "fragmented": _fragmented,
    "fallback": _full_commit_fallback,
}
BLOCK_SIZES = (4096, 1024)


@dataclass(frozen=True, slots=True)
class Snapshot:
    image: Path
    taken_ns: int  # anything stamped later was stamped by a replay


def _snapshot(work: Path, workload: str, block_size: int) -> Snapshot:
    image = work / "live.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "fast_commit", "-b", str(block_size),
                    str(image), "32M"], check=True, capture_output=True)
    with kernel_mount(image, work / "mnt", readonly=False, options="commit=600") as mnt:
        _setup(mnt)
        WORKLOADS[workload](mnt)
        shutil.copyfile(image, work / "snap.img")
        taken = time.time_ns()
    image.unlink()
    return Snapshot(work / "snap.img", taken)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Snapshot]:
    made = {}
    for workload in WORKLOADS:
        for bs in BLOCK_SIZES:
            made[workload, bs] = _snapshot(tmp_path_factory.mktemp(f"{workload}-{bs}"),
                                           workload, bs)
    return made


CASES = [(w, bs) for w in WORKLOADS for bs in BLOCK_SIZES]


def _scan(image: Path):  # -> FastCommitScan
    dev = BlockDevice.open(str(image))
    try:
        sb = Superblock.parse(dev.pread(1024, 1024))
        fs = Filesystem(dev, sb, CacheSizes())
        blocks, plan = plan_recovery(fs)
        return scan_fast_commits(blocks, plan.journal, plan.end_sequence, sb.inode_size), plan
    finally:
        dev.close()


def _reference_walk(image: Path, work: Path) -> dict[str, Entry | str]:
    """The kernel's replay of a copy (rw mount), repaired by e2fsck -fy, walked."""
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "kernel.img"
    shutil.copyfile(image, copy)
    with kernel_mount(copy, work / "recover-mnt", readonly=False):
        pass
    repaired = run(["e2fsck", "-fy", str(copy)])
    assert repaired.returncode in (0, 1), repaired.stdout + repaired.stderr
    if repaired.returncode:
        print(f"e2fsck repaired the kernel's replay of {image}:\n{repaired.stdout}")
    return _kernel_view(copy, work)


def _kernel_view(image: Path, work: Path) -> dict[str, Entry | str]:
    with kernel_mount(image, work / "walk-mnt", readonly=True) as mnt:
        return walk(mnt)


def _differences(reference: dict[str, Entry | str], ours: dict[str, Entry | str],
                 taken_ns: int) -> list[str]:
    """compare(), without time differences where both sides are replay times."""
    kept = []
    for line in compare(reference, ours):
        relpath, _, rest = line.partition(": ")
        field = rest.split(":", 1)[0]
        ref, cand = reference.get(relpath), ours.get(relpath)
        if (field in _TIME_FIELDS and isinstance(ref, Entry) and isinstance(cand, Entry)
                and getattr(ref, field) > taken_ns and getattr(cand, field) > taken_ns):
            continue
        kept.append(line)
    return kept


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the snapshots are what they should be ----------------------------------------------


@pytest.mark.parametrize(("workload", "bs"), CASES)
def test_snapshot_has_fast_commits(snapshots: dict[tuple[str, int], Snapshot], workload: str,
                                   bs: int) -> None:
    snap = snapshots[workload, bs].image
    assert needs_recovery(snap)
    scanned, plan = _scan(snap)
    assert plan.transactions >= 1
    if workload == "fallback":
        # The symlink forced a full commit after the setup's (fast commits may follow it).
        assert plan.transactions >= 2, plan
    else:
        assert scanned.pending and scanned.tags, scanned


# ---- read-only: the replay is served, nothing is written ----------------------------------


@pytest.mark.parametrize(("workload", "bs"), CASES)
def test_readonly_view_equals_kernel_replay(snapshots: dict[tuple[str, int], Snapshot],
                                            workload: str, bs: int, tmp_path: Path) -> None:
    snapshot = snapshots[workload, bs]
    snap = tmp_path / "snap.img"
    shutil.copyfile(snapshot.image, snap)
    before = _sha(snap)
    expected = _reference_walk(snap, tmp_path / "ref")
    reason = why_no_fuse()
    if reason is not None:
        pytest.skip(f"FUSE unavailable, the served view is not walked: {reason}")
    mnt = tmp_path / "served"
    with served(snap, mnt, ext4box_argv(snap, mnt, "ro")):
        ours = walk(mnt)
    assert _sha(snap) == before  # a read-only open never writes
    differences = _differences(expected, ours, snapshot.taken_ns)
    assert not differences, format_differences(differences)


# ---- read-write: replayed onto the device -----------------------------------------------


@pytest.mark.parametrize(("workload", "bs"), CASES)
def test_readwrite_replay_is_clean_and_equals_kernel(snapshots: dict[tuple[str, int], Snapshot],
                                                      workload: str, bs: int,
                                                      tmp_path: Path) -> None:
    snapshot = snapshots[workload, bs]
    snap = tmp_path / "snap.img"
    shutil.copyfile(snapshot.image, snap)
    expected = _reference_walk(snap, tmp_path / "ref")
    with opened(snap, readonly=False):
        pass
    assert not needs_recovery(snap)
    e2fsck_clean(snap)
    ours = _kernel_view(snap, tmp_path / "ours")
    differences = _differences(expected, ours, snapshot.taken_ns)
    assert not differences, format_differences(differences)
    # The journal is empty and its fast-commit area stale: a second open replays nothing.
    scanned, plan = _scan(snap)
    assert plan.transactions == 0 and not scanned.pending


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_e2fsck_replay_where_it_succeeds(snapshots: dict[tuple[str, int], Snapshot], bs: int,
                                         tmp_path: Path) -> None:
    snapshot = snapshots["creates-appends", bs]
    theirs = tmp_path / "e2fsck.img"
    shutil.copyfile(snapshot.image, theirs)
    replayed = run(["e2fsck", "-E", "journal_only", "-y", str(theirs)])
    checked = run(["e2fsck", "-fn", str(theirs)])
    if replayed.returncode not in (0, 1) or checked.returncode != 0:
        pytest.skip("e2fsck's fast-commit replay fails on this image "
                    f"({run(['e2fsck', '-V']).stderr.splitlines()[0]}): "
                    f"{(replayed.stderr or replayed.stdout).strip()[-300:]}")
    ours = tmp_path / "ours.img"
    shutil.copyfile(snapshot.image, ours)
    with opened(ours, readonly=False):
        pass
    differences = _differences(_kernel_view(theirs, tmp_path / "e"),
                               _kernel_view(ours, tmp_path / "o"), snapshot.taken_ns)
    assert not differences, format_differences(differences)


# ---- crafted fast-commit areas --------------------------------------------------------------


def _tags(blocks: list[bytearray]) -> list[tuple[bytearray, int, int]]:
    """(block, offset, tag) of every tag of the fast-commit blocks, in order."""
    found = []
    for block in blocks:
        at = 0
        while at + _TL.size <= len(block):
            tag, length = _TL.unpack_from(block, at)
            if tag == 0 or tag > TAG_HEAD:
                break
            found.append((block, at, tag))
            at += _TL.size + length
    return found


def _crafted(snapshot: Snapshot, tmp_path: Path, edit) -> Path:  # edit(list[bytearray])
    """A copy of the snapshot with its fast-commit blocks edited."""
    image = tmp_path / "crafted.img"
    shutil.copyfile(snapshot.image, image)
    scanned, plan = _scan(image)
    assert scanned.commits >= 2, "the workload should leave several fast commits"
    jsb = plan.journal
    bs = jsb.block_size
    positions = range(jsb.fast_commit_first, jsb.maxlen)
    with open(image, "r+b") as f:
        blocks = []
        for position in positions[:8]:  # the workload's fast commits fit in a few blocks
            f.seek(journal_device_block(image, position) * bs)
            blocks.append(bytearray(f.read(bs)))
        edit(blocks)
        for position, block in zip(positions, blocks, strict=False):
            f.seek(journal_device_block(image, position) * bs)
            f.write(block)
    return image


def _tails(blocks: list[bytearray]) -> list[tuple[bytearray, int]]:
    return [(block, at) for block, at, tag in _tags(blocks) if tag == TAG_TAIL]


def _open_rw(image: Path) -> None:
    with opened(image, readonly=False):
        pass


def _corrupt_first_tail(blocks: list[bytearray]) -> None:
    block, at = _tails(blocks)[0]
    block[at + 8] ^= 0xFF  # the crc: no valid fast commit before it


def _corrupt_second_tail(blocks: list[bytearray]) -> None:
    block, at = _tails(blocks)[1]
    block[at + 8] ^= 0xFF


def _tag_past_block(blocks: list[bytearray]) -> None:
    block, at, tag = _tags(blocks)[1]  # the first tag after HEAD
    _TL.pack_into(block, at, tag, 0xFFFF)


def _unknown_head_feature(blocks: list[bytearray]) -> None:
    block, at, tag = _tags(blocks)[0]
    assert tag == TAG_HEAD
    struct.pack_into("<I", block, at + 4, 0x80)


@pytest.mark.parametrize(("edit", "error"), [
    (_corrupt_first_tail, Corrupt),
    (_tag_past_block, Corrupt),
    (_unknown_head_feature, Unsupported),
])
def test_unreplayable_area_refuses_rw_and_serves_full_commits_ro(
        snapshots: dict[tuple[str, int], Snapshot], tmp_path: Path, edit, error) -> None:
    snapshot = snapshots["creates-appends", 4096]
    image = _crafted(snapshot, tmp_path, edit)
    before = _sha(image)
    with pytest.raises(error) as raised:
        _open_rw(image)
    print(f"{edit.__name__}: {raised.value}")
    assert _sha(image) == before  # refused before anything was written
    assert needs_recovery(image)
    with opened(image, readonly=True) as fs:
        names = {item.name for item in fs.readdir(2)}
    assert b"d" in names and b"f1" not in names  # the full commits only
    # The kernel refuses such a journal too (the mount fails).
    copy = tmp_path / "kernel.img"
    shutil.copyfile(image, copy)
    with pytest.raises(RuntimeError), kernel_mount(copy, tmp_path / "kmnt", readonly=False):
        pass


def test_bad_last_tail_replays_the_commits_before(snapshots: dict[tuple[str, int], Snapshot],
                                                   tmp_path: Path) -> None:
    snapshot = snapshots["creates-appends", 4096]
    full, _plan = _scan(snapshot.image)
    image = _crafted(snapshot, tmp_path, _corrupt_second_tail)
    scanned, _plan = _scan(image)
    assert scanned.commits == 1 < full.commits
    assert scanned.stopped and "crc" in scanned.stopped
    expected = _reference_walk(image, tmp_path / "ref")
    _open_rw(image)
    e2fsck_clean(image)
    differences = _differences(expected, _kernel_view(image, tmp_path / "ours"),
                               snapshot.taken_ns)
    assert not differences, format_differences(differences)
