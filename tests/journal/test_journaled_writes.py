"""Transactions ext4box writes: replayed by ext4box, by e2fsck and by the kernel.

Each test drives the read-write facade in-process, commits, and then "crashes"
(the device fd is closed without the clean close, exactly what a kill -9 of
the server leaves on the image file). Three copies of the crashed image are
recovered three ways — our own rw open, `e2fsck -E journal_only`, a kernel rw
mount — and each must be e2fsck-clean and hold the same tree as a twin image
that ran the same operations and was closed cleanly after the last commit.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from journal_support import logdump, needs_recovery

from ext4box.ext4.format.inode import ROOT_INO
from support.facade import (
    Ours,
    assert_clean,
    kernel_walk,
    make_image,
    need_kernel,
    pattern,
    tree_diff,
)
from support.images import dumpe2fs_header
from support.kernel import kernel_mount

pytestmark = pytest.mark.kernel

VARIANTS = {
    "ext4-1k-csum64": ["-t", "ext4", "-b", "1024", "-O", "metadata_csum,64bit"],
    "ext4-4k-nocsum-32bit": ["-t", "ext4", "-b", "4096", "-O", "^metadata_csum,^64bit"],
    "ext3-4k": ["-t", "ext3", "-b", "4096"],
}
COMPARED = ("kind", "mode", "uid", "gid", "nlink", "size", "link_target", "xattrs", "sha256")
BLOCK_REVOKE = 5


def crash(ours: Ours) -> None:
    """What a kill -9 leaves: everything committed is on the device, nothing else."""
    ours.dev.close()


def recovered_three_ways(image: Path, tmp: Path) -> dict[str, Path]:
    """Copies of a crashed image recovered by ext4box, e2fsck and the kernel."""
    assert needs_recovery(image)
    copies = {name: tmp / f"{name}.img" for name in ("ext4box", "e2fsck", "kernel")}
    for copy in copies.values():
        shutil.copyfile(image, copy)
    Ours(copies["ext4box"]).close()
    result = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(copies["e2fsck"])],
                            capture_output=True, text=True, check=False)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    mnt = tmp / "recover-mnt"
    mnt.mkdir(exist_ok=True)
    with kernel_mount(copies["kernel"], mnt, readonly=False):
        pass
    for copy in copies.values():
        assert not needs_recovery(copy)
        assert_clean(copy)
    return copies


def first_commit(ours: Ours) -> None:
    ours.mkdir("docs")
    ours.mkdir("docs/old")
    for i in range(40):
        ours.create(f"docs/f{i}")
        ours.write(f"docs/f{i}", 0, pattern(i, 700 * i + 1))
    ours.create("big")
    ours.write("big", 0, pattern(99, 300_000))
    ours.symlink("link", b"docs/f1")
    ours.setxattr("docs/f2", b"user.colour", b"green")
    ours.fs.commit(durable=True)


def second_commit(ours: Ours) -> None:
    for i in range(0, 40, 3):
        ours.unlink(f"docs/f{i}")
    ours.rename("docs/f1", "docs/old/f1")
    ours.link("docs/f2", "hard")
    ours.truncate("big", 70_000)
    ours.write("big", 200_000, pattern(7, 5000))  # a hole in between
    ours.setxattr("docs/f2", b"user.colour", b"blue")
    ours.chmod("docs/f4", 0o600)
    ours.fs.commit(durable=True)


def uncommitted(ours: Ours) -> None:
    """Changes a crash loses (nothing commits them)."""
    ours.create("lost")
    ours.write("lost", 0, pattern(5, 9000))
    ours.unlink("docs/f5")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_committed_transactions_replay_everywhere(tmp_path: Path, variant: str) -> None:
    need_kernel()
    base = make_image(tmp_path / "base.img", VARIANTS[variant])
    crashed, twin = tmp_path / "crashed.img", tmp_path / "twin.img"
    shutil.copyfile(base, crashed)
    shutil.copyfile(base, twin)

    ours = Ours(crashed)
    first_commit(ours)
    second_commit(ours)
    uncommitted(ours)
    crash(ours)
    header = dumpe2fs_header(crashed)
    assert header["Filesystem state"] == "clean"
    assert header["Journal start"] != "0"
    assert any(kind == 2 for _, kind, _ in logdump(crashed))  # commit blocks on the log

    clean = Ours(twin)
    first_commit(clean)
    second_commit(clean)
    clean.close()
    expected = kernel_walk(twin, tmp_path / "twin")
    assert "lost" not in expected

    for how, copy in recovered_three_ways(crashed, tmp_path).items():
        diff = tree_diff(kernel_walk(copy, tmp_path / how), expected, compared=COMPARED,
                         labels=(how, "clean twin"))
        assert not diff, (how, diff[:10])


def test_freed_metadata_is_revoked_before_reuse_as_data(tmp_path: Path) -> None:
    """A directory's blocks, logged while it grew, are freed with it and then
    filled with file data. Without revoke records a replay would write the old
    directory blocks over that data."""
    need_kernel()
    image = make_image(tmp_path / "r.img", VARIANTS["ext4-1k-csum64"], size_mb=8)
    ours = Ours(image)
    ours.mkdir("d")
    for i in range(400):
        ours.create(f"d/entry-with-a-long-name-{i:04}")
    ours.fs.commit(durable=True)
    d = ours.fs.inode(ours.resolve("d"))
    dir_blocks = {run.pblk + k for run in ours.fs.map_blocks(d, 0, d.size // ours.bs)
                  if run.pblk is not None for k in range(run.length)}
    assert len(dir_blocks) > 8
    for i in range(400):
        ours.unlink(f"d/entry-with-a-long-name-{i:04}")
    ours.rmdir("d")
    ours.fs.commit(durable=True)
    # Fill the free space, so the freed directory blocks are reused for data.
    free = ours.fs.statfs().blocks_free
    size = free * 9 // 10 * ours.bs
    data = pattern(3, size)
    ours.create("fill")
    ours.write("fill", 0, data)
    ours.fs.commit(durable=True)
    fill = ours.fs.inode(ours.resolve("fill"))
    fill_blocks = {run.pblk + k for run in ours.fs.map_blocks(fill, 0, -(-size // ours.bs))
                   if run.pblk is not None for k in range(run.length)}
    reused = dir_blocks & fill_blocks
    assert reused, "the scenario must reuse the freed directory blocks"
    crash(ours)
    assert any(kind == BLOCK_REVOKE for _, kind, _ in logdump(image))

    for how, copy in recovered_three_ways(image, tmp_path).items():
        again = Ours(copy)
        assert again.read("fill") == data, how
        again.close()


def test_log_wraps_around_and_space_is_reused(tmp_path: Path) -> None:
    """Far more transactions than the log holds: the log wraps and is reclaimed,
    and a crash after that still replays to the committed tree."""
    need_kernel()
    args = [*VARIANTS["ext4-1k-csum64"], "-J", "size=1"]  # a 1024-block journal
    base = make_image(tmp_path / "w.img", args, size_mb=32)
    crashed, twin = tmp_path / "crashed.img", tmp_path / "twin.img"
    shutil.copyfile(base, crashed)
    shutil.copyfile(base, twin)

    def workload(ours: Ours) -> None:
        for round_ in range(60):
            ours.mkdir(f"r{round_}")
            for i in range(12):
                ours.create(f"r{round_}/f{i}")
                ours.write(f"r{round_}/f{i}", 0, pattern(round_ * 100 + i, 2000))
            if round_ >= 2:
                for i in range(12):
                    ours.unlink(f"r{round_ - 2}/f{i}")
                ours.rmdir(f"r{round_ - 2}")
            ours.fs.commit(durable=True)

    ours = Ours(crashed)
    workload(ours)
    journal = ours.fs.writer._journal
    assert journal is not None and journal.transactions >= 60
    crash(ours)
    records = logdump(crashed)
    # After wrapping, the log no longer starts at its first block.
    assert dumpe2fs_header(crashed)["Journal start"] != "1"
    assert records
    clean = Ours(twin)
    workload(clean)
    clean.close()
    assert int(dumpe2fs_header(twin)["Journal sequence"], 16) > 60
    expected = kernel_walk(twin, tmp_path / "twin")
    for how, copy in recovered_three_ways(crashed, tmp_path).items():
        diff = tree_diff(kernel_walk(copy, tmp_path / how), expected, compared=COMPARED,
                         labels=(how, "clean twin"))
        assert not diff, (how, diff[:10])


def test_commit_larger_than_the_log_is_written_in_order(tmp_path: Path) -> None:
    """One commit holding more blocks than the log: written in place with ordered
    writes after the log is emptied; a crash right after needs no replay."""
    args = [*VARIANTS["ext4-1k-csum64"], "-J", "size=1"]
    image = make_image(tmp_path / "f.img", args, size_mb=32)
    ours = Ours(image)
    fs = ours.fs
    journal = fs.writer._journal
    assert journal is not None
    before = journal.transactions
    # 1,100 metadata blocks in one commit (wants_commit is only consulted between
    # operations, so the writer is driven directly): allocated, written, freed.
    blocks = []
    with fs.lock:
        for _ in range(1100):
            pblk = fs.blocks.alloc_block(fs.group_goal(ROOT_INO))
            fs.writer.write(pblk, bytes([0xA5]) * ours.bs)
            blocks.append(pblk)
        for pblk in blocks:
            fs.blocks.free(pblk, 1)
        assert not journal.fits(1100, 0)
        fs.commit(durable=True)
    assert journal.transactions == before
    ours.create("after")
    ours.write("after", 0, pattern(1, 5000))
    fs.commit(durable=True)
    assert journal.transactions == before + 1
    crash(ours)
    for how, copy in recovered_three_ways(image, tmp_path).items():
        again = Ours(copy)
        assert again.read("after") == pattern(1, 5000), how
        again.close()


def test_clean_close_leaves_an_empty_log_with_the_kernels_features(tmp_path: Path) -> None:
    image = make_image(tmp_path / "c.img", VARIANTS["ext4-1k-csum64"])
    ours = Ours(image)
    first_commit(ours)
    during = dumpe2fs_header(image)
    assert "needs_recovery" in during["Filesystem features"].split()
    ours.close()
    after = dumpe2fs_header(image)
    assert "needs_recovery" not in after["Filesystem features"].split()
    assert after["Journal start"] == "0"
    features = after["Journal features"].split()
    assert "journal_checksum_v3" in features and "journal_64bit" in features
    assert int(after["Journal sequence"], 16) > int(during["Journal sequence"], 16)
    assert_clean(image)
