"""Crafted journal attacks: a real image whose journal needs recovery, damaged one way each.

The image comes from mkfs.ext4 -d (1 KiB blocks, no metadata_csum, 32-bit
journal tags so raw edits reach the parser); its transactions are written by
debugfs's own journal writer (`jo`/`jw`/`jc`, with `-c` for journal
checksums), which leaves needs_recovery set exactly as a crash would. Each
attack then damages the journal superblock, a log block, or the journal
inode, at offsets located by walking the log (fuzz/journal_walk.py) or with
debugfs. Nothing binary is stored in git.

Every attack returns the filesystem blocks its journal legitimately asks to
replay (the allowed writes of a rw mount beside the superblock and the
journal's own blocks); test_hostile_journal.py serves the damaged images
read-only and read-write and checks what a user sees.
"""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ext4box.ext4.format.features import INCOMPAT_RECOVER
from ext4box.ext4.format.superblock import SUPERBLOCK_OFFSET
from ext4box.ext4.journal.superblock import BLOCK_COMMIT, BLOCK_DESCRIPTOR, BLOCK_REVOKE, JBD2_MAGIC
from fuzz.journal_walk import LogEntry, journal_device_blocks, journal_superblock, walk_log
from fuzz.seed_journal import debugfs_faketime
from hostile.crafted import (
    GOOD_CONTENT,
    GOOD_FILE,
    blocks_count,
    first_block,
    inode_offset,
    poke,
)
from support import images

BLOCK_SIZE = 1024
SB_BLOCK = 1  # with 1 KiB blocks the superblock is block 1, the descriptors block 2
GDT_BLOCK = 2
TXN_FILES = ("ok/t1.txt", "ok/t2.txt", "ok/t3.txt")
INODE_VICTIM = "victim/inode-victim.txt"
SPREAD_FILES = 150
JUNK = b"\xee" * BLOCK_SIZE  # what a never-replayed logged copy holds

_TAG = struct.Struct(">IHH")  # 32-bit tag without checksums: blocknr, (checksum), flags
_TAG_SAME_UUID_LAST = 0x2 | 0x8
_JSB_MAXLEN, _JSB_FIRST, _JSB_START = 0x10, 0x14, 0x1C
_REVOKE_COUNT = 12


def txn_content(n: int) -> bytes:
    """What transaction n writes into ok/t{n}.txt's block."""
    return (b"replayed by transaction %d\n" % n).ljust(BLOCK_SIZE, b".")


def build_journal_tree(root: Path) -> None:
    (root / "ok").mkdir(parents=True)
    (root / GOOD_FILE).write_bytes(GOOD_CONTENT)
    for n, rel in enumerate(TXN_FILES, 1):
        (root / rel).write_bytes((b"original %d\n" % n).ljust(BLOCK_SIZE, b"-"))
    (root / "victim").mkdir()
    (root / INODE_VICTIM).write_bytes(b"V" * 3000)
    (root / "spread").mkdir()
    for i in range(SPREAD_FILES):  # enough inodes to fill group 0 and reach group 2
        (root / "spread" / f"f{i:03d}").write_bytes(b"spread %d\n" % i)


def build_journal_image(image: Path, tree: Path, *, metadata_csum: bool = False) -> None:
    features = "metadata_csum,^64bit" if metadata_csum else "^metadata_csum,^64bit"
    images.run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-O", features,
                "-E", "root_owner=0:0", "-g", "1024", "-N", "256", "-d", str(tree), str(image),
                "4M"])


# ---- writing transactions -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Txn:
    blocks: dict[int, bytes] = field(default_factory=dict)
    revoke: tuple[int, ...] = ()


def log_transactions(image: Path, txns: list[Txn], *, checksums: bool = False) -> None:
    """Append `txns` to the (empty) journal with debugfs; needs_recovery is left set.
    `checksums`: journal checksums, v3 on a metadata_csum image (as the kernel writes
    them), v1 (a crc32_be of each transaction in its commit block) otherwise."""
    work = image.parent
    script = []
    for n, txn in enumerate(txns):
        script.append("jo -c" if checksums else "jo")
        body = work / f"{image.name}.txn{n}"
        body.write_bytes(b"".join(txn.blocks.values()) or JUNK)
        if txn.blocks:
            script.append(f"jw -b {','.join(map(str, txn.blocks))} {body}")
        if txn.revoke:
            script.append(f"jw -r {','.join(map(str, txn.revoke))} {body}")
        script.append("jc")
    debugfs_faketime(image, "\n".join(script) + "\n")
    for n in range(len(txns)):
        (work / f"{image.name}.txn{n}").unlink()


def free_block(image: Path) -> int:
    out = images.debugfs(image, "ffb 1 2000")
    return int(out.split(":")[1].split()[0])


def block_of(image: Path, pblk: int) -> bytes:
    with image.open("rb") as f:
        f.seek(pblk * BLOCK_SIZE)
        return f.read(BLOCK_SIZE)


@dataclass(frozen=True, slots=True)
class Journal:
    blocks: tuple[int, ...]  # device block of each journal block
    log: tuple[LogEntry, ...]  # the header blocks of the log, in order

    def offset(self, position: int) -> int:
        return self.blocks[position] * BLOCK_SIZE

    def first(self, kind: int, nth: int = 0) -> LogEntry:
        return [e for e in self.log if e.kind == kind][nth]


def journal_of(image: Path) -> Journal:
    data = image.read_bytes()
    blocks = journal_device_blocks(data)
    jsb = journal_superblock(data, blocks, BLOCK_SIZE)
    assert jsb is not None and jsb.start, "no log to recover"
    return Journal(blocks, tuple(walk_log(data, blocks, jsb)))


def logged_copy(image: bytes, target: int) -> bytes:
    """The newest logged copy of block `target` in the image's log (32-bit tags)."""
    blocks = journal_device_blocks(image)
    jsb = journal_superblock(image, blocks, BLOCK_SIZE)
    assert jsb is not None
    found = None
    for entry in walk_log(image, blocks, jsb):
        for tag, position in zip(entry.tags, entry.logged, strict=True):
            if tag.target == target:
                found = image[blocks[position] * BLOCK_SIZE:][:BLOCK_SIZE]
    assert found is not None, f"block {target} is not logged"
    return found


def _descriptor(sequence: int, targets: list[int]) -> bytes:
    block = bytearray(BLOCK_SIZE)
    struct.pack_into(">III", block, 0, JBD2_MAGIC, BLOCK_DESCRIPTOR, sequence)
    for i, target in enumerate(targets):
        flags = 0x2 | (0x8 if i == len(targets) - 1 else 0)
        _TAG.pack_into(block, 12 + i * _TAG.size, target, 0, flags)
    return bytes(block)


def _set_tag_target(image: Path, target: int) -> None:
    journal = journal_of(image)
    entry = journal.first(BLOCK_DESCRIPTOR)
    poke(image, journal.offset(entry.position) + entry.tags[0].offset, struct.pack(">I", target))


def _set_jsb(image: Path, field_offset: int, value: int) -> None:
    poke(image, journal_of(image).offset(0) + field_offset, struct.pack(">I", value))


# ---- the attacks ----------------------------------------------------------------
# Each takes a fresh copy of the clean image and returns the blocks its journal
# legitimately asks to replay.


def journal_descriptors_without_end(image: Path) -> set[int]:
    """Every log block a descriptor of the same transaction, none committed: jbd2's scan
    (and e2fsck 1.47.0's) walks such a log for ever."""
    junk = free_block(image)
    log_transactions(image, [Txn({junk: JUNK})])
    journal = journal_of(image)
    descriptor = _descriptor(journal.log[0].sequence, [junk])
    jsb = journal_superblock(image.read_bytes(), journal.blocks, BLOCK_SIZE)
    assert jsb is not None
    for position in range(jsb.start, jsb.log_end):
        poke(image, journal.offset(position), descriptor)
    return set()


def journal_descriptor_wraps_onto_itself(image: Path) -> set[int]:
    """A 99-block log whose first descriptor lists 98 blocks: after them the log wraps
    back onto the descriptor itself, which continues the same transaction for ever."""
    junk = free_block(image)
    log_transactions(image, [Txn({junk: JUNK})])
    journal = journal_of(image)
    start = journal.log[0].position
    _set_jsb(image, _JSB_MAXLEN, start + 99)  # log positions [1, 100): 99 blocks
    poke(image, journal.offset(start), _descriptor(journal.log[0].sequence, [junk] * 98))
    return set()


def journal_superblock_copy_past_device(image: Path) -> set[int]:
    """A logged superblock claiming eight times the blocks the device holds."""
    sb = bytearray(block_of(image, SB_BLOCK))
    inodes, count = struct.unpack_from("<II", sb, 0)
    # s_inodes_count grows with the group count, so the copy is consistent in itself.
    struct.pack_into("<II", sb, 0, inodes * 8, count * 8)
    log_transactions(image, [Txn({SB_BLOCK: bytes(sb)})])
    return set()


_DESC_SIZE = 32
_DESC_INODE_TABLE = 8


def _ino(image: Path, path: str) -> int:
    match = re.search(r"Inode: (\d+)", images.debugfs(image, f'stat "/{path}"'))
    assert match, path
    return int(match.group(1))


def group_victim(image: Path) -> tuple[int, str]:
    """(group, path) of the last spread file, whose inode is in a group that holds
    none of the witnesses (the good file, its directory, the spread directory)."""
    ipg = int(images.dumpe2fs_header(image)["Inodes per group"])
    protected = {(_ino(image, p) - 1) // ipg
                 for p in ("ok", GOOD_FILE, "spread")}
    path = f"spread/f{SPREAD_FILES - 1:03d}"
    group = (_ino(image, path) - 1) // ipg
    assert group not in protected, (group, protected)
    return group, path


def journal_gdt_copy_moves_an_inode_table(image: Path) -> set[int]:
    """A logged copy of the group descriptors putting one group's inode table past the
    device: replayed, that group is unusable, the rest is served."""
    group, _path = group_victim(image)
    gdt = bytearray(block_of(image, GDT_BLOCK))
    struct.pack_into("<I", gdt, group * _DESC_SIZE + _DESC_INODE_TABLE, blocks_count(image) + 50)
    log_transactions(image, [Txn({GDT_BLOCK: bytes(gdt)})])
    return {GDT_BLOCK}


def journal_tag_names_journal_block(image: Path) -> set[int]:
    log_transactions(image, [Txn({free_block(image): JUNK})])
    _set_tag_target(image, journal_of(image).blocks[10])
    return set()


def journal_tag_past_device(image: Path) -> set[int]:
    log_transactions(image, [Txn({free_block(image): JUNK})])
    _set_tag_target(image, blocks_count(image) + 10)
    return set()


REVOKE_COUNT = 5000


def journal_revoke_count_past_block(image: Path) -> set[int]:
    junk = free_block(image)
    log_transactions(image, [Txn({junk: JUNK}), Txn(revoke=(junk,))])
    journal = journal_of(image)
    revoke = journal.first(BLOCK_REVOKE)
    poke(image, journal.offset(revoke.position) + _REVOKE_COUNT, struct.pack(">I", REVOKE_COUNT))
    return set()


HUGE_MAXLEN = 0xFFFFFFF0
FAR_BLOCK = 5000


def journal_maxlen_huge(image: Path) -> set[int]:
    log_transactions(image, [Txn({free_block(image): JUNK})])
    _set_jsb(image, _JSB_MAXLEN, HUGE_MAXLEN)
    return set()


def journal_first_outside(image: Path) -> set[int]:
    log_transactions(image, [Txn({free_block(image): JUNK})])
    _set_jsb(image, _JSB_FIRST, FAR_BLOCK)
    return set()


def journal_start_outside(image: Path) -> set[int]:
    log_transactions(image, [Txn({free_block(image): JUNK})])
    _set_jsb(image, _JSB_START, FAR_BLOCK)
    return set()


def _journal_extent_words(image: Path, *words: tuple[int, int]) -> None:
    """Set i_block words of the journal inode (its in-inode extent root) with debugfs."""
    debugfs_faketime(image, "".join(f"sif <8> block[{i}] {v:#x}\n" for i, v in words))


def journal_inode_extent_past_device(image: Path) -> set[int]:
    log_transactions(image, [Txn({free_block(image): JUNK})])
    _journal_extent_words(image, (5, blocks_count(image) + 100))  # ee_start_lo of extent 0
    return set()


def journal_inode_is_a_user_file(image: Path) -> set[int]:
    """s_journal_inum names a user's file holding a valid copy of the journal: replay
    would read it, and journaled writes after it would log into that file."""
    log_transactions(image, [Txn({free_block(image): JUNK})])
    journal = journal_of(image)
    copy = image.parent / f"{image.name}.journal"
    blocks = (block_of(image, pblk) for pblk in journal.blocks)
    # Unused log blocks as junk, not zeros: debugfs would leave holes for zeros.
    copy.write_bytes(b"".join(b if any(b) else JUNK for b in blocks))
    debugfs_faketime(image, f"write {copy} /ok/journal-copy\n")
    copy.unlink()
    debugfs_faketime(image, f"ssv journal_inum {_ino(image, 'ok/journal-copy')}\n")
    return set()


def journal_inode_is_the_root_directory(image: Path) -> set[int]:
    log_transactions(image, [Txn({free_block(image): JUNK})])
    debugfs_faketime(image, "ssv journal_inum 2\n")
    return set()


def first_inode_table(image: Path) -> int:
    out = images.run(["dumpe2fs", str(image)])
    return int(re.search(r"Inode table at (\d+)-", out).group(1))


def journal_inode_overlaps_inode_table(image: Path) -> set[int]:
    """The journal's second half mapped onto the inode tables: its first half (the
    superblock and the log) is intact, so only the overlap itself gives it away."""
    log_transactions(image, [Txn({free_block(image): JUNK})])
    blocks = journal_of(image).blocks
    start, half = blocks[0], len(blocks) // 2
    _journal_extent_words(image, (0, 0xF30A | 2 << 16),  # magic, two entries
                          (4, half), (5, start),  # extent 0: [0, half) at the journal
                          (6, half), (7, half), (8, first_inode_table(image)))
    return set()


def _second_commit_damaged(image: Path, byte: int) -> set[int]:
    txns = [Txn({first_block(image, rel): txn_content(n)}) for n, rel in enumerate(TXN_FILES, 1)]
    log_transactions(image, txns, checksums=True)
    journal = journal_of(image)
    at = journal.offset(journal.first(BLOCK_COMMIT, 1).position) + byte
    poke(image, at, bytes([block_of(image, at // BLOCK_SIZE)[at % BLOCK_SIZE] ^ 0xFF]))
    return {first_block(image, TXN_FILES[0])}


def journal_commit_bad_checksum_then_valid(image: Path) -> set[int]:
    """(metadata_csum image: journal checksums v3) Three transactions, each rewriting one
    file's block; the second commit block fails its checksum. Only the first is
    replayed (then the filesystem is marked with errors), though the third looks valid."""
    return _second_commit_damaged(image, 100)  # any byte: v3 covers the whole block


def journal_v1_commit_checksum_mismatch(image: Path) -> set[int]:
    """The same with v1 checksums: the second commit's crc32_be of its transaction is off."""
    return _second_commit_damaged(image, 16)  # chksum[0]


_EXTENT_MAGIC_AT = 0x28  # i_block starts with the extent header magic


def journal_replays_corrupt_inode_table_block(image: Path) -> set[int]:
    """A logged inode-table block in which one file's extent root lost its magic."""
    offset = inode_offset(image, INODE_VICTIM)
    pblk = offset // BLOCK_SIZE
    table = bytearray(block_of(image, pblk))
    struct.pack_into("<H", table, offset % BLOCK_SIZE + _EXTENT_MAGIC_AT, 0)
    log_transactions(image, [Txn({pblk: bytes(table)})])
    return {pblk}


DIRECTORY_VICTIM = "victim"
HUGE_DIR_SIZE = 0xFFFFFC00


def journal_replays_directory_of_4_gib(image: Path) -> set[int]:
    """A logged inode-table block giving a directory an i_size of almost 4 GiB. Found by
    atheris on the rw side: after the replay a create in it scanned the directory
    block by block for minutes (the read side already refused such a size)."""
    offset = inode_offset(image, DIRECTORY_VICTIM)
    pblk = offset // BLOCK_SIZE
    table = bytearray(block_of(image, pblk))
    struct.pack_into("<I", table, offset % BLOCK_SIZE + 4, HUGE_DIR_SIZE)  # i_size_lo
    log_transactions(image, [Txn({pblk: bytes(table)})])
    return {pblk}


# Attacks made on the metadata_csum variant of the image (journal checksums v3).
ON_CSUM_IMAGE = frozenset({"journal_commit_bad_checksum_then_valid"})

ATTACKS: dict[str, Callable[[Path], set[int]]] = {
    f.__name__: f for f in (
        journal_descriptors_without_end,
        journal_descriptor_wraps_onto_itself,
        journal_superblock_copy_past_device,
        journal_gdt_copy_moves_an_inode_table,
        journal_tag_names_journal_block,
        journal_tag_past_device,
        journal_revoke_count_past_block,
        journal_maxlen_huge,
        journal_first_outside,
        journal_start_outside,
        journal_inode_extent_past_device,
        journal_inode_overlaps_inode_table,
        journal_inode_is_a_user_file,
        journal_inode_is_the_root_directory,
        journal_commit_bad_checksum_then_valid,
        journal_v1_commit_checksum_mismatch,
        journal_replays_corrupt_inode_table_block,
        journal_replays_directory_of_4_gib,
    )
}


def needs_recovery(image: Path) -> bool:
    """The superblock's needs_recovery bit (read directly: dumpe2fs gives up on some of
    the damaged journals)."""
    with image.open("rb") as f:
        f.seek(SUPERBLOCK_OFFSET + 0x60)
        return bool(struct.unpack("<I", f.read(4))[0] & INCOMPAT_RECOVER)


def e2fsck_replayed(image: Path, out: Path) -> Path:
    """A copy of `image` with e2fsck's replay of its journal (only for journals whose
    replay ends: e2fsck 1.47.0 loops on the two endless-log attacks)."""
    out.write_bytes(image.read_bytes())
    subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(out)], capture_output=True,
                   timeout=60, check=False)
    return out
