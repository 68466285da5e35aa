"""The crafted journal attacks (crafted_journal.py), served through real mounts.

Each attack gets its own copy of a clean image. It is served read-only, then
read-write, by `ext4box serve`. A refused mount must exit 1 with exactly one
`ext4box: error:` line naming the damage, and leave the image byte for byte
as it was. A served mount must answer every request within the bound and
serve the undamaged file; after a read-write mount the image may differ only
in the blocks the journal legitimately replays, the superblock and the
journal's own blocks (nothing past the image, nothing else inside it), and
where e2fsck's replay of the same journal terminates, ours writes the same
blocks and e2fsck -fn finds the same problems in both.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fuzz.journal_walk import journal_device_blocks
from hostile import crafted_journal as cj
from hostile.crafted import GOOD_CONTENT, GOOD_FILE
from hostile.requests import LONGEST, LONGEST_REFUSAL, expect_errno, record_refusal, timed
from support.serve import ServedMount, ext4box_argv, served

pytestmark = [pytest.mark.fuse]

BS = cj.BLOCK_SIZE
DEVICE_BLOCKS = 4096  # the 4M image


@dataclass(frozen=True, slots=True)
class Bases:
    plain: Path  # no metadata_csum: journal checksums v1 when asked
    csum: Path  # metadata_csum: journal checksums v3


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, need_fuse: None) -> Bases:
    missing = [t for t in ("mkfs.ext4", "e2fsck", "debugfs", "dumpe2fs") if not shutil.which(t)]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")
    work = tmp_path_factory.mktemp("hostile-journal")
    cj.build_journal_tree(work / "tree")
    plain, csum = work / "plain.img", work / "csum.img"
    cj.build_journal_image(plain, work / "tree")
    cj.build_journal_image(csum, work / "tree", metadata_csum=True)
    return Bases(plain, csum)


@dataclass(frozen=True, slots=True)
class Attacked:
    image: Path
    replays: set[int]  # blocks the journal legitimately asks to replay
    journal: frozenset[int]  # device blocks of the journal

    def may_write(self) -> set[int]:
        return self.replays | self.journal | {cj.SB_BLOCK}


def attacked(name: str, bases: Bases, tmp: Path) -> Attacked:
    image = tmp / f"{name}.img"
    shutil.copyfile(bases.csum if name in cj.ON_CSUM_IMAGE else bases.plain, image)
    journal = frozenset(journal_device_blocks(image.read_bytes()))  # before any damage
    replays = cj.ATTACKS[name](image)
    assert cj.needs_recovery(image), name
    return Attacked(image, replays, journal)


def refused(image: Path, mode: str, tmp: Path) -> str:
    """Serve `image` expecting a refusal (exit 1); returns its one error line."""
    mountpoint = tmp / f"mnt-{mode}"
    mountpoint.mkdir(exist_ok=True)
    start = time.monotonic()
    result = subprocess.run(ext4box_argv(image, mountpoint, mode), capture_output=True,
                            text=True, timeout=60, check=False)
    record_refusal(time.monotonic() - start, f"refused {mode} serve of {image.name}")
    if os.path.ismount(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        pytest.fail(f"ext4box served {image.name} {mode}")
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # One error line, last; before it at most the log lines of a replay that did happen.
    errors = [line for line in lines if line.startswith("ext4box: error: ")]
    assert errors == lines[-1:], result.stderr
    return errors[0]


def good_file_served(handle: ServedMount) -> None:
    assert handle.alive(), handle.stderr_text()
    assert timed("read good file", (handle.mountpoint / GOOD_FILE).read_bytes) == GOOD_CONTENT


def changed_blocks(before: bytes, after: bytes) -> set[int]:
    assert len(after) == len(before), "the image file changed size"
    return {b for b in range(len(before) // BS)
            if before[b * BS:(b + 1) * BS] != after[b * BS:(b + 1) * BS]}


def fsck_problems(image: Path) -> tuple[int, list[str]]:
    done = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          timeout=60, check=False)
    lines = [line for line in done.stdout.splitlines()
             if line.strip() and not line.startswith(("e2fsck ", "Pass ", str(image)))]
    return done.returncode, lines


def same_as_e2fsck(attack: Attacked, ours: bytes, tmp: Path) -> None:
    """Outside the superblock and the journal, our replay wrote what e2fsck's writes,
    and e2fsck -fn judges both results alike."""
    reference = cj.e2fsck_replayed(attack.image.with_suffix(".before"), tmp / "e2fsck.img")
    differing = changed_blocks(reference.read_bytes(), ours) - attack.journal - {cj.SB_BLOCK}
    assert not differing, f"our replay differs from e2fsck's in blocks {sorted(differing)}"
    ours_path = tmp / "ours.img"
    ours_path.write_bytes(ours)
    ours_code, ours_problems = fsck_problems(ours_path)
    ref_code, ref_problems = fsck_problems(reference)
    assert (ours_code, ours_problems) == (ref_code, ref_problems)


def snapshot(attack: Attacked) -> bytes:
    """The attacked image's bytes, also kept beside it for e2fsck's reference replay."""
    data = attack.image.read_bytes()
    attack.image.with_suffix(".before").write_bytes(data)
    return data


# ---- refused: what the journal says cannot be replayed or read --------------------

REFUSED = {
    "journal_superblock_copy_past_device":
        "the logged superblock claims 32768 blocks, more than the device's 4096",
    "journal_tag_names_journal_block": "which belongs to the journal",
    "journal_tag_past_device": f"tag names block {DEVICE_BLOCKS + 10} outside the filesystem",
    "journal_revoke_count_past_block":
        f"r_count {cj.REVOKE_COUNT} exceeds the block ({BS} bytes)",
    "journal_maxlen_huge": f"s_maxlen {cj.HUGE_MAXLEN} vs 1024 blocks in the journal inode",
    "journal_first_outside": f"s_first {cj.FAR_BLOCK} outside the log area",
    "journal_start_outside": f"s_start {cj.FAR_BLOCK} outside the log",
    "journal_inode_extent_past_device": "not inside the data area",
    "journal_inode_overlaps_inode_table": "its blocks overlap the inode table of group 0",
    "journal_inode_is_a_user_file": "not a reserved inode (first inode 11)",
    "journal_inode_is_the_root_directory": "not a regular file in use",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_before_anything_is_written(bases: Bases, tmp_path: Path, name: str) -> None:
    attack = attacked(name, bases, tmp_path)
    before = attack.image.read_bytes()
    for mode in ("ro", "rw"):
        line = refused(attack.image, mode, tmp_path)
        assert REFUSED[name] in line, line
        assert "corrupt" in line, line
        assert attack.image.read_bytes() == before, f"a refused {mode} mount wrote the image"


# Read-write mounts take noatime: under the default relatime a read moves the file's
# atime, an inode-table write these tests do not measure (they check which blocks the
# journal's replay, and nothing else, may write).
MOUNT_OPTIONS = {"ro": "ro", "rw": "rw,noatime"}


# ---- endless logs: nothing committed, nothing replayed, the walk ends -----------------


@pytest.mark.parametrize("name", ["journal_descriptors_without_end",
                                  "journal_descriptor_wraps_onto_itself"])
def test_endless_log_ends_and_replays_nothing(bases: Bases, tmp_path: Path, name: str) -> None:
    attack = attacked(name, bases, tmp_path)
    before = attack.image.read_bytes()
    with served(attack.image, tmp_path / "mnt-ro") as handle:
        good_file_served(handle)
        names = timed("listdir spread", lambda: os.listdir(handle.mountpoint / "spread"))
        assert len(names) == cj.SPREAD_FILES
    assert attack.image.read_bytes() == before
    with served(attack.image, tmp_path / "mnt-rw",
                ext4box_argv(attack.image, tmp_path / "mnt-rw", MOUNT_OPTIONS["rw"])) as handle:
        good_file_served(handle)
    changed = changed_blocks(before, attack.image.read_bytes())
    assert changed <= attack.journal | {cj.SB_BLOCK}, sorted(changed - attack.journal)
    assert not cj.needs_recovery(attack.image)
    code, problems = fsck_problems(attack.image)  # the junk copy was never replayed
    assert code == 0, problems


# ---- replayed, then what the replayed metadata says -------------------------------------


def test_logged_descriptors_moving_an_inode_table(bases: Bases, tmp_path: Path) -> None:
    """Replayed in memory, group 2 is unusable: its file answers EUCLEAN, the rest is
    served. Read-write, the replay is written, as the kernel writes it before its
    descriptor check fails the mount, and the mount is refused because a group is
    damaged. (e2fsck's replay differs: it then finds the primary descriptors bad and
    rewrites them from the backups, which is a repair, not a replay.)"""
    attack = attacked("journal_gdt_copy_moves_an_inode_table", bases, tmp_path)
    group, victim = cj.group_victim(attack.image)
    before = snapshot(attack)
    with served(attack.image, tmp_path / "mnt-ro") as handle:
        mnt = handle.mountpoint
        expect_errno(errno.EUCLEAN, f"lstat {victim} (group {group})",
                     lambda: os.lstat(mnt / victim))
        names = timed("listdir spread", lambda: os.listdir(mnt / "spread"))
        assert len(names) == cj.SPREAD_FILES
        good_file_served(handle)
    assert attack.image.read_bytes() == before
    line = refused(attack.image, "rw", tmp_path)
    assert (f"corrupt group descriptor at group {group}: inode table at block "
            f"{DEVICE_BLOCKS + 50} (+16) outside the filesystem") in line, line
    after = attack.image.read_bytes()
    assert changed_blocks(before, after) <= attack.may_write()
    logged = cj.logged_copy(before, cj.GDT_BLOCK)
    assert after[cj.GDT_BLOCK * BS:(cj.GDT_BLOCK + 1) * BS] == logged
    done = subprocess.run(["e2fsck", "-fn", str(attack.image)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert "Group descriptors look bad... trying backup blocks" in done.stdout, done.stdout
    assert done.returncode == 0, done.stdout  # nothing else is wrong


@pytest.mark.parametrize("name", ["journal_commit_bad_checksum_then_valid",
                                  "journal_v1_commit_checksum_mismatch"])
def test_commit_checksum_failure_ends_the_replay(bases: Bases, tmp_path: Path, name: str) -> None:
    """Only the transaction before the bad commit is replayed, though a valid-looking
    one follows; read-write, it is written and the errors flag set, then the mount is
    refused as for any filesystem with errors."""
    attack = attacked(name, bases, tmp_path)
    before = snapshot(attack)
    with served(attack.image, tmp_path / "mnt-ro") as handle:
        mnt = handle.mountpoint
        assert timed("read t1", (mnt / cj.TXN_FILES[0]).read_bytes) == cj.txn_content(1)
        for n, rel in enumerate(cj.TXN_FILES[1:], 2):
            original = (b"original %d\n" % n).ljust(BS, b"-")
            assert timed(f"read t{n}", (mnt / rel).read_bytes) == original
        good_file_served(handle)
    assert "journal_transaction_corrupt" in handle.stderr_text()
    assert attack.image.read_bytes() == before
    line = refused(attack.image, "rw", tmp_path)
    assert "refusing a read-write mount: the filesystem has the errors flag set" in line, line
    after = attack.image.read_bytes()
    assert changed_blocks(before, after) <= attack.may_write()
    same_as_e2fsck(attack, after, tmp_path)


def test_replayed_corrupt_inode_table_block(bases: Bases, tmp_path: Path) -> None:
    """The journal brings an inode whose extent root lost its magic: that file answers
    EUCLEAN, read-only and read-write alike, and everything else is served."""
    attack = attacked("journal_replays_corrupt_inode_table_block", bases, tmp_path)
    before = snapshot(attack)
    victim = cj.INODE_VICTIM
    for mode in ("ro", "rw"):
        mountpoint = tmp_path / f"mnt-{mode}"
        argv = ext4box_argv(attack.image, mountpoint, MOUNT_OPTIONS[mode])
        with served(attack.image, mountpoint, argv) as handle:
            path = handle.mountpoint / victim
            assert timed(f"lstat {victim}", path.lstat).st_size == 3000
            expect_errno(errno.EUCLEAN, f"read {victim}", path.read_bytes)
            good_file_served(handle)
        if mode == "ro":
            assert attack.image.read_bytes() == before
    after = attack.image.read_bytes()
    assert changed_blocks(before, after) <= attack.may_write()
    assert not cj.needs_recovery(attack.image)
    same_as_e2fsck(attack, after, tmp_path)


def test_replayed_directory_of_4_gib(bases: Bases, tmp_path: Path) -> None:
    """The journal gives a directory an i_size of almost 4 GiB: listing it, looking a
    name up in it and (read-write) creating a name in it answer EUCLEAN at once."""
    attack = attacked("journal_replays_directory_of_4_gib", bases, tmp_path)
    before = snapshot(attack)
    for mode in ("ro", "rw"):
        mountpoint = tmp_path / f"mnt-{mode}"
        argv = ext4box_argv(attack.image, mountpoint, MOUNT_OPTIONS[mode])
        with served(attack.image, mountpoint, argv) as handle:
            _ask_huge_directory(handle.mountpoint / cj.DIRECTORY_VICTIM, writable=mode == "rw")
            good_file_served(handle)
        if mode == "ro":
            assert attack.image.read_bytes() == before
    after = attack.image.read_bytes()
    assert changed_blocks(before, after) <= attack.may_write()
    same_as_e2fsck(attack, after, tmp_path)


def _ask_huge_directory(victim: Path, *, writable: bool) -> None:
    assert timed("lstat the directory", victim.lstat).st_size == cj.HUGE_DIR_SIZE
    expect_errno(errno.EUCLEAN, "listdir", lambda: os.listdir(victim))
    expect_errno(errno.EUCLEAN, "lookup", lambda: os.lstat(victim / "missing"))
    if writable:
        expect_errno(errno.EUCLEAN, "create", lambda: (victim / "new").write_bytes(b"x"))


def test_every_journal_attack_is_tested() -> None:
    tested = set(REFUSED) | {"journal_replays_directory_of_4_gib",
        "journal_descriptors_without_end", "journal_descriptor_wraps_onto_itself",
        "journal_gdt_copy_moves_an_inode_table", "journal_commit_bad_checksum_then_valid",
        "journal_v1_commit_checksum_mismatch", "journal_replays_corrupt_inode_table_block"}
    assert tested == set(cj.ATTACKS)


def test_report_longest_request() -> None:
    """Not a check: prints the slowest request of this module (run with -s to see it)."""
    print(f"\nlongest hostile request so far: {LONGEST[0][0]:.3f}s ({LONGEST[0][1]}); "
          f"longest refused serve: {LONGEST_REFUSAL[0][0]:.3f}s ({LONGEST_REFUSAL[0][1]})")

