"""Recovery of journals the kernel wrote (crash snapshots), checked against e2fsck and
the kernel: the read-only overlay shows exactly the blocks e2fsck's replay writes, the
read-write replay writes them (only the superblock differs: our mount's own changes),
and the trees ext4box serves equal the kernel's after its own recovery."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from journal_support import (
    crash_snapshot,
    differing_blocks,
    e2fsck_clean,
    e2fsck_replayed,
    kernel_walk,
    logdump,
    needs_recovery,
    opened,
    read_all_blocks,
    superblock_block,
    write_file,
)

from support.images import dumpe2fs_header
from support.serve import ext4box_argv, served, why_no_fuse
from support.walk import compare, format_differences, walk

pytestmark = pytest.mark.usefixtures("need_kernel_mounts")

VARIANTS = {
    # name: (mkfs arguments, mount options)
    "4k-csum-v3-64bit": (["-b", "4096", "-O", "metadata_csum,64bit"], ""),
    "4k-csum-v3-async-datajournal": (
        ["-b", "4096", "-O", "metadata_csum,64bit"], "data=journal,journal_async_commit"),
    "1k-nocsum-32bit": (["-b", "1024", "-O", "^metadata_csum,^64bit"], ""),
    "4k-nocsum-64bit": (["-b", "4096", "-O", "^metadata_csum,64bit"], ""),
    "ext3-blockmap": (["-t", "ext3", "-b", "1024"], ""),
}


def _populate(mnt: Path) -> None:
    (mnt / "d").mkdir()
    for i in range(40):
        write_file(mnt / "d" / f"f{i}", f"file {i}\n".encode() * (i * 37 + 1))
    os.setxattr(mnt / "d" / "f1", "user.colour", b"blue")
    os.setxattr(mnt / "d" / "f2", "user.big", b"x" * 300)
    os.symlink("d/f1", mnt / "link")
    os.link(mnt / "d" / "f3", mnt / "hard")


def _big_directory(mnt: Path) -> None:
    (mnt / "big").mkdir()
    for i in range(300):
        write_file(mnt / "big" / f"entry-with-a-longer-name-{i:04d}", b"")


def _remove_and_reuse(mnt: Path) -> None:
    # Freeing directory blocks logged earlier makes the kernel revoke them.
    for name in os.listdir(mnt / "big"):
        os.unlink(mnt / "big" / name)
    os.rmdir(mnt / "big")
    for i in range(0, 40, 3):
        os.unlink(mnt / "d" / f"f{i}")
    (mnt / "new").mkdir()
    for i in range(20):
        write_file(mnt / "new" / f"n{i}", bytes([i]) * (4096 * (i % 4) + 100))


def _rename_and_chmod(mnt: Path) -> None:
    os.rename(mnt / "d" / "f1", mnt / "new" / "moved")
    os.chmod(mnt / "new" / "n1", 0o600)
    os.setxattr(mnt / "new" / "n2", "user.note", b"after")


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = {}
    for name, (mkfs_args, options) in VARIANTS.items():
        work = tmp_path_factory.mktemp(name)
        image = work / "live.img"
        subprocess_run(["mkfs.ext4", "-q", "-F", *mkfs_args, str(image), "24M"])
        made[name] = crash_snapshot(
            image, work / "snap.img", work,
            [_populate, _big_directory, _remove_and_reuse, _rename_and_chmod], options)
    return made


def subprocess_run(argv: list[str]) -> None:
    import subprocess

    subprocess.run(argv, check=True, capture_output=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_snapshot_needs_recovery(snapshots: dict[str, Path], variant: str) -> None:
    snap = snapshots[variant]
    assert needs_recovery(snap)
    commits = [seq for seq, kind, _ in logdump(snap) if kind == 2]
    assert len(commits) >= 3, logdump(snap)


def test_snapshots_cover_revokes_and_checksums(snapshots: dict[str, Path]) -> None:
    kinds = {kind for snap in snapshots.values() for _, kind, _ in logdump(snap)}
    assert 5 in kinds  # some revoke block
    features = {dumpe2fs_header(s).get("Journal features", "") for s in snapshots.values()}
    joined = " ".join(features)
    assert "journal_checksum_v3" in joined and "journal_64bit" in joined
    assert "journal_async_commit" in joined


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_readonly_overlay_equals_e2fsck_replay(snapshots: dict[str, Path], variant: str,
                                               tmp_path: Path) -> None:
    snap = tmp_path / "snap.img"
    shutil.copyfile(snapshots[variant], snap)
    before = _sha(snap)
    reference = e2fsck_replayed(snap, tmp_path / "e2fsck.img").read_bytes()
    with opened(snap, readonly=True) as fs:
        seen = read_all_blocks(fs)
        bs = fs.block_size
    assert _sha(snap) == before  # a read-only open never writes
    assert seen != snap.read_bytes()  # something was replayed
    # e2fsck also rewrites the superblock (needs_recovery off) and the journal
    # superblock (s_start 0); every other block must match.
    journal_sb = _journal_superblock_block(snap)
    diff = set(differing_blocks(seen, reference, bs)) - {superblock_block(bs), journal_sb}
    assert not diff, sorted(diff)[:20]


def _journal_superblock_block(image: Path) -> int:
    from journal_support import journal_device_block

    return journal_device_block(image, 0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_readwrite_recovery_equals_e2fsck(snapshots: dict[str, Path], variant: str,
                                          tmp_path: Path) -> None:
    snap = tmp_path / "snap.img"
    shutil.copyfile(snapshots[variant], snap)
    reference = e2fsck_replayed(snap, tmp_path / "e2fsck.img")
    with opened(snap, readonly=False) as fs:
        bs = fs.block_size
    assert not needs_recovery(snap)
    header = dumpe2fs_header(snap)
    assert header["Journal start"] == "0"
    assert header["Journal sequence"] == dumpe2fs_header(reference)["Journal sequence"]
    e2fsck_clean(snap)
    # Only the superblock (mount count, times and state of our own mount) and the
    # journal superblock (features set as the kernel sets them at mount) differ.
    differing = differing_blocks(snap.read_bytes(), reference.read_bytes(), bs)
    assert superblock_block(bs) in differing
    assert set(differing) <= {superblock_block(bs), _journal_superblock_block(snap)}


@pytest.mark.parametrize("variant", ["4k-csum-v3-64bit", "1k-nocsum-32bit", "ext3-blockmap"])
def test_views_equal_kernel_recovery(snapshots: dict[str, Path], variant: str,
                                     tmp_path: Path) -> None:
    snap = tmp_path / "snap.img"
    shutil.copyfile(snapshots[variant], snap)
    before = _sha(snap)
    expected = kernel_walk(snap, tmp_path)
    if why_no_fuse() is None:
        mnt = tmp_path / "served"
        with served(snap, mnt, ext4box_argv(snap, mnt, "ro")):
            ours = walk(mnt)
        assert _sha(snap) == before
        differences = compare(expected, ours)
        assert not differences, format_differences(differences)
    with opened(snap, readonly=False):
        pass
    e2fsck_clean(snap)
    differences = compare(expected, kernel_walk(snap, tmp_path / "after-rw"))
    assert not differences, format_differences(differences)
