"""Xattr values in EA inodes (mkfs.ext4 -O ea_inode) written through `ext4box serve -o rw`.

Each EA inode counts the entries naming it (equal values share one EA inode),
and its owner's i_blocks is charged for each value. These tests check that
the counts stay exact on set, replace, remove, unlink, rename over a file
and orphan cleanup, by e2fsck -fn (which recounts every reference and every
charge) after each scenario, and by the kernel: the same scenario on a kernel
mount must give the same outcomes and the same tree (xattrs and st_blocks
included).

The first tests start from values the kernel wrote (its sharing, its counts)
and let ext4box delete and change them; they failed before EA-inode writes
existed (a deleted owner's references were never dropped: "Extended attribute
inode N ref count is 2, should be 1", then "Unattached inode N").
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

import pytest
from rw_support import (
    assert_fsck_clean,
    assert_same_on_both,
    attempt,
    fsck,
    make_image,
    rw_mount,
    skip_unless_possible,
)

from support.images import debugfs
from support.kernel import kernel_mount

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

SHARED = random.Random(17).randbytes(10_000)  # over a 1 KiB block: an EA inode
OTHER = random.Random(18).randbytes(3_000)


def _ea_image(tmp_path: Path, *mkfs_args: str) -> Path:
    return make_image(tmp_path / "base.img", 32, "-O", "ea_inode", *mkfs_args)


def _kernel_sets(image: Path, mountpoint: Path, values: list[tuple[str, str, bytes]]) -> None:
    """Files and values written by the kernel (its EA inodes, its reference counts)."""
    with kernel_mount(image, mountpoint, readonly=False) as root:
        for rel, name, value in values:
            path = root / rel
            if not path.exists():
                path.write_bytes(b"owner of " + rel.encode())
            os.setxattr(path, name, value)


def _ea_inodes(image: Path) -> list[int]:
    """Inodes in use with EXT4_EA_INODE_FL set (the first 200 inodes: these images are small)."""
    stats = debugfs(image, "stats")
    first = int(re.search(r"First inode:\s+(\d+)", stats)[1])  # type: ignore[index]
    requests = "".join(f"stat <{ino}>\n" for ino in range(first, first + 200))
    out = subprocess.run(["debugfs", "-f", "-", str(image)], input=requests, text=True,
                         capture_output=True, check=True).stdout
    found = []
    for block in re.split(r"(?m)^(?=Inode: )", out):
        head = re.match(r"Inode: (\d+).*?Flags: (0x[0-9a-f]+)", block, re.S)
        links = re.search(r"Links: (\d+)", block)
        if head and links and int(links[1]) and int(head[2], 16) & 0x200000:
            found.append(int(head[1]))
    return found


def _ref_count(image: Path, ino: int) -> int:
    """An EA inode's reference count: i_ctime's 32 bits (high) and l_i_version (low)."""
    out = debugfs(image, f"stat <{ino}>")
    version = re.search(r"Version: 0x([0-9a-f]+):([0-9a-f]+)", out)
    ctime = re.search(r"ctime: (0x[0-9a-f]+)", out)
    assert version and ctime, out
    return (int(ctime[1], 16) << 32) | int(version[2], 16)


def test_unlinking_one_owner_of_a_shared_value_drops_one_reference(tmp_path: Path) -> None:
    skip_unless_possible()
    image = _ea_image(tmp_path)
    _kernel_sets(image, tmp_path / "kmnt", [("f1", "user.big", SHARED), ("f2", "user.big", SHARED)])
    (ea_ino,) = _ea_inodes(image)
    assert _ref_count(image, ea_ino) == 2
    with rw_mount(image, tmp_path / "mnt") as handle:
        os.unlink(handle.mountpoint / "f1")
    assert_fsck_clean(image)
    assert _ref_count(image, ea_ino) == 1
    with rw_mount(image, tmp_path / "mnt") as handle:
        assert os.getxattr(handle.mountpoint / "f2", "user.big") == SHARED
        os.unlink(handle.mountpoint / "f2")
    assert_fsck_clean(image)  # not "Unattached inode": the EA inode was freed with its blocks
    assert _ea_inodes(image) == []


def test_removing_a_shared_value_drops_one_reference(tmp_path: Path) -> None:
    skip_unless_possible()
    image = _ea_image(tmp_path)
    _kernel_sets(image, tmp_path / "kmnt", [("f1", "user.big", SHARED), ("f2", "user.big", SHARED),
                                            ("f2", "user.other", OTHER)])

    def scenario(root: Path) -> list[object]:
        return [
            attempt(os.removexattr, root / "f1", "user.big"),  # setfattr -x
            attempt(os.removexattr, root / "f1", "user.big"),
            attempt(os.getxattr, root / "f2", "user.big") == SHARED,
            attempt(os.removexattr, root / "f2", "user.other"),
            attempt(os.listxattr, root / "f2"),
        ]

    assert assert_same_on_both(tmp_path, image, scenario)[:2] == [None, "ENODATA"]


def test_an_unlinked_open_owner_releases_its_value_at_close(tmp_path: Path) -> None:
    skip_unless_possible()
    image = _ea_image(tmp_path)
    _kernel_sets(image, tmp_path / "kmnt", [("f1", "user.big", SHARED), ("f2", "user.big", SHARED),
                                            ("f3", "user.other", OTHER)])

    def scenario(root: Path) -> list[object]:
        fds = [os.open(root / name, os.O_RDONLY) for name in ("f1", "f3")]
        os.unlink(root / "f1")
        os.unlink(root / "f3")
        seen = [os.getxattr(f"/proc/self/fd/{fds[0]}", "user.big") == SHARED]
        for fd in fds:
            os.close(fd)
        return seen

    assert assert_same_on_both(tmp_path, image, scenario) == [True]


def test_orphans_holding_values_are_freed_at_mount(tmp_path: Path) -> None:
    """An unlinked-open owner left on the orphan list by a crash: the next rw mount frees it."""
    skip_unless_possible()
    image = _ea_image(tmp_path)
    _kernel_sets(image, tmp_path / "kmnt", [("f1", "user.big", SHARED), ("f2", "user.big", SHARED),
                                            ("f3", "user.other", OTHER)])
    f1 = int(debugfs(image, "stat f1").split()[1])
    f3 = int(debugfs(image, "stat f3").split()[1])
    # Both names gone, both inodes listed (f1 -> f3), as a crash leaves unlinked-open files.
    requests = (f"unlink f1\nunlink f3\nsif <{f1}> links_count 0\nsif <{f1}> dtime {f3}\n"
                f"sif <{f3}> links_count 0\nsif <{f3}> dtime 0\nssv last_orphan {f1}\n")
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=requests, text=True,
                   check=True, capture_output=True)
    assert fsck(image).returncode != 0  # the orphans are pending
    (shared,) = (ino for ino in _ea_inodes(image) if _ref_count(image, ino) == 2)

    def scenario(root: Path) -> list[object]:
        return [sorted(os.listdir(root)), os.getxattr(root / "f2", "user.big") == SHARED]

    assert assert_same_on_both(tmp_path, image, scenario)[1]
    ours = tmp_path / "ext4box.img"
    assert _ref_count(ours, shared) == 1
    assert len(_ea_inodes(ours)) == 1


def test_values_set_replaced_and_removed_share_exact_counts(tmp_path: Path) -> None:
    """ext4box writes the values: new EA inodes, shared ones, replaced and removed ones,
    values moving between the inode, the block and EA inodes; renames over owners."""
    skip_unless_possible()
    image = _ea_image(tmp_path)
    small = b"s" * 40
    mid = random.Random(19).randbytes(700)  # fits the block, not the inode

    def scenario(root: Path) -> list[object]:
        out: list[object] = []
        for name in ("a", "b", "c", "d"):
            (root / name).write_bytes(name.encode())
        steps = [
            ("a", "user.big", SHARED), ("b", "user.big", SHARED), ("c", "user.x", SHARED),
            ("a", "user.other", OTHER), ("a", "user.mid", mid), ("a", "user.mid2", mid),
            ("b", "user.big", OTHER),  # replace: one reference moves
            ("b", "user.big", OTHER),  # the same value again
            ("c", "user.x", small),  # an EA value replaced by an in-inode one
            ("d", "user.y", small), ("d", "user.y", SHARED),  # and the other way
            ("d", "trusted.t", b"t" * 65_536), ("d", "user.z", b"z" * 65_537),
        ]
        for rel, name, value in steps:
            out.append(attempt(os.setxattr, root / rel, name, value))
        out.append(attempt(os.removexattr, root / "a", "user.mid"))
        out.append(attempt(os.removexattr, root / "d", "user.y"))
        out.append(attempt(os.rename, root / "a", root / "c"))  # c's values go with it
        out.append(attempt(os.link, root / "b", root / "b2"))
        out.append(attempt(os.unlink, root / "b"))  # b2 still holds b's values
        (root / "e").mkdir()
        out.append(attempt(os.setxattr, root / "e", "trusted.dir", SHARED))
        out.append(attempt(os.setxattr, root / "e", "user.dir", OTHER))
        out.append(attempt(os.rmdir, root / "e"))  # a directory owner freed
        out.append({n: sorted(os.listxattr(root / n)) for n in sorted(os.listdir(root))
                    if n != "lost+found"})
        return out

    assert_same_on_both(tmp_path, image, scenario)
    # Shared as the kernel shares: as many EA inodes, with the same reference counts.
    counts = {side: sorted(_ref_count(tmp_path / f"{side}.img", ino)
                           for ino in _ea_inodes(tmp_path / f"{side}.img"))
              for side in ("kernel", "ext4box")}
    assert counts["ext4box"] == counts["kernel"]
    print(f"EA inode reference counts: {counts}")
    assert max(counts["ext4box"]) >= 2


def test_no_ea_inode_feature_keeps_enospc(tmp_path: Path) -> None:
    """Without ea_inode, a value fitting neither the inode nor the block is ENOSPC."""
    skip_unless_possible()
    image = make_image(tmp_path / "base.img", 32)

    def scenario(root: Path) -> list[object]:
        (root / "f").write_bytes(b"f")
        return [attempt(os.setxattr, root / "f", "user.big", SHARED),
                attempt(os.setxattr, root / "f", "user.ok", OTHER[:500])]

    assert assert_same_on_both(tmp_path, image, scenario)[0] == "ENOSPC"


# ---------------------------------------------------------------- crafted images


def _debugfs_write(image: Path, *requests: str) -> None:
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(requests) + "\n",
                   text=True, check=True, capture_output=True)


def _fsck_report(image: Path) -> list[str]:
    """e2fsck -fn's findings, without the lines that name the image or the version."""
    return [line for line in fsck(image).stdout.splitlines()
            if not line.startswith(("e2fsck ", str(image)))]


def test_an_entry_naming_a_plain_file_never_frees_it(tmp_path: Path) -> None:
    """An xattr entry pointing at an ordinary named file (its EA_INODE flag cleared):
    deleting the owner must not drop a reference on, or free, that file."""
    skip_unless_possible()
    image = _ea_image(tmp_path)
    _kernel_sets(image, tmp_path / "kmnt", [("f1", "user.big", SHARED)])
    (ea_ino,) = _ea_inodes(image)
    _debugfs_write(image, f"sif <{ea_ino}> flags 0x80000", f"ln <{ea_ino}> victim")
    before = _fsck_report(image)
    # noatime: reading the victim under relatime would move its i_atime, where an EA
    # inode keeps its value's hash, and so change what e2fsck says about it.
    with rw_mount(image, tmp_path / "mnt", "noatime") as handle:
        root = handle.mountpoint
        assert attempt(os.unlink, root / "f1") == "EUCLEAN"
        assert attempt(os.removexattr, root / "f1", "user.big") == "EUCLEAN"
        assert (root / "victim").read_bytes() == SHARED
        assert attempt(os.unlink, root / "victim") is None  # the victim itself is a file
    assert _fsck_report(image) == before


def test_a_reference_count_of_zero_is_corrupt_not_underflowed(tmp_path: Path) -> None:
    """An EA inode named by an entry but counting no references: removing the value or
    the owner is refused (EUCLEAN), nothing is freed and the count stays as found."""
    skip_unless_possible()
    image = _ea_image(tmp_path)
    _kernel_sets(image, tmp_path / "kmnt", [("f1", "user.big", SHARED), ("f1", "user.s", b"s")])
    (ea_ino,) = _ea_inodes(image)
    _debugfs_write(image, f"sif <{ea_ino}> version 0", f"sif <{ea_ino}> ctime 0")
    before = _fsck_report(image)
    assert before  # e2fsck sees the wrong count too
    with rw_mount(image, tmp_path / "mnt") as handle:
        root = handle.mountpoint
        assert attempt(os.removexattr, root / "f1", "user.big") == "EUCLEAN"
        assert attempt(os.unlink, root / "f1") == "EUCLEAN"
        assert attempt(os.removexattr, root / "f1", "user.s") is None  # other values still work
        assert os.getxattr(root / "f1", "user.big") == SHARED
    assert _ref_count(image, ea_ino) == 0
    assert _fsck_report(image) == before


def test_a_shared_block_naming_an_ea_inode_is_copied_with_its_own_reference(
    tmp_path: Path,
) -> None:
    """Two inodes share one xattr block (the kernel's mbcache made it) whose entry names
    an EA inode. Changing one inode's block copies it: the copy takes its own
    reference, the shared original keeps one; removing the value drops it again.

    The kernel leaks a reference when it shares such a block (e2fsck: "ref count is
    2, should be 1"), so the image is repaired with e2fsck -fy before the scenario."""
    skip_unless_possible()
    image = _ea_image(tmp_path)
    big = random.Random(20).randbytes(65536)
    _kernel_sets(image, tmp_path / "kmnt", [
        ("f0", "user.i1", b"1" * 40), ("f0", "user.i2", b"2" * 40), ("f0", "user.big", big),
        ("f1", "user.i1", b"1" * 40), ("f1", "user.i2", b"2" * 40), ("f1", "user.big", big)])
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, check=False)
    assert_fsck_clean(image)
    blocks = {debugfs(image, f"stat {name}").split("File ACL: ")[1].split()[0]
              for name in ("f0", "f1")}
    assert len(blocks) == 1 and blocks != {"0"}, "the kernel did not share the block"

    def scenario(root: Path) -> list[object]:
        return [
            attempt(os.setxattr, root / "f0", "user.more", b"m" * 200),  # copy-on-write
            attempt(os.getxattr, root / "f1", "user.big") == big,
            attempt(os.removexattr, root / "f1", "user.big"),  # the original, now f1's alone
            attempt(os.getxattr, root / "f0", "user.big") == big,
        ]

    assert assert_same_on_both(tmp_path, image, scenario) == [None, True, None, True]
