"""Journals written by debugfs (revokes, with and without checksums) and kernel journals
damaged on purpose: replay stops where e2fsck's stops, or refuses with Corrupt before
writing anything; nothing loops."""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import crc32c
import pytest
from journal_support import (
    crash_snapshot,
    differing_blocks,
    e2fsck_clean,
    e2fsck_replayed,
    journal_device_block,
    logdump,
    needs_recovery,
    opened,
    read_all_blocks,
    superblock_block,
)

from ext4box.ext4.format.errors import Corrupt, ReadOnly, Unsupported
from support.images import dumpe2fs_header

_MAGIC = 0xC03B3998
_DESCRIPTOR, _COMMIT = 1, 2


def _mkfs(image: Path, *args: str, size: str = "16M") -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", *args, str(image), size], check=True,
                   capture_output=True)
    return image


def _debugfs_w(image: Path, script: str) -> None:
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=script.encode(),
                   check=True, capture_output=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _free_blocks(image: Path, count: int) -> list[int]:
    out = subprocess.run(["debugfs", "-R", f"ffb {count} 3000", str(image)],
                         capture_output=True, text=True, check=True).stdout
    return [int(b) for b in out.split(":")[1].split()]


def _refused(image: Path, error: type[Exception], match: str, *, readonly: bool) -> None:
    with pytest.raises(error, match=match), opened(image, readonly=readonly):
        pass


def _rw_and_compare(image: Path, tmp: Path) -> bytes:
    """Recover read-only, then read-write; both must equal e2fsck's replay outside
    the superblock (and, read-only, the journal superblock e2fsck resets)."""
    reference = e2fsck_replayed(image, tmp / "e2fsck.img").read_bytes()
    before = _sha(image)
    journal_sb = journal_device_block(image, 0)
    with opened(image, readonly=True) as fs:
        seen = read_all_blocks(fs)
        bs = fs.block_size
    assert _sha(image) == before
    sb_block = superblock_block(bs)
    assert set(differing_blocks(seen, reference, bs)) <= {sb_block, journal_sb}
    try:
        with opened(image, readonly=False):
            pass
    except ReadOnly:
        pass  # replayed, then refused: the filesystem is marked with errors (checked by caller)
    assert not needs_recovery(image)
    # A rw session also rewrites the journal superblock (its features, as the
    # kernel sets them at mount, and the next sequence number).
    assert set(differing_blocks(image.read_bytes(), reference, bs)) <= {sb_block, journal_sb}
    return reference


@pytest.mark.parametrize("block_size", ["1024", "4096"])
@pytest.mark.parametrize("checksums", ["", "-c"])
def test_debugfs_transactions_with_revoke(tmp_path: Path, block_size: str,
                                          checksums: str) -> None:
    image = _mkfs(tmp_path / "j.img", "-b", block_size)
    a, b, c = _free_blocks(image, 3)
    bs = int(block_size)
    (tmp_path / "two").write_bytes(b"\xab" * bs + b"\xcd" * bs)
    (tmp_path / "one").write_bytes(b"\x11" * bs)
    # T1 logs a and b; T2 revokes a; T3 logs c with a block starting with the jbd2
    # magic (written escaped).
    (tmp_path / "magic").write_bytes(struct.pack(">I", _MAGIC) + b"\x22" * (bs - 4))
    _debugfs_w(image, f"jo {checksums}\njw -b {a},{b} {tmp_path / 'two'}\njc\n"
               f"jo {checksums}\njw -r {a} {tmp_path / 'one'}\njc\n"
               f"jo {checksums}\njw -b {c} {tmp_path / 'magic'}\njc\n")
    assert needs_recovery(image)
    features = dumpe2fs_header(image)["Journal features"]
    assert ("journal_checksum_v3" in features) == bool(checksums)
    assert [k for _, k, _ in logdump(image)].count(5) == 1
    _rw_and_compare(image, tmp_path)
    data = image.read_bytes()
    assert data[a * bs : (a + 1) * bs] == bytes(bs)  # revoked: never replayed
    assert data[b * bs : (b + 1) * bs] == b"\xcd" * bs
    assert data[c * bs : (c + 1) * bs] == (tmp_path / "magic").read_bytes()
    e2fsck_clean(image)


def test_empty_journal_with_needs_recovery(tmp_path: Path) -> None:
    image = _mkfs(tmp_path / "e.img", "-b", "1024")
    _debugfs_w(image, "feature needs_recovery\n")
    with opened(image, readonly=True):
        pass
    with opened(image, readonly=False):
        pass
    assert not needs_recovery(image)
    e2fsck_clean(image)


def test_external_journal_is_unsupported(tmp_path: Path) -> None:
    image = _mkfs(tmp_path / "x.img", "-b", "1024")
    _debugfs_w(image, "feature needs_recovery\nssv journal_inum 0\n")
    before = _sha(image)
    for readonly in (True, False):
        _refused(image, Unsupported, "external journal", readonly=readonly)
    assert _sha(image) == before


# ---- damaged kernel journals ------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("crash")
    image = _mkfs(work / "live.img", "-b", "4096", "-O", "metadata_csum,64bit", size="16M")

    def step(n: int) -> Callable[[Path], None]:
        def run(mnt: Path) -> None:
            (mnt / f"dir{n}").mkdir()
            for i in range(5):
                (mnt / f"dir{n}" / f"f{i}").write_bytes(b"")
        return run

    steps = [step(n) for n in range(4)]
    snap = crash_snapshot(image, work / "snap.img", work, steps)
    return snap


def _transactions(image: Path) -> dict[int, list[tuple[int, int]]]:
    """sequence → [(block type, journal block)] from debugfs's logdump."""
    found: dict[int, list[tuple[int, int]]] = {}
    for seq, kind, block in logdump(image):
        found.setdefault(seq, []).append((kind, block))
    return found


def _middle_transaction(image: Path) -> tuple[int, int, int]:
    """(sequence, journal block of its first descriptor, of its commit) of a transaction
    with later transactions after it."""
    txs = _transactions(image)
    seqs = sorted(s for s, blocks in txs.items() if any(k == _DESCRIPTOR for k, _ in blocks))
    assert len(seqs) >= 3, txs
    seq = seqs[1]
    descriptor = next(b for k, b in txs[seq] if k == _DESCRIPTOR)
    commit = next(b for k, b in txs[seq] if k == _COMMIT)
    return seq, descriptor, commit


def _patch_block(image: Path, journal_block: int,
                 patch: Callable[[bytearray], object]) -> None:
    bs = int(dumpe2fs_header(image)["Block size"])
    offset = journal_device_block(image, journal_block) * bs
    with image.open("r+b") as f:
        f.seek(offset)
        block = bytearray(f.read(bs))
        patch(block)
        f.seek(offset)
        f.write(block)


def _fix_tail_checksum(image: Path, block: bytearray) -> None:
    """Recompute a descriptor's v3 tail checksum (crc32c seeded by the journal UUID)."""
    bs = len(block)
    raw_sb = image.read_bytes()[journal_device_block(image, 0) * bs:][:1024]
    uuid = raw_sb[0x30:0x40]
    seed = ~crc32c.crc32c(uuid) & 0xFFFFFFFF  # raw register after the UUID
    block[bs - 4 :] = bytes(4)
    value = ~crc32c.crc32c(bytes(block), value=seed ^ 0xFFFFFFFF) & 0xFFFFFFFF
    struct.pack_into(">I", block, bs - 4, value)


def _copy(snap: Path, tmp: Path) -> Path:
    image = tmp / "snap.img"
    shutil.copyfile(snap, image)
    return image


def test_kernel_snapshot_is_csum_v3(kernel_snapshot: Path) -> None:
    assert "journal_checksum_v3" in dumpe2fs_header(kernel_snapshot)["Journal features"]


def test_bad_descriptor_magic_ends_the_log(kernel_snapshot: Path, tmp_path: Path) -> None:
    image = _copy(kernel_snapshot, tmp_path)
    _seq, descriptor, _commit = _middle_transaction(image)
    _patch_block(image, descriptor, lambda b: b.__setitem__(slice(0, 4), b"\0\0\0\0"))
    _rw_and_compare(image, tmp_path)
    e2fsck_clean(image)


def test_commit_checksum_mismatch_in_the_middle(kernel_snapshot: Path, tmp_path: Path) -> None:
    image = _copy(kernel_snapshot, tmp_path)
    _seq, _descriptor, commit = _middle_transaction(image)
    _patch_block(image, commit, lambda b: b.__setitem__(100, b[100] ^ 0xFF))
    reference = _rw_and_compare(image, tmp_path)
    # Both recoveries leave the filesystem marked with errors (the transaction was corrupt).
    ref_path = tmp_path / "ref.img"
    ref_path.write_bytes(reference)
    state = dumpe2fs_header(image)["Filesystem state"]
    assert "with errors" in state
    assert state == dumpe2fs_header(ref_path)["Filesystem state"]


def test_tag_outside_the_filesystem_is_corrupt(kernel_snapshot: Path, tmp_path: Path) -> None:
    image = _copy(kernel_snapshot, tmp_path)
    _seq, descriptor, _commit = _middle_transaction(image)

    def point_far(block: bytearray) -> None:
        struct.pack_into(">I", block, 12, 0x7FFFFFF0)  # first tag's block number
        _fix_tail_checksum(image, block)

    _patch_block(image, descriptor, point_far)
    before = _sha(image)
    for readonly in (True, False):
        _refused(image, Corrupt, "outside the filesystem", readonly=readonly)
    assert _sha(image) == before


def test_tags_running_past_the_block(kernel_snapshot: Path, tmp_path: Path) -> None:
    image = _copy(kernel_snapshot, tmp_path)
    _seq, descriptor, _commit = _middle_transaction(image)

    def drop_last_tag_flag(block: bytearray) -> None:
        offset = 12
        while True:  # csum v3 tags: 16 bytes, flags in the low half of the be32 at +4
            flags = struct.unpack_from(">I", block, offset + 4)[0]
            if flags & 0x8:
                struct.pack_into(">I", block, offset + 4, flags & ~0x8)
                break
            offset += 16 if flags & 0x2 else 32
        _fix_tail_checksum(image, block)

    _patch_block(image, descriptor, drop_last_tag_flag)
    _rw_and_compare(image, tmp_path)


def test_data_block_checksum_mismatch_is_corrupt(kernel_snapshot: Path,
                                                 tmp_path: Path) -> None:
    image = _copy(kernel_snapshot, tmp_path)
    _seq, descriptor, _commit = _middle_transaction(image)
    _patch_block(image, descriptor + 1, lambda b: b.__setitem__(200, b[200] ^ 0x5A))
    before = _sha(image)
    for readonly in (True, False):
        _refused(image, Corrupt, "fails its checksum", readonly=readonly)
    assert _sha(image) == before


@pytest.mark.timeout(60)
def test_descriptors_without_end_stop_cleanly(tmp_path: Path) -> None:
    """Every log block a descriptor of the same transaction: the walk ends after one
    turn of the log with nothing committed, instead of circling for ever."""
    bs = 4096
    image = _mkfs(tmp_path / "loop.img", "-b", str(bs), size="16M")
    (tmp_path / "one").write_bytes(b"\x11" * bs)
    _debugfs_w(image, f"jo\njw -b 3000 {tmp_path / 'one'}\njc\n")
    assert needs_recovery(image)
    header = dumpe2fs_header(image)
    total = int(header["Total journal blocks"])
    seq = int(header["Journal sequence"], 16)
    device_blocks = _journal_extents(image)
    assert len(device_blocks) == total
    descriptor = bytearray(bs)
    struct.pack_into(">III", descriptor, 0, _MAGIC, _DESCRIPTOR, seq)
    struct.pack_into(">IHH", descriptor, 12, 3000, 0, 0x8 | 0x2)  # LAST_TAG | SAME_UUID
    with image.open("r+b") as f:
        for pblk in device_blocks[1:]:
            f.seek(pblk * bs)
            f.write(descriptor)
    # No e2fsck reference here: e2fsck 1.47.0's replay of this journal never ends.
    before = image.read_bytes()
    with opened(image, readonly=True) as fs:
        assert read_all_blocks(fs) == before  # nothing committed, nothing replayed
    assert image.read_bytes() == before
    with opened(image, readonly=False):
        pass
    assert not needs_recovery(image)
    data = image.read_bytes()
    assert data[3000 * bs : 3001 * bs] == bytes(bs)
    e2fsck_clean(image)


def _journal_extents(image: Path) -> list[int]:
    """Device block of every journal block, from debugfs's extent listing of inode 8."""
    out = subprocess.run(["debugfs", "-c", "-n", "-R", "ex <8>", str(image)],
                         capture_output=True, text=True, check=True).stdout
    blocks: list[int] = []
    for lfirst, _llast, pfirst, _plast, length in re.findall(
            r"(\d+)\s*-\s*(\d+)\s+(\d+)\s*-\s*(\d+)\s+(\d+)", out):
        assert int(lfirst) == len(blocks)
        blocks.extend(range(int(pfirst), int(pfirst) + int(length)))
    return blocks
