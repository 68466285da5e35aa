"""The read-write facade's filesystem-wide state: orphans, ENOSPC, link limits, mounting.

Oracles: e2fsck -fn, dumpe2fs, debugfs and kernel mounts of the images we wrote.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_writable_ops import VARIANTS, expect

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Ext4Error, NoSpace, ReadOnly, Unsupported
from ext4box.ext4.format.inode import ROOT_INO
from ext4box.ext4.opening import open_filesystem
from support.facade import Ours, assert_clean, make_image, need_kernel, pattern, write_file
from support.kernel import kernel_mount

pytestmark = pytest.mark.kernel


def dumpe2fs_header(image: Path) -> dict[str, str]:
    text = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True,
                          check=True).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in
                                                 text.splitlines()) if v}


def debugfs_w(image: Path, request: str) -> None:
    subprocess.run(["debugfs", "-w", "-R", request, str(image)], capture_output=True,
                   check=True)


# ---- orphans -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["ext4-1k-csum", "ext2-1k"])
def test_unlinked_open_file_lives_until_release(tmp_path: Path, variant: str) -> None:
    need_kernel()
    image = make_image(tmp_path / "o.img", VARIANTS[variant])
    ours = Ours(image)
    fs = ours.fs
    ours.create("open")
    ours.write("open", 0, pattern(1, 20_000))
    ino = ours.resolve("open")
    free_before = fs.statfs().blocks_free
    fs.unlink(ROOT_INO, b"open", still_open=True)
    # Still readable and writable through its inode number, on the orphan list.
    assert fs.inode(ino).links_count == 0
    write_file(fs, ours.dev, ino, 20_000, b"more")
    assert fs.read_bytes(fs.inode(ino), 0, 20_004) == pattern(1, 20_000) + b"more"
    assert int(fs.writer.superblock().fields["last_orphan"]) == ino
    fs.release_orphan(ino)
    assert int(fs.writer.superblock().fields["last_orphan"]) == 0
    fs.commit()
    assert fs.statfs().blocks_free > free_before
    ours.close()
    assert_clean(image)


@pytest.mark.parametrize("variant", ["ext4-1k-csum", "ext2-1k"])
def test_statfs_counts_frees_at_once_as_the_kernel(tmp_path: Path, variant: str) -> None:
    """The kernel's statfs shows an unlinked file's blocks and inode free before its
    transaction commits (only their reuse waits); ours must too."""
    need_kernel()
    image = make_image(tmp_path / "k.img", VARIANTS[variant])
    kernel_image = tmp_path / "kernel.img"
    shutil.copyfile(image, kernel_image)
    data = pattern(2, 300_000)

    mnt = tmp_path / "m"
    mnt.mkdir()
    with kernel_mount(kernel_image, mnt, readonly=False) as root:
        fd = os.open(root / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        before = os.statvfs(root)
        os.unlink(root / "f")
        after = os.statvfs(root)
    kernel_delta = (after.f_bfree - before.f_bfree, after.f_ffree - before.f_ffree)

    ours = Ours(image)
    ours.create("f")
    ours.write("f", 0, data)
    ours.fs.commit(durable=True)
    mine_before = ours.fs.statfs()
    ours.unlink("f")
    mine_after = ours.fs.statfs()
    ours.fs.commit(durable=True)
    committed = ours.fs.statfs()
    ours.close()
    ours_delta = (mine_after.blocks_free - mine_before.blocks_free,
                  mine_after.files_free - mine_before.files_free)
    assert kernel_delta[0] > 0
    assert ours_delta == kernel_delta
    assert (committed.blocks_free, committed.files_free) == (mine_after.blocks_free,
                                                             mine_after.files_free)
    assert_clean(image)


def test_orphan_list_left_by_a_crash(tmp_path: Path) -> None:
    """Unlink while open, commit, no close (a crash): the image carries the orphan list.

    The image has a journal, so the crash leaves needs_recovery set and the state
    clean; e2fsck -p replays the journal and clears the orphans, and so does the
    next read-write open (ours, or the kernel's)."""
    need_kernel()
    image = make_image(tmp_path / "c.img", VARIANTS["ext4-1k-csum"])
    ours = Ours(image)
    for name in ("one", "two", "kept"):
        ours.create(name)
        ours.write(name, 0, pattern(len(name), 5000))
    inos = [ours.resolve(n) for n in ("one", "two")]
    for name in (b"one", b"two"):
        ours.fs.unlink(ROOT_INO, name, still_open=True)
    ours.fs.commit(durable=True)
    ours.dev.close()  # the process dies here: no release, no close

    header = dumpe2fs_header(image)
    assert header["First orphan inode"] == str(inos[1])
    assert header["Filesystem state"] == "clean"
    assert "needs_recovery" in header["Filesystem features"].split()

    preened = tmp_path / "preened.img"
    shutil.copyfile(image, preened)
    result = subprocess.run(["e2fsck", "-fp", str(preened)], capture_output=True, text=True,
                            check=False)
    # The replay is a normal recovery (exit 0); clearing the orphans is part of it.
    assert result.returncode in (0, 1), result.stdout
    assert "recovering journal" in result.stdout
    assert "Clearing orphaned inode" in result.stdout
    assert_clean(preened)

    by_kernel = tmp_path / "kernel.img"
    shutil.copyfile(image, by_kernel)
    mnt = tmp_path / "m"
    mnt.mkdir()
    with kernel_mount(by_kernel, mnt, readonly=False):
        pass
    assert_clean(by_kernel)

    again = Ours(image)  # our rw open processes the list
    assert again.read("kept") == pattern(4, 5000)
    again.close()
    assert "First orphan inode" not in dumpe2fs_header(image)
    assert_clean(image)


@pytest.mark.parametrize("bad_next", ["timestamp", "loop", "free-inode"])
def test_orphan_list_that_stops_making_sense_is_dropped(tmp_path: Path, bad_next: str) -> None:
    """Without a journal a crash can leave the list's last inode with a deletion
    time where the next orphan's number belongs. As the kernel does, the cleanup
    processes what it can, drops the rest of the list, and the mount goes on."""
    need_kernel()
    image = make_image(tmp_path / "n.img", VARIANTS["ext2-1k"])
    ours = Ours(image)
    for name in ("a", "b", "kept", "spare"):
        ours.create(name)
        ours.write(name, 0, pattern(len(name), 3000))
    a, b, spare = (ours.resolve(n) for n in ("a", "b", "spare"))
    for name in (b"a", b"b"):
        ours.fs.unlink(ROOT_INO, name, still_open=True)  # list: b -> a
    ours.fs.commit(durable=True)
    ours.dev.close()  # a crash
    if bad_next == "timestamp":
        debugfs_w(image, f"sif <{a}> dtime 1796189659")
    elif bad_next == "loop":
        debugfs_w(image, f"sif <{a}> dtime {b}")
    else:
        debugfs_w(image, f"freei <{spare}>")
        debugfs_w(image, f"sif <{a}> dtime {spare}")
    kernel_copy = tmp_path / "kernel.img"
    shutil.copyfile(image, kernel_copy)

    again = Ours(image)
    assert again.read("kept") == pattern(4, 3000)
    again.close()
    assert "First orphan inode" not in dumpe2fs_header(image)
    if bad_next != "free-inode":
        assert_clean(image)  # both listed inodes were freed before the list went bad
    mnt = tmp_path / "m"
    mnt.mkdir()
    with kernel_mount(kernel_copy, mnt, readonly=False):
        pass
    assert "First orphan inode" not in dumpe2fs_header(kernel_copy)


def test_orphan_in_a_group_whose_bitmap_fails_its_checksum(tmp_path: Path) -> None:
    """Without a journal a crash can leave a block bitmap written and its group
    descriptor (holding the bitmap's checksum) not yet. Freeing the listed
    inode's blocks there would fail half-way, so, as the kernel, the rw mount
    drops the list and goes on; nothing is lost and e2fsck repairs the rest."""
    image = make_image(tmp_path / "b.img", [*VARIANTS["ext4-1k-csum"], "-O", "^has_journal"])
    ours = Ours(image)
    for name in ("gone", "kept"):
        ours.create(name)
        ours.write(name, 0, pattern(len(name), 6000))
    orphan = ours.resolve("gone")
    ours.fs.unlink(ROOT_INO, b"gone", still_open=True)
    ours.fs.commit(durable=True)
    ours.dev.close()  # a crash
    listing = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True,
                             check=True).stdout
    bitmap_block = int(re.search(r"Block bitmap at (\d+)", listing)[1])
    with image.open("r+b") as f:  # the last block of group 0, free, now marked used
        f.seek(bitmap_block * 1024 + 1023)
        last = f.read(1)[0]
        f.seek(bitmap_block * 1024 + 1023)
        f.write(bytes([last | 0x80]))
    assert "does not match checksum" in subprocess.run(
        ["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False).stdout

    again = Ours(image)  # the rw open succeeds
    assert again.read("kept") == pattern(4, 6000)
    again.close()
    assert "First orphan inode" not in dumpe2fs_header(image)
    fixed = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True,
                           check=False)
    assert fixed.returncode == 1, fixed.stdout  # repaired
    assert f"Deleted inode {orphan} has zero dtime" in fixed.stdout
    assert_clean(image)
    kept = subprocess.run(["debugfs", "-R", "cat /kept", str(image)], capture_output=True,
                          check=True).stdout
    assert kept == pattern(4, 6000)


def _flip_last_bitmap_bits(image: Path, block_size: int) -> None:
    """Mark the last (free) block and inode of group 0 in use in their bitmaps,
    without updating the descriptor's checksums: what a crash between leaves."""
    listing = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True,
                             check=True).stdout
    inodes_per_group = int(re.search(r"Inodes per group:\s+(\d+)", listing)[1])
    for label, last_byte in (("Block", block_size - 1), ("Inode", inodes_per_group // 8 - 1)):
        block = int(re.search(rf"{label} bitmap at (\d+)", listing)[1])
        with image.open("r+b") as f:
            f.seek(block * block_size + last_byte)
            value = f.read(1)[0]
            assert not value & 0x80, f"the last {label.lower()} of group 0 is in use"
            f.seek(block * block_size + last_byte)
            f.write(bytes([value | 0x80]))


def _problems(image: Path) -> list[str]:
    out = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                         check=False).stdout
    # A count e2fsck finds wrong is kept as how far off it is (totals move with use).
    return [re.sub(r"\((\d+), counted=(\d+)\)", lambda m: f"(off by {int(m[2]) - int(m[1])})",
                   line)
            for line in out.splitlines()
            if line.strip() and not line.startswith(("Pass ", "e2fsck ", str(image)))]


def test_allocation_skips_a_group_whose_bitmaps_fail_their_checksums(tmp_path: Path) -> None:
    """As the kernel marks such a group corrupt and allocates elsewhere: new files
    get their inode and blocks from the other groups, and the image has exactly
    the problems it had before (e2fsck's to repair), no new ones."""
    image = make_image(tmp_path / "g.img", [*VARIANTS["ext4-1k-csum"], "-O", "^has_journal"])
    _flip_last_bitmap_bits(image, 1024)
    before = _problems(image)
    assert any("block bitmap does not match checksum" in line for line in before), before
    assert any("inode bitmap does not match checksum" in line for line in before), before

    ours = Ours(image)
    ipg = ours.fs.sb.inodes_per_group
    ours.mkdir("d")
    for path in ("new", "d/inner"):
        ours.create(path)
        ours.write(path, 0, pattern(len(path), 50_000))
    assert min(ours.resolve(p) for p in ("d", "new", "d/inner")) > ipg
    ours.close()

    assert _problems(image) == before
    for path in ("new", "d/inner"):
        data = subprocess.run(["debugfs", "-c", "-R", f"cat /{path}", str(image)],
                              capture_output=True, check=True).stdout
        assert data == pattern(len(path), 50_000)
        blocks = subprocess.run(["debugfs", "-c", "-R", f"blocks /{path}", str(image)],
                                capture_output=True, text=True, check=True).stdout.split()
        assert blocks and min(int(b) for b in blocks) > 8192  # none in group 0


# ---- ENOSPC ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["ext4-1k-csum", "ext2-1k"])
def test_fill_the_filesystem(tmp_path: Path, variant: str) -> None:
    need_kernel()
    image = make_image(tmp_path / "full.img", VARIANTS[variant], size_mb=4)
    ours = Ours(image)
    fs = ours.fs
    written: dict[str, bytes] = {}
    errors = 0
    for i in range(2000):
        name = f"f{i:04d}"
        body = pattern(i, 7000 + 300 * (i % 7))
        try:
            ours.create(name)
            ours.write(name, 0, body)
            written[name] = body
        except NoSpace:
            errors += 1
            if errors > 20:
                break
        # Anything else (Corrupt, ValueError...) fails the test here.
    assert errors > 20 and len(written) > 50
    for name in list(written)[::13]:
        assert ours.read(name) == written[name]
    # Use up what is left one block at a time: the first failure is ENOSPC and so is
    # every later attempt.
    offset = 1 << 20
    for _ in range(500):
        try:
            ours.write("f0000", offset, b"x")
        except NoSpace:
            break
        offset += 2 * fs.block_size  # holes between: every write is a new extent
    else:
        raise AssertionError("the filesystem never filled")
    # A file with a shallower extent tree keeps fewer spare blocks back for a new
    # extent, so it may still take a block or two: fill it the same way first.
    offset2 = 1 << 22
    for _ in range(10):
        try:
            ours.write("f0002", offset2, b"y")
        except NoSpace:
            break
        offset2 += 2 * fs.block_size
    else:
        raise AssertionError("f0002 never hit ENOSPC")
    for _ in range(3):
        expect(errno.ENOSPC, lambda: ours.write("f0000", offset, b"x"))
        expect(errno.ENOSPC, lambda: ours.write("f0002", offset2, b"y"))
    written["f0000"] = ours.read("f0000")
    written["f0002"] = ours.read("f0002")
    # xattr blocks take the last blocks; then setxattr fails with ENOSPC too.
    xattr_errors = 0
    for name in list(written)[1:40]:
        try:
            fs.setxattr(ours.resolve(name), b"user.x", bytes(900))
        except NoSpace:
            xattr_errors += 1
    assert xattr_errors
    for name in list(written)[: len(written) // 2]:
        ours.unlink(name)
        del written[name]
    ours.create("after")
    ours.write("after", 0, pattern(99, 200_000))  # needs the freed space
    written["after"] = pattern(99, 200_000)
    ours.close()
    assert_clean(image)
    mnt = tmp_path / "m"
    mnt.mkdir()
    with kernel_mount(image, mnt) as root:
        for name, body in list(written.items())[::5]:
            assert (root / name).read_bytes() == body


# ---- link limits ------------------------------------------------------------------------


def test_link_limits(tmp_path: Path) -> None:
    """65000 links for a file; subdirectories of a non-indexed directory; dir_nlink lets an
    indexed directory go on with links_count 1. Counts are forced with debugfs (making
    65000 real names would take minutes) and put back before e2fsck."""
    need_kernel()
    image = make_image(tmp_path / "l.img", VARIANTS["ext4-1k-csum"])
    ours = Ours(image)
    ours.create("file")
    ours.mkdir("plain")
    ours.mkdir("indexed")
    for i in range(200):  # past one block: the directory becomes an htree
        ours.create(f"indexed/name-{i:04d}")
    inos = {n: ours.resolve(n) for n in ("file", "plain", "indexed")}
    ours.close()
    for name in inos:
        debugfs_w(image, f"sif {name} links_count 65000")
    ours = Ours(image)
    fs = ours.fs
    expect(errno.EMLINK, lambda: fs.link(inos["file"], ROOT_INO, b"one-more"))
    expect(errno.EMLINK, lambda: fs.mkdir(inos["plain"], b"sub", 0o755, 0, 0))
    fs.mkdir(inos["indexed"], b"sub", 0o755, 0, 0)
    assert fs.inode(inos["indexed"]).links_count == 1  # dir_nlink: no longer counted
    ours.close()
    debugfs_w(image, "sif file links_count 1")
    debugfs_w(image, "sif plain links_count 2")
    debugfs_w(image, "sif indexed links_count 3")
    assert_clean(image)


# ---- mounting ------------------------------------------------------------------------------


def test_mount_records_state(tmp_path: Path) -> None:
    image = make_image(tmp_path / "s.img", VARIANTS["ext4-4k-nocsum-32bit"])
    before = dumpe2fs_header(image)
    dev = BlockDevice.open(str(image), writable=True)
    fs = open_filesystem(dev, readonly=False)
    during = dumpe2fs_header(image)
    # With a journal, as the kernel: the state stays clean, needs_recovery is set.
    assert during["Filesystem state"] == "clean"
    assert "needs_recovery" in during["Filesystem features"].split()
    assert int(during["Mount count"]) == int(before["Mount count"]) + 1
    stat = fs.statfs()
    fs.close()
    dev.close()
    after = dumpe2fs_header(image)
    assert after["Filesystem state"] == "clean"
    assert int(after["Free blocks"]) == stat.blocks_free
    assert_clean(image)


def _refused(image: Path, expected: type[Exception], words: str, *, ro_ok: bool = True) -> None:
    dev = BlockDevice.open(str(image), writable=True)
    try:
        with pytest.raises(expected) as info:
            open_filesystem(dev, readonly=False)
        assert re.search(words, str(info.value)), str(info.value)
        if ro_ok:
            open_filesystem(dev, readonly=True).close()  # read-only stays possible
    finally:
        dev.close()


@pytest.mark.parametrize(
    ("setup", "expected", "words"),
    [
        ("ssv state 3", ReadOnly, "errors flag"),
        ("ssv feature_ro_compat 0x80000001", ReadOnly, "unknown_0x80000000"),
    ],
)
def test_refuses_read_write(tmp_path: Path, setup: str, expected: type[Exception],
                            words: str) -> None:
    image = make_image(tmp_path / "r.img", VARIANTS["ext4-1k-csum"])
    debugfs_w(image, setup)
    _refused(image, expected, words)


def test_refuses_mmp_and_bigalloc(tmp_path: Path) -> None:
    mmp = make_image(tmp_path / "mmp.img", ["-t", "ext4", "-b", "4096", "-O", "mmp"])
    _refused(mmp, ReadOnly, "multi-mount protection")
    big = make_image(tmp_path / "big.img", ["-t", "ext4", "-b", "1024", "-O", "bigalloc",
                                             "-C", "4096"])
    # (The read side itself rejects this bigalloc image's descriptors: reported.)
    _refused(big, Unsupported, "bigalloc", ro_ok=False)


def test_readonly_device_is_erofs(tmp_path: Path) -> None:
    image = make_image(tmp_path / "ro.img", VARIANTS["ext4-1k-csum"])
    dev = BlockDevice.open(str(image), writable=False)
    try:
        expect(errno.EROFS, lambda: open_filesystem(dev, readonly=False))
    finally:
        dev.close()
    assert os.path.getsize(image) == 24 << 20


def test_block_map_limit_is_efbig_as_the_kernel(tmp_path: Path) -> None:
    """Past what an ext2 block map addresses (about 16 GiB with 1 KiB blocks), the
    kernel answers EFBIG, not ENOSPC, for a write and for a truncate."""
    need_kernel()
    image = make_image(tmp_path / "b.img", VARIANTS["ext2-1k"])
    kernel_image = tmp_path / "kernel.img"
    shutil.copyfile(image, kernel_image)
    far = 20 << 30

    def errno_of(call) -> int:
        try:
            call()
        except OSError as err:
            return err.errno
        except Ext4Error as err:
            return err.errno
        return 0

    mnt = tmp_path / "m"
    mnt.mkdir()
    with kernel_mount(kernel_image, mnt, readonly=False) as root:
        fd = os.open(root / "f", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            kernel = (errno_of(lambda: os.pwrite(fd, b"x", far)),
                      errno_of(lambda: os.ftruncate(fd, far)))
        finally:
            os.close(fd)
    ours = Ours(image)
    ours.create("f")
    ino = ours.resolve("f")
    mine = (errno_of(lambda: write_file(ours.fs, ours.dev, ino, far, b"x")),
            errno_of(lambda: ours.fs.setattr(ino, size=far)))
    ours.close()
    assert kernel == (errno.EFBIG, errno.EFBIG)
    assert mine == kernel
    assert_clean(image)


@pytest.mark.parametrize("variant", ["ext4-1k-csum", "ext3-4k"])
def test_aborted_write_leaves_no_blocks_behind(tmp_path: Path, variant: str) -> None:
    """The data of a write could not reach the device (say the host disk is full):
    the blocks write_begin allocated are unmapped and freed again, so no block
    with an earlier owner's contents becomes part of the file."""
    image = make_image(tmp_path / "a.img", VARIANTS[variant])
    ours = Ours(image)
    fs = ours.fs
    ours.create("f")
    ours.write("f", 0, pattern(4, 3 * fs.block_size))
    ino = ours.resolve("f")
    fs.commit(durable=True)
    free_before = fs.statfs().blocks_free
    runs = fs.write_begin(ino, 10, 40)  # a hole far past the data: all new
    assert all(run.new for run in runs) and sum(run.length for run in runs) == 40
    fs.write_abort(ino, [(run.lblk, run.length) for run in runs if run.new])
    assert fs.statfs().blocks_free == free_before
    assert fs.read_bytes(fs.inode(ino), 0, 3 * fs.block_size) == pattern(4, 3 * fs.block_size)
    assert all(run.pblk is None for run in fs.map_blocks(fs.inode(ino), 10, 40))
    ours.close()
    assert_clean(image)
