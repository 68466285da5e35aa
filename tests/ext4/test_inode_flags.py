"""chattr/lsattr semantics and the flags honoured by every write path, against the kernel.

Each scenario runs on two copies of one mkfs image: on a read-write kernel
loop mount through syscalls and the FS_IOC_* ioctls, and on the read-write
facade in-process (chattr as chattr does it: GETFLAGS, one bit changed,
SETFLAGS; the other operations as the FUSE layer calls them). Every step's
errno and the flags of every path afterwards must agree; `e2fsck -fn` must
call our image clean; and the kernel must read our image's flags back as we
answered them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from ext4box.ext4.format.errors import NotFound
from ext4box.ext4.write.inode_flags import FsxAttr
from support.facade import Ours, assert_clean, make_image, need_kernel
from support.flag_drivers import FacadeFlags, KernelFlags
from support.kernel import kernel_mount

pytestmark = pytest.mark.kernel

Driver = KernelFlags | FacadeFlags
Step = Callable[[Driver], object]
PATHS = ("f", "small", "big", "d", "d/x", "e", "ad", "ad/y")
OWNER = 1000


def _seed(root: Path) -> None:
    """The tree every scenario starts from (built by mkfs -d)."""
    (root / "f").write_bytes(b"f" * 10000)
    (root / "small").write_bytes(b"s" * 5000)
    (root / "big").write_bytes(os.urandom(80 * 1024))  # more than 12 blocks
    (root / "d").mkdir()
    (root / "d" / "x").write_bytes(b"x")
    (root / "e").mkdir()
    (root / "ad").mkdir()
    (root / "ad" / "y").write_bytes(b"y")
    for path in ("f", "small", "e"):
        os.chown(root / path, OWNER, OWNER)
    os.setxattr(root / "f", b"user.k", b"v")


def _image(tmp: Path, mkfs_args: list[str]) -> Path:
    tree = tmp / "tree"
    tree.mkdir()
    _seed(tree)
    return make_image(tmp / "base.img", [*mkfs_args, "-E", "root_owner=0:0", "-d", str(tree)])


def _run(tmp: Path, steps: list[Step], mkfs_args: list[str] | None = None) -> None:
    need_kernel()
    base = _image(tmp, mkfs_args or ["-t", "ext4", "-b", "1024", "-I", "256"])
    ours_img, kernel_img = tmp / "ours.img", tmp / "kernel.img"
    shutil.copyfile(base, ours_img)
    shutil.copyfile(base, kernel_img)

    ours = Ours(ours_img)
    try:
        facade = FacadeFlags(ours)
        our_outcomes = [step(facade) for step in steps]
        our_flags = {p: _flags_or_gone(facade, p) for p in PATHS}
    finally:
        ours.close()
    mnt = tmp / "kmnt"
    with kernel_mount(kernel_img, mnt, readonly=False) as root:
        kernel = KernelFlags(root)
        kernel_outcomes = [step(kernel) for step in steps]
        kernel_flags = {p: _flags_or_gone(kernel, p) for p in PATHS}
    assert our_outcomes == kernel_outcomes
    assert our_flags == kernel_flags
    assert_clean(ours_img)
    with kernel_mount(ours_img, tmp / "check", readonly=True) as root:
        assert {p: _flags_or_gone(KernelFlags(root), p) for p in PATHS} == our_flags


def _flags_or_gone(driver: Driver, path: str) -> object:
    try:
        return hex(driver.get_flags(path))
    except (FileNotFoundError, NotFound):  # a step removed it
        return "gone"


def chattr(path: str, change: str, uid: int = 0) -> Step:
    return lambda d: (f"chattr {change} {path}", d.chattr(path, change, uid))


def op(name: str, *args: object) -> Step:
    return lambda d: (name, *args, getattr(d, name)(*args))


@pytest.mark.parametrize("variant", ["ext4-1k", "ext4-4k-nocsum", "ext3"])
def test_chattr_sequences_match_the_kernel(tmp_path: Path, variant: str) -> None:
    mkfs = {"ext4-1k": ["-t", "ext4", "-b", "1024", "-I", "256"],
            "ext4-4k-nocsum": ["-t", "ext4", "-b", "4096", "-O", "^metadata_csum"],
            "ext3": ["-t", "ext3", "-b", "4096"]}[variant]
    _run(tmp_path, [
        chattr("f", "+A", OWNER), chattr("f", "+d", OWNER), chattr("f", "+S", OWNER),
        chattr("f", "+sucTt", OWNER),  # T: EOPNOTSUPP on a file
        chattr("f", "+s"), chattr("f", "+u"), chattr("f", "+c"), chattr("f", "+t"),
        chattr("f", "+D"),  # a directory flag on a file: EOPNOTSUPP
        chattr("d", "+DT"), chattr("d", "+P"), chattr("d", "+x"),
        chattr("f", "+i", OWNER),  # needs CAP_LINUX_IMMUTABLE
        chattr("f", "+a", OWNER),
        chattr("f", "+d", 2000),  # not the owner
        chattr("f", "+j", OWNER),  # data journaling needs CAP_SYS_RESOURCE
        # (root's +j is not compared: this machine's root lacks CAP_SYS_RESOURCE)
        chattr("small", "+x"), chattr("small", "-x"),
        chattr("f", "+F"), chattr("e", "+F"),  # casefold: no feature
        chattr("f", "+e"), chattr("small", "-e"), chattr("big", "-e"), chattr("d", "-e"),
        chattr("small", "+e"),
        chattr("f", "+i"), chattr("f", "+d"), chattr("f", "+i"), chattr("f", "-d"),
        chattr("d", "+i"), chattr("d", "+i"),
        chattr("f", "-i"), chattr("d", "-i"),
    ], mkfs)


def test_immutable_refuses_every_change(tmp_path: Path) -> None:
    _run(tmp_path, [
        chattr("f", "+i"), chattr("d", "+i"),
        op("open", "f", os.O_RDONLY), op("open", "f", os.O_WRONLY), op("open", "f", os.O_RDWR),
        op("open", "f", os.O_RDONLY | os.O_TRUNC), op("append", "f", b"more"),
        op("truncate", "f", 0), op("truncate", "f", 20000),
        op("chmod", "f", 0o600), op("chown", "f", 5), op("utime", "f", True),
        op("utime", "f", False), op("setxattr", "f"), op("removexattr", "f"),
        op("link", "f", "f2"), op("unlink", "f"), op("rename", "f", "g"),
        op("rename", "small", "f"),
        op("create", "d/new"), op("mkdir", "d/sub"), op("symlink", "d/sl"),
        op("link", "small", "d/l"), op("unlink", "d/x"), op("rename", "d/x", "d/z"),
        op("rename", "small", "d/z"), op("rename", "d/x", "moved"), op("rmdir", "d"),
        op("chmod", "d", 0o700), op("rename", "d", "d2"),
        chattr("f", "-i"), op("open", "f", os.O_WRONLY), op("unlink", "f"),
    ])


def test_append_only_allows_appends_only(tmp_path: Path) -> None:
    _run(tmp_path, [
        chattr("f", "+a"), chattr("ad", "+a"),
        op("open", "f", os.O_RDONLY), op("open", "f", os.O_WRONLY),
        op("open", "f", os.O_WRONLY | os.O_APPEND), op("open", "f", os.O_RDWR | os.O_APPEND),
        op("open", "f", os.O_WRONLY | os.O_APPEND | os.O_TRUNC), op("append", "f", b"more"),
        op("truncate", "f", 0), op("truncate", "f", 50000),
        op("chmod", "f", 0o600), op("chown", "f", 5), op("utime", "f", True),
        op("utime", "f", False), op("setxattr", "f"), op("removexattr", "f"),
        op("link", "f", "f2"), op("unlink", "f"), op("rename", "f", "g"),
        op("rename", "small", "f"),
        op("create", "ad/new"), op("mkdir", "ad/sub"), op("symlink", "ad/sl"),
        op("link", "small", "ad/l"), op("unlink", "ad/y"), op("rename", "ad/y", "ad/z"),
        op("rename", "small", "ad/m"), op("rename", "ad/y", "moved"), op("rmdir", "ad/sub"),
        op("rename", "big", "ad/new"),  # replacing a name in an append-only directory
        chattr("f", "+i"),  # +i keeps +a: the two together
        chattr("f", "-ai"), op("truncate", "f", 0),
    ])


def test_fsxattr_matches_the_kernel(tmp_path: Path) -> None:
    """FS_IOC_FSGETXATTR/FSSETXATTR: the flag mapping, flags fsxattr cannot name kept,
    and the checks of fileattr_set_prepare. (Project ids need the project feature,
    which this kernel cannot mount without CONFIG_QFMT_V2: see the debugfs test.)"""
    _run(tmp_path, [
        chattr("f", "+dAS"), chattr("d", "+P"),
        lambda d: ("get f", d.get_fsxattr("f")),
        lambda d: ("get d", d.get_fsxattr("d")),
        # xflags NODUMP only: SYNC and NOATIME go, EXTENTS (not nameable) stays.
        lambda d: ("set f", d.set_fsxattr("f", FsxAttr(xflags=0x80))),
        lambda d: ("set f owner", d.set_fsxattr("small", FsxAttr(xflags=0x40), OWNER)),
        lambda d: ("set f other", d.set_fsxattr("small", FsxAttr(xflags=0), 2000)),
        lambda d: ("extsize on dir", d.set_fsxattr("d", FsxAttr(xflags=0x800, extsize=4096))),
        lambda d: ("extsize 0 on dir", d.set_fsxattr("d", FsxAttr(xflags=0x800))),
        lambda d: ("extszinherit on file",
                   d.set_fsxattr("f", FsxAttr(xflags=0x1000, extsize=4096))),
        lambda d: ("immutable", d.set_fsxattr("f", FsxAttr(xflags=0x88))),
        lambda d: ("append while immutable", d.set_fsxattr("f", FsxAttr(xflags=0x98))),
        lambda d: ("get f again", d.get_fsxattr("f")),
        lambda d: ("clear", d.set_fsxattr("f", FsxAttr(xflags=0))),
    ], ["-t", "ext4", "-b", "4096", "-I", "256"])


def test_project_id_is_stored_where_debugfs_reads_it(tmp_path: Path) -> None:
    """With the project feature, FSSETXATTR's project id lands in i_projid."""
    need_kernel()
    image = _image(tmp_path, ["-t", "ext4", "-b", "4096", "-I", "256", "-O", "project"])
    ours = Ours(image)
    try:
        facade = FacadeFlags(ours)
        assert facade.set_fsxattr("f", FsxAttr(xflags=0, projid=42)) == "OK"
        assert facade.set_fsxattr("d", FsxAttr(xflags=0x200, projid=7)) == "OK"
        assert facade.set_fsxattr("f", FsxAttr(xflags=0x8, projid=42)) == "OK"
        refused = facade.set_fsxattr("f", FsxAttr(xflags=0x8, projid=43))
        got = facade.get_fsxattr("d")
    finally:
        ours.close()
    assert refused == "EPERM"  # immutable: the project id may not change
    assert (got.projid, got.xflags) == (7, 0x200)
    assert_clean(image)
    for path, projid in (("f", 42), ("d", 7)):
        out = subprocess.run(["debugfs", "-R", f"stat /{path}", str(image)],
                             capture_output=True, text=True, check=True).stdout
        assert f"Project: {projid:5d}" in out or f"Project: {projid} " in out, out


def test_fsxattr_projid_needs_the_project_feature(tmp_path: Path) -> None:
    _run(tmp_path, [
        lambda d: ("get", d.get_fsxattr("f")),
        lambda d: ("projid", d.set_fsxattr("f", FsxAttr(xflags=0, projid=5))),
        lambda d: ("projid 0", d.set_fsxattr("f", FsxAttr(xflags=0x40, projid=0))),
    ])


def test_ctime_is_updated_by_chattr(tmp_path: Path) -> None:
    need_kernel()
    image = _image(tmp_path, ["-t", "ext4", "-b", "4096"])
    ours = Ours(image)
    try:
        facade = FacadeFlags(ours)
        before = ours.fs.inode(facade.ino("f")).ctime_ns
        assert facade.chattr("f", "+d") == "OK"
        after = ours.fs.inode(facade.ino("f")).ctime_ns
    finally:
        ours.close()
    assert after > before
    assert_clean(image)


def test_lsattr_reads_our_flags(tmp_path: Path) -> None:
    """lsattr on a kernel mount of our image prints what the kernel's chattr made."""
    need_kernel()
    if shutil.which("lsattr") is None:
        pytest.skip("lsattr not installed")
    base = _image(tmp_path, ["-t", "ext4", "-b", "4096"])
    ours_img, kernel_img = tmp_path / "ours.img", tmp_path / "kernel.img"
    shutil.copyfile(base, ours_img)
    shutil.copyfile(base, kernel_img)
    changes = [("f", "+adAS"), ("d", "+DTi"), ("small", "+sc"), ("e", "+x")]
    ours = Ours(ours_img)
    try:
        for path, change in changes:
            assert FacadeFlags(ours).chattr(path, change) == "OK"
    finally:
        ours.close()
    with kernel_mount(kernel_img, tmp_path / "k", readonly=False) as root:
        for path, change in changes:
            subprocess.run(["chattr", change, str(root / path)], check=True)
    listings = []
    for image in (ours_img, kernel_img):
        with kernel_mount(image, tmp_path / "v", readonly=True) as root:
            out = subprocess.run(["lsattr", "-d", *(str(root / p) for p in PATHS)],
                                 check=True, capture_output=True, text=True).stdout
            listings.append(out)
    assert listings[0] == listings[1]
    assert_clean(ours_img)
