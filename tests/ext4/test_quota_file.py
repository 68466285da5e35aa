"""The quota file format (quota_file.py) against files e2fsprogs wrote, and the usage
a read-write session counts (quota.py) against e2fsck's own count.

Images come from mkfs.ext4 -O quota; e2fsck -fy (which rewrites the quota
files from a full scan) makes the reference files, `debugfs lq` reads them
independently of our parser, and `e2fsck -fn` recounts every id after we wrote.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Corrupt, Ext4Error
from ext4box.ext4.format.inode import ROOT_INO, replace_inode
from ext4box.ext4.format.quota_file import (
    ENTRIES_PER_BLOCK,
    QUOTA_BLOCK_SIZE,
    USRQUOTA,
    QuotaFile,
    encode_entry,
    parse_entry,
)
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.write.caller import Caller, acting_as
from ext4box.ext4.write.quota import QuotaExceeded
from ext4box.ext4.write.writable import WritableFilesystem
from support.facade import Ours, assert_clean, pattern, write_file

_FL_PROJINHERIT = 0x20000000
# Spread over every byte of the id, so every tree level branches (and a data block fills).
SPREAD_UIDS = sorted({1, 2, 255, 256, 1000, 1001, 65535, 65536, 70000, (1 << 24) + 7,
                      (1 << 31) + 3, (1 << 32) - 2, *range(5000, 5000 + 2 * ENTRIES_PER_BLOCK)})


def _mkfs(path: Path, *args: str, root: Path | None = None) -> Path:
    with path.open("wb") as image:
        image.truncate(48 << 20)
    argv = ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", *args]
    if root is not None:
        argv += ["-d", str(root)]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)
    # mkfs -d counts usage before it copies the tree: e2fsck brings the files up to date.
    subprocess.run(["e2fsck", "-fy", str(path)], capture_output=True, check=False)
    assert_clean(path)
    return path


def _lq(image: Path, qtype: str = "user") -> dict[int, tuple[int, int]]:
    """id -> (space in bytes, inodes) as debugfs reads the quota file."""
    text = subprocess.run(["debugfs", "-R", f"lq {qtype}", str(image)], check=True,
                          capture_output=True, text=True).stdout
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].isdigit():
            out[int(fields[0])] = (int(fields[1]), int(fields[4]))
    return out


def _dump_quota_file(image: Path, ino: int, out: Path) -> bytes:
    subprocess.run(["debugfs", "-R", f"dump <{ino}> {out}", str(image)], check=True,
                   capture_output=True)
    return out.read_bytes()


def _tree(tmp_path: Path, uids: list[int]) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    for index, uid in enumerate(uids):
        path = root / f"f{index}"
        path.write_bytes(pattern(index, 3000 * (index % 5)))
        os.chown(path, uid, 100 + index % 3)
    return root


def test_reads_what_e2fsprogs_wrote(tmp_path: Path) -> None:
    image = _mkfs(tmp_path / "q.img", "-O", "quota", root=_tree(tmp_path, SPREAD_UIDS))
    data = _dump_quota_file(image, 3, tmp_path / "q3")
    quota_file = QuotaFile(
        USRQUOTA, lambda n: data[n * QUOTA_BLOCK_SIZE : (n + 1) * QUOTA_BLOCK_SIZE],
        lambda n, raw: pytest.fail("read-only"), where="user quota",
        capacity=len(data) // QUOTA_BLOCK_SIZE)
    entries = {d.qid: (d.curspace, d.curinodes) for d in quota_file.entries()}
    assert entries == _lq(image)
    assert len(entries) == len(SPREAD_UIDS) + 1  # and root
    for qid in entries:
        pos = quota_file.find(qid)
        assert pos is not None
        assert (quota_file.read(pos).curspace, quota_file.read(pos).curinodes) == entries[qid]
        raw = data[pos.block * QUOTA_BLOCK_SIZE + pos.offset:][:72]
        assert encode_entry(parse_entry(raw)) == raw
    assert quota_file.find(424242) is None


def test_quota_image_opens_read_write(tmp_path: Path) -> None:
    """Was refused (EROFS) before quota files were kept up to date."""
    image = _mkfs(tmp_path / "q.img", "-O", "quota,project", "-E",
                  "root_owner=0:0,quotatype=usrquota:grpquota:prjquota")
    dev = BlockDevice.open(str(image), writable=True)
    try:
        fs = open_filesystem(dev, readonly=False)
        assert isinstance(fs, WritableFilesystem)
        assert fs.quota is not None and sorted(fs.quota.files) == [0, 1, 2]
        fs.close()
    finally:
        dev.close()
    assert_clean(image)


@pytest.mark.parametrize("block_size", ["1024", "4096"])
def test_new_ids_get_entries(tmp_path: Path, block_size: str) -> None:
    """Ids the file has never seen get tree and data blocks, the quota file grows
    (past its first filesystem block), and e2fsck agrees with every count."""
    image = _mkfs(tmp_path / "q.img", "-b", block_size, "-O", "quota")
    facade = Ours(image)
    try:
        fs = facade.fs
        for index, uid in enumerate(SPREAD_UIDS):
            inode = fs.create(ROOT_INO, f"f{index}".encode(), stat.S_IFREG | 0o644, uid,
                              uid % 7)
            facade.write(f"/f{index}", 0, pattern(index, 5000 * (index % 3)))
            if index % 4 == 0:
                fs.setattr(inode.ino, uid=uid + 1)  # chown: usage moves to another id
            if index % 9 == 0:
                fs.unlink(ROOT_INO, f"f{index}".encode(), still_open=False)
    finally:
        facade.close()
    assert_clean(image)
    counted = _lq(image)
    assert all(uid in counted or uid + 1 in counted for uid in SPREAD_UIDS)
    quota_inode = subprocess.run(["debugfs", "-R", "stat <3>", str(image)], check=True,
                                 capture_output=True, text=True).stdout
    assert "Size: 6144" not in quota_inode  # grew beyond what mkfs made


def test_damaged_quota_file_stops_counting_not_writing(tmp_path: Path) -> None:
    """A tree reference outside the file: the quota type is no longer counted (logged),
    the operations go on, and e2fsck -fy rebuilds the file."""
    image = _mkfs(tmp_path / "q.img", "-O", "quota")
    blocks = subprocess.run(["debugfs", "-R", "blocks <3>", str(image)], check=True,
                            capture_output=True, text=True).stdout.split()
    block_size = int(subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True,
                                    text=True, check=True).stdout.split("Block size:")[1]
                     .split()[0])
    # Quota block 1 (the tree root) lives in the file's first filesystem block(s).
    root_at = int(blocks[QUOTA_BLOCK_SIZE // block_size]) * block_size + (
        QUOTA_BLOCK_SIZE % block_size)
    with image.open("r+b") as handle:
        handle.seek(root_at + 4 * 0x77)  # the root's slot for ids 0x77xxxxxx
        handle.write((999_999).to_bytes(4, "little"))
    facade = Ours(image)
    try:
        with pytest.raises(Corrupt):
            facade.fs.quota.files[USRQUOTA].find(0x77000001)  # type: ignore[union-attr]
        facade.fs.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, 0x77000001, 0)
        facade.write("/f", 0, b"x" * 9000)
        assert USRQUOTA not in facade.fs.quota.files  # type: ignore[union-attr]
    finally:
        facade.close()
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, check=False)
    assert_clean(image)
    assert _lq(image)[0x77000001][1] == 1


def test_quota_inode_that_is_not_a_file_refuses_rw(tmp_path: Path) -> None:
    """A superblock naming the root directory as the user quota inode: nothing is
    written into the directory; the read-only mount still works."""
    image = _mkfs(tmp_path / "q.img", "-O", "quota")
    subprocess.run(["debugfs", "-w", "-R", "ssv usr_quota_inum 2", str(image)], check=True,
                   capture_output=True)
    before = image.read_bytes()
    dev = BlockDevice.open(str(image), writable=True)
    try:
        with pytest.raises(Corrupt, match="not a regular file"):
            open_filesystem(dev, readonly=False)
        assert open_filesystem(dev, readonly=True).lookup(ROOT_INO, b"lost+found")
    finally:
        dev.close()
    assert image.read_bytes() == before


@pytest.mark.parametrize(("block_size", "features"), [
    ("1024", "quota,project"), ("4096", "quota,project"), ("4096", "quota,project,ea_inode")])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_keep_usage_exact(tmp_path: Path, block_size: str, features: str,
                                            seed: int) -> None:
    """Random operations of several owners in-process, unlinked-open files, the orphan
    list and (ea_inode) values in EA inodes included; e2fsck -fn recounts every user,
    group and project after."""
    image = _mkfs(tmp_path / "q.img", "-b", block_size, "-O", features, "-E",
                  "root_owner=0:0,quotatype=usrquota:grpquota:prjquota")
    big_values = "ea_inode" in features
    rng = random.Random(seed)
    facade = Ours(image)
    fs = facade.fs
    try:
        proj = fs.mkdir(ROOT_INO, b"proj", 0o777, 0, 0)
        # Project 7 on /proj, inherited by what is made inside (chattr +P -p 7).
        fs.store(replace_inode(proj, projid=7, flags=proj.flags | _FL_PROJINHERIT))
        dirs = [ROOT_INO, proj.ino]
        files: list[tuple[int, bytes]] = []
        orphans: list[int] = []
        for step in range(400):
            owner = 1000 + rng.randrange(4)
            parent = rng.choice(dirs)
            name = f"n{step}".encode()
            op = rng.randrange(10)
            if op <= 2 or not files:
                ino = fs.create(parent, name, stat.S_IFREG | 0o644, owner, owner + 1000).ino
                files.append((parent, name))
                write_file(fs, facade.dev, ino, rng.randrange(20_000),
                           pattern(step, rng.randrange(1, 30_000)))
            elif op == 3:
                dirs.append(fs.mkdir(parent, name, 0o755, owner, owner).ino)
            elif op == 4:
                at, nm = rng.choice(files)
                fs.setattr(fs.lookup(at, nm), size=rng.randrange(40_000))
            elif op == 5:
                at, nm = rng.choice(files)
                fs.setattr(fs.lookup(at, nm), uid=owner, gid=rng.randrange(3000, 3003))
            elif op == 6:
                at, nm = files.pop(rng.randrange(len(files)))
                still_open = rng.random() < 0.5
                ino = fs.lookup(at, nm)
                fs.unlink(at, nm, still_open=still_open)
                if still_open:
                    orphans.append(ino)
                    write_file(fs, facade.dev, ino, 0, pattern(step, 9000))
            elif op == 7 and orphans:
                fs.release_orphan(orphans.pop(rng.randrange(len(orphans))))
            elif op == 8:
                at, nm = rng.choice(files)
                size = rng.randrange(5000, 9000) if big_values and rng.random() < 0.5 else (
                    rng.randrange(50, 700))
                try:
                    fs.setxattr(fs.lookup(at, nm), rng.choice((b"user.v", b"user.w")),
                                pattern(step % 3, size))  # equal values: shared EA inodes
                except Ext4Error as err:  # both values do not fit a 1 KiB xattr block
                    assert err.errno == errno.ENOSPC
            else:
                fs.symlink(parent, name, b"t" * rng.randrange(1, 300), owner, owner)
            if step % 97 == 0:
                fs.commit()
    finally:
        facade.close()  # frees the orphans still open
    assert_clean(image)
    assert _lq(image, "project").get(7, (0, 0))[1] > 0


def test_ea_inode_references_count_to_their_owners(tmp_path: Path) -> None:
    """Values in EA inodes: their space is in the owner's i_blocks, and each
    reference counts one inode to the owner (shared values count for each owner)."""
    image = _mkfs(tmp_path / "q.img", "-b", "4096", "-O", "quota,ea_inode")
    facade = Ours(image)
    fs = facade.fs
    try:
        owners = [fs.create(ROOT_INO, f"f{i}".encode(), stat.S_IFREG | 0o644, 1000 + i % 3,
                            2000 + i % 2).ino for i in range(6)]
        for index, ino in enumerate(owners):
            fs.setxattr(ino, b"user.shared", b"s" * 9000)  # one EA inode, six references
            fs.setxattr(ino, b"user.own", pattern(index, 7000 + index))
        fs.setxattr(owners[0], b"user.shared", b"t" * 9000)  # replaced: a new value
        fs.removexattr(owners[1], b"user.own")
        fs.unlink(ROOT_INO, b"f2", still_open=False)
        fs.unlink(ROOT_INO, b"f3", still_open=True)
        fs.setattr(owners[4], uid=1500, gid=2500)  # chown: EA space and counts move too
        fs.release_orphan(owners[3])
    finally:
        facade.close()
    assert_clean(image)
    assert _lq(image)[1000][1] > 1


def test_values_in_ea_inodes_answer_edquot(tmp_path: Path) -> None:
    """A value moved to an EA inode is charged an inode and its blocks first: past a
    limit it is refused (EDQUOT) and nothing is left of it."""
    image = _mkfs(tmp_path / "q.img", "-b", "4096", "-O", "quota,ea_inode")
    facade = Ours(image)
    fs = facade.fs
    try:
        assert fs.quota is not None
        with fs.lock:
            fs.quota.set_limits(USRQUOTA, 1000, inode_hard=2)
            fs.quota.set_limits(USRQUOTA, 1001, block_hard=12)  # KiB: three 4 KiB blocks
        fs.quota.enforce(frozenset({USRQUOTA}))  # -o usrquota
        a = fs.create(ROOT_INO, b"a", stat.S_IFREG | 0o644, 1000, 1000).ino
        b = fs.create(ROOT_INO, b"b", stat.S_IFREG | 0o644, 1001, 1001).ino
        with acting_as(Caller(1000, 1000)):  # not root, whom limits never stop
            fs.setxattr(a, b"user.one", b"1" * 9000)  # a and one EA inode: 2 inodes
            with pytest.raises(QuotaExceeded):
                fs.setxattr(a, b"user.two", b"2" * 9000)
        with acting_as(Caller(1001, 1001)):
            with pytest.raises(QuotaExceeded):
                fs.setxattr(b, b"user.big", b"3" * 13000)  # four blocks
            fs.setxattr(b, b"user.fits", b"4" * 9000)  # three blocks
        assert fs.listxattr(a) == [b"user.one"] and fs.listxattr(b) == [b"user.fits"]
    finally:
        facade.close()
    assert_clean(image)
    assert _lq(image)[1000] == (12288, 2) and _lq(image)[1001] == (12288, 2)


def test_name_of_a_quota_inode_is_refused(tmp_path: Path) -> None:
    """A directory entry naming a quota inode (damage; the kernel's iget refuses it):
    the name answers EUCLEAN instead of exposing the quota file to file writes or
    eviction; the rest is served and counted."""
    image = _mkfs(tmp_path / "q.img", "-O", "quota")
    subprocess.run(["debugfs", "-w", "-R", "ln <3> q", str(image)], check=True,
                   capture_output=True)
    facade = Ours(image)
    try:
        fs = facade.fs
        with pytest.raises(Corrupt, match="quota inode"):
            fs.inode(fs.lookup(ROOT_INO, b"q"))
        with pytest.raises(Corrupt):
            fs.unlink(ROOT_INO, b"q", still_open=False)
        with pytest.raises(Corrupt):
            fs.write_begin(fs.lookup(ROOT_INO, b"q"), 0, 1)
        fs.create(ROOT_INO, b"f", stat.S_IFREG | 0o644, 4242, 4242)
    finally:
        facade.close()
    assert _lq(image)[4242] == (0, 1)
