"""chattr/lsattr, the filesystem label and fstrim through a real `ext4box serve -o rw`
mount, against the kernel's ext4 (issue 18 item 8).

Copies of one image are mounted by the kernel (loop, rw) and by ext4box; the
same steps run on both mounts as processes do them: the FS_IOC_* ioctls the
kernel's FUSE fileattr path turns into FUSE_IOCTL, the real chattr and lsattr
binaries, opens, writes, truncates, renames and unlinks the flags must
refuse, FS_IOC_GETFSLABEL/SETFSLABEL on the mountpoint, and FITRIM (the ioctl
and the fstrim binary). Every errno, every lsattr line and every FITRIM byte
count must agree; afterwards both images pass `e2fsck -fn`, every file's
content is intact and the ext4box image file's allocation has dropped.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from rw_support import assert_fsck_clean, make_image, rw_mount, skip_unless_possible

from support.flag_drivers import KernelFlags, as_user, errno_name
from support.kernel import kernel_mount
from support.serve import fuse_backend

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

FS_IOC_GETFSLABEL = 0x81009431
FS_IOC_SETFSLABEL = 0x41009432
FITRIM = 0xC0185879
FSTRIM_RANGE = struct.Struct("=QQQ")
OWNER = 1000
PATHS = ("f", "small", "big", "d", "d/x", "e", "ad", "ad/y")

Step = Callable[[KernelFlags], object]


def _skip_unless_possible() -> None:
    skip_unless_possible()
    if fuse_backend() != "native":
        pytest.skip("FUSE_IOCTL is served by the native transport only (pyfuse3 has no "
                    "ioctl handler)")


def _seed(root: Path) -> None:
    (root / "f").write_bytes(b"f" * 10000)
    (root / "small").write_bytes(b"s" * 5000)
    (root / "big").write_bytes(bytes(range(256)) * 320)
    for name in ("d", "e", "ad"):
        (root / name).mkdir()
    (root / "d" / "x").write_bytes(b"x")
    (root / "ad" / "y").write_bytes(b"y")
    for path in ("f", "small", "e"):
        os.chown(root / path, OWNER, OWNER)
    os.setxattr(root / "f", b"user.k", b"v")


def _images(tmp: Path, *mkfs_args: str) -> tuple[Path, Path]:
    tree = tmp / "tree"
    tree.mkdir()
    _seed(tree)
    base = make_image(tmp / "base.img", 64, *mkfs_args, root=tree)
    ours, kernel = tmp / "ours.img", tmp / "kernel.img"
    shutil.copyfile(base, ours)
    shutil.copyfile(base, kernel)
    return ours, kernel


def _lsattr(root: Path) -> list[str]:
    out = subprocess.run(["lsattr", "-d", *(str(root / p) for p in PATHS if (root / p).exists())],
                         capture_output=True, text=True, check=False)
    return [line.replace(str(root), "ROOT") for line in out.stdout.splitlines()]


def _chattr(change: str) -> Step:
    def run(d: KernelFlags) -> object:
        path, letters = change.split(" ")
        result = subprocess.run(["chattr", letters, str(d.p(path))], capture_output=True,
                                text=True, check=False)
        return ("chattr", change, result.returncode)

    return run


def op(name: str, *args: object) -> Step:
    return lambda d: (name, *args, getattr(d, name)(*args))


def ioctl_chattr(path: str, change: str, uid: int = 0) -> Step:
    return lambda d: ("ioctl chattr", path, change, uid, d.chattr(path, change, uid))


STEPS: list[Step] = [
    _chattr("f +dA"), _chattr("f +S"), _chattr("d +DT"), _chattr("f +D"), _chattr("e +F"),
    ioctl_chattr("f", "+i", OWNER), ioctl_chattr("f", "+c", OWNER), ioctl_chattr("f", "+d", 2000),
    _chattr("small -e"), _chattr("big -e"), _chattr("small +e"),
    _chattr("f +i"), _chattr("d +i"), _chattr("ad +a"), _chattr("small +a"),
    op("open", "f", os.O_WRONLY), op("open", "f", os.O_RDONLY | os.O_TRUNC),
    op("truncate", "f", 0), op("chmod", "f", 0o600), op("chown", "f", 5),
    op("utime", "f", True), op("utime", "f", False), op("setxattr", "f"),
    op("removexattr", "f"), op("link", "f", "f2"), op("unlink", "f"), op("rename", "f", "g"),
    op("create", "d/new"), op("mkdir", "d/sub"), op("unlink", "d/x"), op("rename", "d/x", "d/z"),
    op("open", "small", os.O_WRONLY), op("open", "small", os.O_WRONLY | os.O_APPEND),
    op("append", "small", b"appended"), op("truncate", "small", 100),
    op("utime", "small", True), op("utime", "small", False), op("unlink", "small"),
    op("create", "ad/new"), op("unlink", "ad/y"), op("rename", "ad/y", "moved"),
    _chattr("f -i"), op("append", "f", b"now"), _chattr("small -a"),
    op("truncate", "small", 100),
]


def test_chattr_lsattr_and_blocked_operations_match_the_kernel(tmp_path: Path) -> None:
    _skip_unless_possible()
    if shutil.which("chattr") is None or shutil.which("lsattr") is None:
        pytest.skip("chattr/lsattr not installed")
    ours_img, kernel_img = _images(tmp_path, "-b", "1024", "-I", "256")
    with rw_mount(ours_img, tmp_path / "ours") as served:
        ours = KernelFlags(served.mountpoint)
        our_outcomes = [step(ours) for step in STEPS]
        our_listing = _lsattr(served.mountpoint)
    with kernel_mount(kernel_img, tmp_path / "kernel", readonly=False) as root:
        kernel = KernelFlags(root)
        kernel_outcomes = [step(kernel) for step in STEPS]
        kernel_listing = _lsattr(root)
    assert our_outcomes == kernel_outcomes
    assert our_listing == kernel_listing
    assert_fsck_clean(ours_img)
    with kernel_mount(ours_img, tmp_path / "check", readonly=True) as root:
        assert _lsattr(root) == kernel_listing


def _label_steps(root: Path) -> list[object]:
    out: list[object] = []
    fd = os.open(root, os.O_RDONLY)
    try:
        out.append(fcntl.ioctl(fd, FS_IOC_GETFSLABEL, bytes(256))[:17])
        for label, uid in ((b"x" * 17, 0), (b"user", OWNER), (b"sixteen-bytes-ok", 0), (b"new", 0)):
            try:
                with as_user(uid):
                    fcntl.ioctl(fd, FS_IOC_SETFSLABEL, label.ljust(256, b"\0"))
                out.append("OK")
            except OSError as err:
                out.append(errno_name(err.errno or 0))
            out.append(fcntl.ioctl(fd, FS_IOC_GETFSLABEL, bytes(256))[:17])
    finally:
        os.close(fd)
    return out


def test_label_matches_the_kernel(tmp_path: Path) -> None:
    _skip_unless_possible()
    ours_img, kernel_img = _images(tmp_path, "-b", "1024", "-L", "before")
    with rw_mount(ours_img, tmp_path / "ours") as served:
        ours = _label_steps(served.mountpoint)
    with kernel_mount(kernel_img, tmp_path / "kernel", readonly=False) as root:
        kernel = _label_steps(root)
    assert ours == kernel
    assert_fsck_clean(ours_img)
    assert subprocess.run(["e2label", str(ours_img)], capture_output=True, text=True,
                          check=True).stdout.strip() == "new"


def _trims(root: Path) -> list[object]:
    out: list[object] = []
    fd = os.open(root, os.O_RDONLY)
    try:
        for start, length, minlen in ((6 << 20, 4096, 0), (0, (1 << 64) - 1, 1 << 20),
                                      (0, (1 << 64) - 1, 0), (0, (1 << 64) - 1, 0),
                                      (0, 100, 0)):
            try:
                result = fcntl.ioctl(fd, FITRIM, FSTRIM_RANGE.pack(start, length, minlen))
                out.append(FSTRIM_RANGE.unpack(result)[1])
            except OSError as err:
                out.append(errno_name(err.errno or 0))
        try:
            with as_user(OWNER):
                fcntl.ioctl(fd, FITRIM, FSTRIM_RANGE.pack(0, (1 << 64) - 1, 0))
            out.append("OK")
        except OSError as err:
            out.append(errno_name(err.errno or 0))
    finally:
        os.close(fd)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_fstrim_matches_the_kernel_and_keeps_every_file(tmp_path: Path) -> None:
    _skip_unless_possible()
    if shutil.which("fstrim") is None:
        pytest.skip("fstrim not installed")
    ours_img, kernel_img = _images(tmp_path, "-b", "4096")
    with kernel_mount(ours_img, tmp_path / "shape", readonly=False) as root:
        for i in range(30):  # free runs of many lengths between files
            (root / f"g{i}").write_bytes(bytes([i]) * (4096 * (1 + i * 7 % 50)))
        for i in range(0, 30, 3):
            (root / f"g{i}").unlink()
    shutil.copyfile(ours_img, kernel_img)
    with kernel_mount(ours_img, tmp_path / "h0", readonly=True) as root:
        hashes = _hashes(root)
    allocated = os.stat(ours_img).st_blocks
    with rw_mount(ours_img, tmp_path / "ours") as served:
        ours = _trims(served.mountpoint)
        # fstrim(8) itself, after everything is trimmed: 0 bytes, exit 0
        fstrim = subprocess.run(["fstrim", "-v", str(served.mountpoint)], capture_output=True,
                                text=True, check=False)
    with kernel_mount(kernel_img, tmp_path / "kernel", readonly=False) as root:
        kernel = _trims(root)
    assert ours == kernel
    assert fstrim.returncode == 0, fstrim.stderr
    assert "0 B" in fstrim.stdout
    assert_fsck_clean(ours_img)
    with kernel_mount(ours_img, tmp_path / "h1", readonly=True) as root:
        assert _hashes(root) == hashes
    assert os.stat(ours_img).st_blocks < allocated
