"""Seed images whose journal needs recovery: a crash image made deterministically.

From a clean seed image: debugfs makes a set of changes on a copy (a new
directory with a file whose first block begins with the jbd2 magic, a
symlink, an unlinked file, a new xattr, a changed inode field); every block
the changes touched is then logged into the original's journal with
debugfs's journal writer (`jo`/`jw`/`jc`) in three transactions: the first
half of the blocks plus a junk copy of a free block, a transaction revoking
that junk copy, the second half. The original image, left with needs_recovery
set and the old metadata in place, is what a crash after the third commit
leaves; its replay gives the changed copy (e2fsck's replay agrees, see
test_fuzz_mutations). debugfs stamps commit blocks with the wall clock, so
the commit times are rewritten to fixed values and the commit checksums
recomputed: the same seed on every build.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

from ext4box.ext4.format import features as F
from ext4box.ext4.format.checksum import crc32c_raw
from ext4box.ext4.format.superblock import CHECKSUM_OFFSET as SB_CHECKSUM_OFFSET
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE
from ext4box.ext4.journal.commit import CHECKSUM_OFFSET, TIME, TIME_OFFSET, commit_checksum
from ext4box.ext4.journal.superblock import BLOCK_COMMIT, HEADER, JBD2_MAGIC
from fuzz.journal_walk import journal_device_blocks, journal_superblock

FAKE_TIME = "1700000000"
COMMIT_TIME = 1_700_000_000
JOURNALED_FILE_BLOCKS = 3
_INCOMPAT_OFFSET = 0x60
_RO_COMPAT_OFFSET = 0x64


def debugfs_faketime(image: Path, script: str) -> None:
    """Run a debugfs -w script with a fixed clock; fail on any complaint it prints."""
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": FAKE_TIME}
    done = subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=script.encode(),
                          capture_output=True, env=env, check=False)
    complaints = [line for line in done.stderr.decode(errors="replace").splitlines()
                  if line.strip() and not line.startswith("debugfs ")]
    if done.returncode != 0 or complaints:
        raise RuntimeError(f"debugfs on {image}: {complaints}")


def _changes(workdir: Path, block_size: int) -> str:
    body = workdir / "journaled-file"
    first = struct.pack(">I", JBD2_MAGIC) + b"J" * (block_size - 4)  # logged escaped
    body.write_bytes(first + bytes(range(256)) * (block_size * (JOURNALED_FILE_BLOCKS - 1) // 256))
    value = workdir / "journaled-xattr"
    value.write_bytes(b"logged in the journal " * 4)
    return "\n".join((
        "mkdir /journaled",
        f"write {body} /journaled/new.bin",
        "symlink /journaled/link ../hello.txt",
        "rm /tiny",
        f"ea_set -f {value} /hello.txt user.journaled",
        "sif /data/medium.bin mtime 0x5f000000",
    )) + "\n"


def _blocks(data: bytes, bs: int) -> list[bytes]:
    return [data[i:i + bs] for i in range(0, len(data), bs)]


def _free_block(image: Path) -> int:
    out = subprocess.run(["debugfs", "-R", "ffb 1 100", str(image)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split(":")[1].split()[0])


def _with_needs_recovery(block: bytes, bs: int) -> bytes:
    """The superblock as a mounted kernel logs it: needs_recovery set (checksum resealed)."""
    raw = bytearray(block)
    at = SUPERBLOCK_OFFSET % bs
    incompat = struct.unpack_from("<I", raw, at + _INCOMPAT_OFFSET)[0]
    struct.pack_into("<I", raw, at + _INCOMPAT_OFFSET, incompat | F.INCOMPAT_RECOVER)
    ro_compat = struct.unpack_from("<I", raw, at + _RO_COMPAT_OFFSET)[0]
    if ro_compat & F.RO_COMPAT_METADATA_CSUM:
        crc = crc32c_raw(0xFFFFFFFF, raw[at:at + SB_CHECKSUM_OFFSET])
        struct.pack_into("<I", raw, at + SB_CHECKSUM_OFFSET, crc)
    assert at + SUPERBLOCK_SIZE <= bs
    return bytes(raw)


def add_pending_journal(image: Path, *, checksums: bool, workdir: Path) -> None:
    """Turn a clean image with an empty journal into a crash image (see the module doc)."""
    before = image.read_bytes()
    bs = 1024 << struct.unpack_from("<I", before, SUPERBLOCK_OFFSET + 24)[0]
    after_path = workdir / (image.name + ".after")
    shutil.copyfile(image, after_path)
    debugfs_faketime(after_path, _changes(workdir, bs))
    after = after_path.read_bytes()
    junk = _free_block(after_path)  # free before and after the changes
    after_path.unlink()
    journal = set(journal_device_blocks(before))
    old, new = _blocks(before, bs), _blocks(after, bs)
    changed = [b for b in range(len(old)) if old[b] != new[b]]
    assert changed and not journal & set(changed), changed
    sb_block = SUPERBLOCK_OFFSET // bs
    copies = {b: new[b] for b in changed}
    if sb_block in copies:
        copies[sb_block] = _with_needs_recovery(copies[sb_block], bs)
    half = len(changed) // 2
    first, second = [*changed[:half], junk], changed[half:]
    files = []
    for n, blocks in enumerate((first, second)):
        path = workdir / f"transaction-{n}"
        path.write_bytes(b"".join(copies.get(b, b"\xee" * bs) for b in blocks))
        files.append(path)
    opt = "-c" if checksums else ""
    debugfs_faketime(image, (
        f"jo {opt}\njw -b {','.join(map(str, first))} {files[0]}\njc\n"
        f"jo {opt}\njw -r {junk} {files[0]}\njc\n"
        f"jo {opt}\njw -b {','.join(map(str, second))} {files[1]}\njc\n"))
    for path in (*files, workdir / "journaled-file", workdir / "journaled-xattr"):
        path.unlink()
    _fix_commit_times(image, bs)


def _fix_commit_times(image: Path, bs: int) -> None:
    data = bytearray(image.read_bytes())
    journal = journal_device_blocks(data)
    jsb = journal_superblock(data, journal, bs)
    assert jsb is not None and jsb.start, "debugfs left no transaction to recover"
    for pblk in journal[1:]:
        at = pblk * bs
        magic, kind, sequence = HEADER.unpack_from(data, at)
        if magic != JBD2_MAGIC or kind != BLOCK_COMMIT:
            continue
        TIME.pack_into(data, at + TIME_OFFSET, COMMIT_TIME + sequence, 0)
        if jsb.csum_v2or3:
            struct.pack_into(">I", data, at + CHECKSUM_OFFSET,
                             commit_checksum(data[at:at + bs], jsb))
    image.write_bytes(data)
