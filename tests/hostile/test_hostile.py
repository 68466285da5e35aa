"""The crafted-attack corpus, served through a real `ext4box serve` mount.

One image holds every attack of crafted.MAIN_ATTACKS (each on its own victim
file or directory), a second one the group-descriptor and inline-data
attacks, a third the superblock attack that must refuse the mount, a fourth
the EA-inode attacks (crafted_ea_inode.py, with a bound on the server's
memory). Each test checks the exact errno the user sees, that the request
answered within REQUEST_BOUND_S (hostile/requests.py), and that an undamaged
file still reads correctly after it. The journal attacks are in
test_hostile_journal.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostile import crafted, crafted_ea_inode
from hostile.requests import LONGEST, LONGEST_REFUSAL, expect_errno, record_refusal, timed
from support.serve import ServedMount, ext4box_argv, served

pytestmark = [pytest.mark.fuse]


def still_served(handle: ServedMount) -> None:
    assert handle.alive(), f"server died:\n{handle.stderr_text()}"
    data = timed("read good file", (handle.mountpoint / crafted.GOOD_FILE).read_bytes)
    assert data == crafted.GOOD_CONTENT


@pytest.fixture(scope="module")
def need_tools(need_fuse: None) -> None:
    missing = [t for t in ("mkfs.ext4", "e2fsck", "debugfs", "dumpe2fs") if not shutil.which(t)]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


@pytest.fixture(scope="module")
def main_mount(tmp_path_factory: pytest.TempPathFactory, need_tools: None
               ) -> Iterator[ServedMount]:
    work = tmp_path_factory.mktemp("hostile")
    tree = work / "tree"
    crafted.build_main_tree(tree)
    image = work / "hostile.img"
    crafted.mkfs(image, tree, "24M", "-N", str(crafted.SYMLINK_HOPS + 600))
    for attack in crafted.MAIN_ATTACKS.values():
        attack(image)
    with served(image, work / "mnt") as handle:
        yield handle


def victim(handle: ServedMount, name: str) -> Path:
    return handle.mountpoint / "victims" / name


# ---- extent trees ------------------------------------------------------------

@pytest.mark.parametrize("name", crafted.EXTENT_VICTIMS)
def test_damaged_extent_tree_reads_fail_euclean(main_mount: ServedMount, name: str) -> None:
    """Loops, overlaps, depth > 5, runs past the device or over the superblock/GDT."""
    path = victim(main_mount, name)
    size = timed(f"lstat {name}", lambda: os.lstat(path)).st_size
    assert size == crafted.SPARSE_ISLANDS * 4 * crafted.BLOCK_SIZE - 3 * crafted.BLOCK_SIZE
    expect_errno(errno.EUCLEAN, f"read {name}", path.read_bytes)
    still_served(main_mount)


# ---- directories -------------------------------------------------------------

@pytest.mark.parametrize("name", ["d-reclen-zero", "d-overrun"])
def test_bad_record_length_fails_euclean(main_mount: ServedMount, name: str) -> None:
    path = victim(main_mount, name)
    expect_errno(errno.EUCLEAN, f"listdir {name}", lambda: os.listdir(path))
    expect_errno(errno.EUCLEAN, f"lookup in {name}", lambda: os.lstat(path / "f05"))
    still_served(main_mount)


def test_directory_larger_than_filesystem_fails_euclean(main_mount: ServedMount) -> None:
    path = victim(main_mount, "d-size-beyond-fs")
    expect_errno(errno.EUCLEAN, "listdir d-size-beyond-fs", lambda: os.listdir(path))
    expect_errno(errno.EUCLEAN, "lookup in d-size-beyond-fs",
                 lambda: os.lstat(path / "only-entry"))
    still_served(main_mount)


def test_directory_with_a_huge_hole_lists_quickly(main_mount: ServedMount) -> None:
    path = victim(main_mount, "d-size-holey")
    assert timed("lstat d-size-holey", lambda: os.lstat(path)).st_size == (
        crafted.HOLEY_DIR_BLOCKS * crafted.BLOCK_SIZE)
    assert timed("listdir d-size-holey", lambda: os.listdir(path)) == ["only-entry"]
    expect_errno(errno.ENOENT, "lookup of a missing name (scans the hole)",
                 lambda: os.lstat(path / "missing"))
    still_served(main_mount)


@pytest.mark.parametrize("name", ["htree-cycle", "htree-depth"])
def test_broken_htree_falls_back_to_linear_scan(main_mount: ServedMount, name: str) -> None:
    """A cyclic or too-deep index is ignored, as the kernel does: every name is still
    found (by a linear scan) and listed."""
    path = victim(main_mount, name)
    names = timed(f"listdir {name}", lambda: sorted(os.listdir(path)))
    assert names == [f"entry-with-a-long-name-{i:03d}" for i in range(120)]
    for i in (0, 57, 119):
        entry = path / f"entry-with-a-long-name-{i:03d}"
        assert timed(f"read {entry.name}", entry.read_bytes) == b"%d\n" % i
    expect_errno(errno.ENOENT, "lookup of a missing name", lambda: os.lstat(path / "missing"))
    still_served(main_mount)


def test_directory_hard_link_to_ancestor_is_eloop(main_mount: ServedMount) -> None:
    """loops/a/b/c/up is loops/a again: the kernel refuses to alias a directory below
    itself (ELOOP), and a walk of the tree ends."""
    loops = main_mount.mountpoint / "loops"
    expect_errno(errno.ELOOP, "lstat of the ancestor link",
                 lambda: os.lstat(loops / "a/b/c/up"))
    walked = timed("walk loops/a", lambda: sorted(
        str(Path(d, f).relative_to(loops)) for d, _, fs in os.walk(loops / "a") for f in fs))
    assert walked == ["a/b/c/file"]
    still_served(main_mount)


def test_dotdot_loop_is_harmless(main_mount: ServedMount) -> None:
    """A ".." naming a child: FUSE never looks ".." up (the kernel's dcache answers),
    so listing and reading below it work."""
    y = main_mount.mountpoint / "loops/dd/x/y"
    assert timed("listdir y", lambda: os.listdir(y)) == ["z"]
    assert timed("read z/file", (y / "z/file").read_bytes) == b"below a dotdot loop\n"
    assert timed("lstat y/..", lambda: os.lstat(y / "..")).st_ino == os.lstat(y.parent).st_ino
    still_served(main_mount)


# ---- xattrs ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["xa-overlap", "xa-past-block"])
def test_bad_xattr_entry_fails_euclean(main_mount: ServedMount, name: str) -> None:
    path = victim(main_mount, name)
    expect_errno(errno.EUCLEAN, f"getxattr {name}", lambda: os.getxattr(path, "user.big"))
    expect_errno(errno.EUCLEAN, f"listxattr {name}", lambda: os.listxattr(path))
    # The contents do not depend on the xattr block.
    assert timed(f"read {name}", path.read_bytes) == b"xattr victim\n"
    still_served(main_mount)


# ---- inodes ------------------------------------------------------------------

def test_size_2p63_minus_1_reads_as_sparse(main_mount: ServedMount) -> None:
    """The largest legal i_size: the blocks that exist read back, the rest is a hole."""
    path = victim(main_mount, "size-max")
    assert timed("lstat size-max", lambda: os.lstat(path)).st_size == 2**63 - 1
    fd = timed("open size-max", lambda: os.open(path, os.O_RDONLY))
    try:
        assert timed("pread start", lambda: os.pread(fd, 3000, 0)) == b"S" * 3000
        far = 2**62
        assert timed("pread far", lambda: os.pread(fd, 4096, far)) == bytes(4096)
    finally:
        os.close(fd)
    still_served(main_mount)


def test_size_2p63_fails_euclean(main_mount: ServedMount) -> None:
    path = victim(main_mount, "size-2p63")
    expect_errno(errno.EUCLEAN, "lstat size-2p63", lambda: os.lstat(path))
    assert "size-2p63" in timed("listdir victims", lambda: os.listdir(path.parent))
    still_served(main_mount)


def test_links_count_zero_inode_fails_euclean(main_mount: ServedMount) -> None:
    """A directory entry naming a deleted inode (links_count 0), as the kernel refuses it."""
    path = victim(main_mount, "links-zero")
    expect_errno(errno.EUCLEAN, "lstat links-zero", lambda: os.lstat(path))
    assert "links-zero" in timed("listdir victims", lambda: os.listdir(path.parent))
    still_served(main_mount)


def test_symlink_chain_of_10000_hops_is_eloop(main_mount: ServedMount) -> None:
    """The kernel follows at most 40 links per lookup: ELOOP, quickly, and every
    link in the chain still reads."""
    chain = main_mount.mountpoint / crafted.CHAIN_DIR
    expect_errno(errno.ELOOP, "open the chain's head",
                 lambda: (chain / crafted.chain_name(0)).read_bytes())
    hops = crafted.SYMLINK_HOPS
    near_end = chain / crafted.chain_name(hops - 40)  # exactly 40 links to follow
    assert timed("read 40 hops", near_end.read_bytes) == b"hello at the end of the chain\n"
    expect_errno(errno.ELOOP, "41 hops", lambda: (chain / crafted.chain_name(hops - 41)).stat())
    assert timed("readlink", lambda: os.readlink(chain / crafted.chain_name(123))) == "l00124"
    assert len(timed("listdir chain", lambda: os.listdir(chain))) == hops
    still_served(main_mount)


# ---- group descriptors and inline data (second image) ------------------------

@pytest.fixture(scope="module")
def group_image(tmp_path_factory: pytest.TempPathFactory, need_tools: None) -> Path:
    work = tmp_path_factory.mktemp("hostile-groups")
    crafted.build_group_tree(work / "tree")
    image = work / "groups.img"
    crafted.build_group_image(image, work / "tree")
    return image


def test_inode_table_outside_device_and_inline_data_attacks(
    group_image: Path, tmp_path: Path
) -> None:
    image = tmp_path / "damaged.img"
    shutil.copyfile(group_image, image)
    target = crafted.group_victim(image)
    crafted.inode_table_outside_device(image, target)
    crafted.inline_data_larger_than_inode(image)
    crafted.ea_inode_cycle(image)
    with served(image, tmp_path / "mnt") as handle:
        mnt = handle.mountpoint
        expect_errno(errno.EUCLEAN, f"lstat {target.path} (group {target.group})",
                     lambda: os.lstat(mnt / target.path))
        listing = timed("listdir spread", lambda: os.listdir(mnt / crafted.GROUP_VICTIM_DIR))
        assert len(listing) == 300 and Path(target.path).name in listing
        expect_errno(errno.EUCLEAN, "read the oversized inline body",
                     (mnt / crafted.INLINE_VICTIM).read_bytes)
        for name in crafted.EA_CYCLE_FILES:
            expect_errno(errno.EUCLEAN, f"read {name} (EA inode cycle)", (mnt / name).read_bytes)
        still_served(handle)


def test_huge_inode_count_refuses_to_serve(group_image: Path, tmp_path: Path) -> None:
    image = tmp_path / "damaged.img"
    shutil.copyfile(group_image, image)
    crafted.huge_inode_count(image)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    start = time.monotonic()
    result = subprocess.run(ext4box_argv(image, mountpoint), capture_output=True, text=True,
                            timeout=60, check=False)
    record_refusal(time.monotonic() - start, "refused serve")
    if os.path.ismount(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        pytest.fail("ext4box served an image whose inode count contradicts its groups")
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "inode" in lines[0], result.stderr


# ---- EA inodes (fourth image) ---------------------------------------------------

SERVER_MEMORY_BOUND = 256 << 20  # peak RSS of the server process after the requests


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:"))) * 1024


def test_ea_inode_values_of_16_mib_are_read_once_and_bounded(
    tmp_path: Path, need_tools: None
) -> None:
    """48 entries of one xattr block name a 16 MiB EA inode: listed, and read once (the
    server's peak RSS stays bounded, where it reached 800 MB); entries naming two such
    inodes exceed the per-area budget: EUCLEAN. The file bodies are not affected."""
    crafted_ea_inode.build_ea_tree(tmp_path / "tree")
    image = tmp_path / "ea.img"
    crafted_ea_inode.build_ea_image(image, tmp_path / "tree")
    crafted_ea_inode.ea_inodes_of_16_mib(image)
    with served(image, tmp_path / "mnt") as handle:
        shared = handle.mountpoint / crafted_ea_inode.SHARED_VICTIM
        names = timed("listxattr shared", lambda: os.listxattr(shared))
        assert sorted(names) == [crafted_ea_inode.entry_name(i)
                                 for i in range(crafted_ea_inode.ENTRIES)]
        # Larger than any getxattr buffer (64 KiB): E2BIG, as the VFS answers.
        expect_errno(errno.E2BIG, "getxattr of a 16 MiB value",
                     lambda: os.getxattr(shared, crafted_ea_inode.entry_name(7)))
        distinct = handle.mountpoint / crafted_ea_inode.DISTINCT_VICTIM
        expect_errno(errno.EUCLEAN, "listxattr past the budget", lambda: os.listxattr(distinct))
        for path in (shared, distinct):
            assert timed(f"read {path.name}", path.read_bytes) == b"ea victim\n"
        still_served(handle)
        assert peak_rss(handle.process.pid) < SERVER_MEMORY_BOUND


def test_report_longest_request() -> None:
    """Not a check: prints the slowest request of this module (run with -s to see it)."""
    print(f"\nlongest hostile request: {LONGEST[0][0]:.3f}s ({LONGEST[0][1]}); longest "
          f"refused serve: {LONGEST_REFUSAL[0][0]:.3f}s ({LONGEST_REFUSAL[0][1]})")
