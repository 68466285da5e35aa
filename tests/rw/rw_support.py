"""Helpers for the read-write tests: images, `ext4box serve -o rw` mounts, e2fsck, renameat2.

Every test that writes ends the same way: unmount, `e2fsck -fn` must report a
clean filesystem, and a kernel mount of the image must show what the test
expects. `rw_session` packages that sequence.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.kernel import kernel_mount, why_no_kernel_mounts
from support.serve import ServedMount, ext4box_argv, served, why_no_fuse
from support.walk import Entry, walk

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def skip_unless_possible() -> None:
    reason = why_no_kernel_mounts() or why_no_fuse()
    if reason is None:
        missing = [t for t in ("mkfs.ext4", "e2fsck", "setfacl") if shutil.which(t) is None]
        reason = f"missing tools: {', '.join(missing)}" if missing else None
    if reason is not None:
        pytest.skip(reason)


def make_image(path: Path, size_mb: int = 32, *mkfs_args: str, root: Path | None = None) -> Path:
    """A fresh ext4 image made by mkfs.ext4 (root directory owned by root, mode 0755)."""
    with path.open("wb") as image:
        image.truncate(size_mb * 1024 * 1024)
    argv = ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", *mkfs_args]
    if root is not None:
        argv += ["-d", str(root)]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)
    return path


def fsck(image: Path) -> subprocess.CompletedProcess[str]:
    """`e2fsck -fn IMAGE`: forced full check, changing nothing."""
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)


def assert_fsck_clean(image: Path) -> None:
    result = fsck(image)
    assert result.returncode == 0, (
        f"e2fsck -fn {image} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


@contextmanager
def rw_mount(image: Path, mountpoint: Path, *extra: str) -> Iterator[ServedMount]:
    """`ext4box serve IMAGE MOUNTPOINT -o rw[,extra...]` for the duration of the block."""
    options = ",".join(("rw", *extra))
    with served(image, mountpoint, ext4box_argv(image, mountpoint, options)) as handle:
        yield handle


@contextmanager
def kernel_view(image: Path, mountpoint: Path) -> Iterator[Path]:
    """A read-only kernel mount of `image` (the reference view of what was written)."""
    with kernel_mount(image, mountpoint, readonly=True) as root:
        yield root


def kernel_walk(image: Path, mountpoint: Path) -> dict[str, Entry | str]:
    with kernel_view(image, mountpoint) as root:
        return walk(root)


def renameat2(old: Path, new: Path, flags: int) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE (no Python wrapper exists)."""
    result = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) with raw (sec, nsec) pairs, so UTIME_NOW / UTIME_OMIT can be passed."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def syncfs(path: Path) -> None:
    """syncfs(2) of the filesystem holding `path`. Never sync(2): on a shared machine
    a global sync waits for every other filesystem, including hung ones."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def run_as(uid: int, gid: int, code: str) -> subprocess.CompletedProcess[str]:
    """Run Python `code` in a child that dropped to uid/gid (no supplementary groups)."""

    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return subprocess.run(
        ["python3", "-c", code], capture_output=True, text=True, preexec_fn=drop, timeout=60
    )


def child_outcome(result: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    """(exit status, exception class name or "") of a `run_as` child, path-independent."""
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return result.returncode, last.split(":", 1)[0]


def open_path_for_others(path: Path) -> None:
    """Let other users traverse down to `path` (pytest makes its tmp dirs 0700)."""
    for directory in (path, *path.parents):
        if str(directory) in ("/", "/tmp"):
            break
        st = os.stat(directory)
        if st.st_uid == 0 and not st.st_mode & 0o001:
            os.chmod(directory, st.st_mode | 0o011)


def acl_xattr(entries: list[tuple[int, int, int]]) -> bytes:
    """A system.posix_acl_* value in the kernel's xattr format (version 2, sorted entries).

    Each entry is (tag, perm, id); tags: 1 USER_OBJ, 2 USER, 4 GROUP_OBJ,
    8 GROUP, 0x10 MASK, 0x20 OTHER.
    """
    body = b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
        for tag, perm, ident in sorted(entries, key=lambda e: (e[0], e[2]))
    )
    return (2).to_bytes(4, "little") + body


ACL_NAMED_USER = acl_xattr([(1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF),
                            (0x10, 6, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)])  # fmt: skip
ACL_MINIMAL = acl_xattr([(1, 7, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF), (0x20, 1, 0xFFFFFFFF)])


@contextmanager
def rw_session(tmp_path: Path, image: Path) -> Iterator[Path]:
    """Serve `image` rw at tmp_path/'mnt'; after the body: unmount, e2fsck -fn must pass."""
    with rw_mount(image, tmp_path / "mnt") as handle:
        yield handle.mountpoint
    assert_fsck_clean(image)


# Fields of a walk Entry that differ between two correct implementations:
# times come from each side's clock, inode numbers from each allocator.
NONDETERMINISTIC = frozenset({"atime_ns", "mtime_ns", "ctime_ns", "ino"})


def strip(tree: dict[str, Entry | str], ignore: frozenset[str] = NONDETERMINISTIC) -> dict:
    """A walk with the fields in `ignore` removed, for comparisons between implementations."""
    result: dict[str, object] = {}
    for path, entry in tree.items():
        if isinstance(entry, str):
            result[path] = entry
        else:
            result[path] = {
                name: getattr(entry, name)
                for name in entry.__dataclass_fields__
                if name not in ignore
            }
    return result


def tree_differences(reference: dict, candidate: dict) -> list[str]:
    lines = []
    for path in sorted(reference.keys() | candidate.keys()):
        ref, cand = reference.get(path), candidate.get(path)
        if ref == cand:
            continue
        if not isinstance(ref, dict) or not isinstance(cand, dict):
            lines.append(f"{path}: kernel={ref!r} ext4box={cand!r}")
            continue
        for name in sorted(ref.keys() | cand.keys()):
            if ref.get(name) != cand.get(name):
                lines.append(f"{path}: {name}: kernel={ref.get(name)!r} ext4box={cand.get(name)!r}")
    return lines


def on_both(tmp_path: Path, image: Path, scenario, ignore: frozenset[str] = NONDETERMINISTIC,
            options: tuple[str, ...] = (), view_ignore: frozenset[str] = frozenset()):
    """Run `scenario(root) -> observations` on a kernel rw mount and an ext4box rw mount
    (`-o rw` plus `options`) of copies of `image`; both images must then pass e2fsck -fn.
    `view_ignore`: fields besides atime the kernel's view of the ext4box image may
    show otherwise than ext4box did.

    Returns ((kernel observations, kernel tree), (ext4box observations, ext4box tree)),
    trees stripped of `ignore`.
    """
    kernel_image = tmp_path / "kernel.img"
    ours_image = tmp_path / "ext4box.img"
    shutil.copyfile(image, kernel_image)
    shutil.copyfile(image, ours_image)
    with kernel_mount(kernel_image, tmp_path / "kmnt", readonly=False) as root:
        kernel_obs = scenario(root)
        # Settle delayed allocation: before writeback st_blocks holds reservations.
        syncfs(root)
        kernel_tree = strip(walk(root), ignore)
    with rw_mount(ours_image, tmp_path / "omnt", *options) as handle:
        ours_obs = scenario(handle.mountpoint)
        ours_raw = walk(handle.mountpoint)
        ours_tree = strip(ours_raw, ignore)
    assert_fsck_clean(kernel_image)
    assert_fsck_clean(ours_image)
    # What ext4box left on the image, as the kernel sees it, must be what it showed.
    # (Everything but atime: same image, so even times and inode numbers agree.)
    view_ignore = view_ignore | {"atime_ns"}
    kernel_view_tree = strip(kernel_walk(ours_image, tmp_path / "vmnt"), view_ignore)
    differences = tree_differences(kernel_view_tree, strip(ours_raw, view_ignore))
    assert not differences, "kernel view of the ext4box image differs:\n" + "\n".join(differences)
    return (kernel_obs, kernel_tree), (ours_obs, ours_tree)


def assert_same_on_both(tmp_path: Path, image: Path, scenario, options: tuple[str, ...] = (),
                        view_ignore: frozenset[str] = frozenset()) -> list:
    (k_obs, k_tree), (o_obs, o_tree) = on_both(tmp_path, image, scenario, options=options,
                                               view_ignore=view_ignore)
    if o_obs != k_obs:
        lines = [
            f"[{i}] kernel={k!r:.300} ext4box={o!r:.300}"
            for i, (k, o) in enumerate(zip(k_obs, o_obs, strict=False))
            if k != o
        ]
        raise AssertionError("observations differ:\n" + "\n".join(lines))
    differences = tree_differences(k_tree, o_tree)
    assert not differences, "trees differ:\n" + "\n".join(differences)
    return o_obs


def attempt(func, *args, **kwargs) -> object:
    """The result of a call, or the errno name it failed with (observations compare both)."""
    try:
        result = func(*args, **kwargs)
    except OSError as exc:
        return errno_name(exc)
    return result
