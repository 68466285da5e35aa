"""POSIX operations through `ext4box serve -o rw`, each checked against the kernel's ext4.

Each scenario runs on a kernel rw loop mount and on an ext4box rw mount of
copies of the same fresh image; what the scenario observes (results, errnos,
modes, contents) and the final trees must be identical, both images must pass
`e2fsck -fn`, and the kernel's view of the ext4box image must be what the
ext4box mount showed.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

import pytest
from rw_support import (
    ACL_MINIMAL,
    ACL_NAMED_USER,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    UTIME_NOW,
    UTIME_OMIT,
    assert_fsck_clean,
    assert_same_on_both,
    attempt,
    child_outcome,
    kernel_view,
    make_image,
    open_path_for_others,
    renameat2,
    run_as,
    rw_mount,
    skip_unless_possible,
    syncfs,
    utimensat,
)

from support.fileops import truncate_by_fd

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skip_unless_possible()
    return make_image(tmp_path_factory.mktemp("rw-base") / "base.img", 32)


@pytest.fixture(scope="module")
def inline_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skip_unless_possible()
    path = tmp_path_factory.mktemp("rw-inline") / "inline.img"
    return make_image(path, 32, "-O", "inline_data,^has_journal", "-I", "256")


def _write(path: Path, data: bytes, offset: int = 0, flags: int = 0) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        return os.pwrite(fd, data, offset) if not flags & os.O_APPEND else os.write(fd, data)
    finally:
        os.close(fd)


def _mode(path: Path) -> str:
    return oct(os.lstat(path).st_mode)


def test_files_dirs_links_and_data(tmp_path: Path, base_image: Path) -> None:
    def scenario(root: Path) -> list[object]:
        obs: list[object] = []
        (root / "d").mkdir(0o750)
        (root / "d" / "sub").mkdir()
        obs.append(_write(root / "d" / "small", b"hello world\n"))
        obs.append(_write(root / "big", os.urandom(0) + bytes(range(256)) * 1200))
        # sparse: a block far away, a hole in between
        obs.append(_write(root / "sparse", b"tail", 5 * 1024 * 1024))
        obs.append(_write(root / "sparse", b"head", 0))
        # O_APPEND
        _write(root / "log", b"one\n")
        obs.append(_write(root / "log", b"two\n", flags=os.O_APPEND))
        # read after write
        obs.append((root / "log").read_bytes())
        obs.append((root / "sparse").read_bytes()[:8])
        obs.append(os.stat(root / "sparse").st_blocks)
        # truncate down (inside a block), then up: the cut tail reads as zeros
        truncate_by_fd(root / "big", 1000)
        truncate_by_fd(root / "big", 9000)
        data = (root / "big").read_bytes()
        obs.append((len(data), data[:1000] == (bytes(range(256)) * 4)[:1000], data[1000:]))
        # overwrite in the middle of existing data
        obs.append(_write(root / "big", b"XYZ", 500))
        obs.append((root / "big").read_bytes()[498:505])
        os.symlink("d/small", root / "fast")
        os.symlink("x" * 300, root / "slow")
        obs.append(os.readlink(root / "slow") == "x" * 300)
        os.link(root / "d" / "small", root / "hard")
        obs.append(os.stat(root / "hard").st_nlink)
        os.mkfifo(root / "fifo", 0o640)
        os.mknod(root / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
        obs.append(attempt(os.mkdir, root / "d"))
        obs.append(attempt(os.rmdir, root / "d"))
        obs.append(attempt(os.unlink, root / "d"))
        obs.append(attempt(os.rmdir, root / "nothing"))
        obs.append(attempt(os.mkdir, root / ("n" * 256)))
        os.unlink(root / "d" / "small")
        obs.append(os.stat(root / "hard").st_nlink)
        os.rmdir(root / "d" / "sub")
        obs.append(os.stat(root / "d").st_nlink)
        with os.scandir(root) as it:
            obs.append(sorted(e.name for e in it))
        return obs

    assert_same_on_both(tmp_path, base_image, scenario)


def test_rename(tmp_path: Path, base_image: Path) -> None:
    def scenario(root: Path) -> list[object]:
        obs: list[object] = []
        for name in ("a", "b", "c"):
            (root / name).mkdir()
        _write(root / "a" / "f", b"F")
        _write(root / "b" / "g", b"G")
        _write(root / "x", b"X")
        _write(root / "y", b"Y")
        obs.append(attempt(renameat2, root / "x", root / "y", RENAME_NOREPLACE))
        obs.append(attempt(renameat2, root / "x", root / "a", RENAME_EXCHANGE))
        obs.append(((root / "a").read_bytes(), sorted(os.listdir(root / "x"))))
        obs.append(attempt(renameat2, root / "nope", root / "y", RENAME_EXCHANGE))
        # move a directory between parents: ".." and both parents' link counts
        os.rename(root / "b", root / "c" / "b")
        obs.append((os.stat(root).st_nlink, os.stat(root / "c").st_nlink))
        obs.append(os.stat(root / "c" / "b" / "..").st_ino == os.stat(root / "c").st_ino)
        obs.append(attempt(os.rename, root / "c", root / "c" / "b" / "inside"))
        # replace a file, replace an empty directory, refuse a non-empty one
        os.rename(root / "y", root / "a")
        obs.append((root / "a").read_bytes())
        (root / "e").mkdir()
        obs.append(attempt(os.rename, root / "x", root / "e"))
        obs.append(attempt(os.rename, root / "e", root / "c"))
        (root / "e2").mkdir()
        os.rename(root / "e", root / "e2")
        obs.append(attempt(os.rename, root / "a", root / "a"))
        os.link(root / "a", root / "a2")
        obs.append(attempt(os.rename, root / "a", root / "a2"))
        obs.append(sorted(os.listdir(root)))
        return obs

    assert_same_on_both(tmp_path, base_image, scenario)


def test_modes_owners_and_privilege_bits(tmp_path: Path, base_image: Path) -> None:
    def scenario(root: Path) -> list[object]:
        obs: list[object] = []
        (root / "pub").mkdir(0o777)
        os.chmod(root / "pub", 0o777)
        for name in ("suid", "sgidx", "sgid"):
            _write(root / name, b"#!/bin/sh\n")
        os.chmod(root / "suid", 0o4755)
        os.chmod(root / "sgidx", 0o2775)
        os.chmod(root / "sgid", 0o2664)
        obs.append([_mode(root / n) for n in ("suid", "sgidx", "sgid")])
        for name in ("suid", "sgidx", "sgid"):
            os.chown(root / name, 1000, 1000)
        # chown clears suid, and sgid when group-exec is set, even for root
        obs.append([_mode(root / n) for n in ("suid", "sgidx", "sgid")])
        # a write by a non-root user clears them too
        _write(root / "pub" / "w", b"x")
        os.chown(root / "pub" / "w", 1000, 1000)
        os.chmod(root / "pub" / "w", 0o6777)
        child = run_as(1000, 1000, f"open({str(root / 'pub' / 'w')!r}, 'ab').write(b'more')")
        obs.append(child_outcome(child))
        obs.append(_mode(root / "pub" / "w"))
        # a write by root keeps them
        os.chmod(root / "pub" / "w", 0o6777)
        _write(root / "pub" / "w", b"root", flags=os.O_APPEND)
        obs.append(_mode(root / "pub" / "w"))
        # truncate by the owner (not root) clears them
        child = run_as(1000, 1000, f"import os; os.truncate({str(root / 'pub' / 'w')!r}, 2)")
        obs.append((child_outcome(child), _mode(root / "pub" / "w")))
        # set-group-ID directory: new entries take its group, subdirectories its bit
        (root / "sg").mkdir()
        os.chown(root / "sg", 0, 1234)
        os.chmod(root / "sg", 0o2775)
        _write(root / "sg" / "f", b"")
        (root / "sg" / "sub").mkdir(0o755)
        obs.append([(os.stat(p).st_gid, oct(os.stat(p).st_mode)) for p in
                    (root / "sg" / "f", root / "sg" / "sub")])  # fmt: skip
        # permission checks are the kernel's (default_permissions)
        os.chmod(root / "suid", 0o600)
        child = run_as(1001, 1001, f"open({str(root / 'suid')!r}).read()")
        obs.append(child_outcome(child))
        return obs

    open_path_for_others(tmp_path)
    assert_same_on_both(tmp_path, base_image, scenario)


def test_xattrs_and_acls(tmp_path: Path, base_image: Path) -> None:
    def scenario(root: Path) -> list[object]:
        obs: list[object] = []
        f = root / "f"
        _write(f, b"data")
        os.setxattr(f, "user.a", b"1")
        obs.append(attempt(os.setxattr, f, "user.a", b"2", os.XATTR_CREATE))
        obs.append(attempt(os.setxattr, f, "user.b", b"2", os.XATTR_REPLACE))
        os.setxattr(f, "user.a", b"22", os.XATTR_REPLACE)
        os.setxattr(f, "trusted.t", b"T" * 100)
        os.setxattr(f, "security.s", b"S")
        # enough to need the external xattr block
        for i in range(8):
            obs.append(attempt(os.setxattr, f, f"user.big{i}", bytes([65 + i]) * 150))
        obs.append(sorted(os.listxattr(f)))
        obs.append(attempt(os.getxattr, f, "user.big5"))
        os.removexattr(f, "user.big3")
        obs.append(attempt(os.removexattr, f, "user.big3"))
        obs.append(attempt(os.getxattr, f, "user.none"))
        obs.append(attempt(os.setxattr, f, "user.huge", b"h" * 8000))
        # POSIX ACLs: a named-user entry, then one equivalent to the mode
        os.setxattr(f, "system.posix_acl_access", ACL_NAMED_USER)
        obs.append((_mode(f), os.getxattr(f, "system.posix_acl_access")))
        (root / "d").mkdir()
        os.setxattr(root / "d", "system.posix_acl_default", ACL_NAMED_USER)
        os.setxattr(f, "system.posix_acl_access", ACL_MINIMAL)
        obs.append((_mode(f), attempt(os.getxattr, f, "system.posix_acl_access")))
        obs.append(sorted(os.listxattr(root / "d")))
        # xattrs on a directory and a symlink-free special file
        os.setxattr(root / "d", "user.dir", b"D")
        obs.append(os.getxattr(root / "d", "user.dir"))
        return obs

    assert_same_on_both(tmp_path, base_image, scenario)


def test_inline_data_files(tmp_path: Path, inline_image: Path) -> None:
    def scenario(root: Path) -> list[object]:
        obs: list[object] = []
        _write(root / "tiny", b"t" * 40)
        _write(root / "grows", b"g" * 50)
        _write(root / "grows", b"G" * 200, 50)
        _write(root / "grows", b"!" * 5000, 250)
        os.symlink("s" * 70, root / "link")
        (root / "dir").mkdir()
        for i in range(30):
            _write(root / "dir" / f"entry-{i:03d}", b"")
        syncfs(root)  # the kernel converts inline data at writeback
        for name in ("tiny", "grows"):
            obs.append((os.stat(root / name).st_size, os.stat(root / name).st_blocks))
        obs.append((root / "grows").read_bytes()[45:55])
        truncate_by_fd(root / "tiny", 10)
        obs.append((root / "tiny").read_bytes())
        return obs

    assert_same_on_both(tmp_path, inline_image, scenario)


def test_times(tmp_path: Path, base_image: Path) -> None:
    image = tmp_path / "times.img"
    image.write_bytes(base_image.read_bytes())
    with rw_mount(image, tmp_path / "mnt") as handle:
        f = handle.mountpoint / "f"
        _write(f, b"x")
        utimensat(f, (1000, 5), (2000, 7))
        st = os.stat(f)
        assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
        before = os.stat(f).st_ctime_ns
        utimensat(f, (0, UTIME_OMIT), (0, UTIME_NOW))
        st = os.stat(f)
        assert st.st_atime_ns == 1000 * 10**9 + 5  # omitted: unchanged
        # now (the kernel's coarse clock may lag the server's a few ms)
        assert abs(st.st_mtime_ns - time.time_ns()) < 5 * 10**9
        assert st.st_ctime_ns >= before
        utimensat(f, (3000, 0), (0, UTIME_OMIT))
        st = os.stat(f)
        assert st.st_atime_ns == 3000 * 10**9
        expected = (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
        # a write moves mtime and ctime
        _write(f, b"y", 1)
        after = os.stat(f)
        assert after.st_mtime_ns > 2000 * 10**9 and after.st_ctime_ns >= expected[2]
        expected = (after.st_atime_ns, after.st_mtime_ns, after.st_ctime_ns)
    assert_fsck_clean(image)
    with kernel_view(image, tmp_path / "kmnt") as root:
        st = os.stat(root / "f")
        assert (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns) == expected


def test_unlink_while_open_and_fsync(tmp_path: Path, base_image: Path) -> None:
    image = tmp_path / "orphan.img"
    image.write_bytes(base_image.read_bytes())
    with rw_mount(image, tmp_path / "mnt") as handle:
        root = handle.mountpoint
        free_before = os.statvfs(root).f_bfree
        fd = os.open(root / "victim", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"v" * 1024 * 1024)
            os.fsync(fd)
            os.unlink(root / "victim")
            assert not (root / "victim").exists()
            assert os.fstat(fd).st_nlink == 0
            os.pwrite(fd, b"still here", 4096)
            assert os.pread(fd, 10, 4096) == b"still here"
            assert os.statvfs(root).f_bfree < free_before
        finally:
            os.close(fd)
        # After the last close (FUSE sends RELEASE asynchronously) and a commit
        # (frees become visible once the metadata dropping them is durable),
        # the blocks come back.
        deadline = time.monotonic() + 10
        while os.statvfs(root).f_bfree != free_before and time.monotonic() < deadline:
            dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dir_fd)
            os.close(dir_fd)
            time.sleep(0.1)
        assert os.statvfs(root).f_bfree == free_before
        _write(root / "kept", b"k" * 10000)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        syncfs(root)
        ours = os.statvfs(root)
    assert_fsck_clean(image)
    with kernel_view(image, tmp_path / "kmnt") as root:
        assert (root / "kept").read_bytes() == b"k" * 10000
        theirs = os.statvfs(root)
        assert (ours.f_blocks, ours.f_bfree, ours.f_files, ours.f_ffree) == (
            theirs.f_blocks,
            theirs.f_bfree,
            theirs.f_files,
            theirs.f_ffree,
        )


def test_read_only_mount_refuses_writes(tmp_path: Path, base_image: Path) -> None:
    from support.serve import ext4box_argv, served

    image = tmp_path / "ro.img"
    image.write_bytes(base_image.read_bytes())
    with served(image, tmp_path / "mnt", ext4box_argv(image, tmp_path / "mnt", "ro")) as handle:
        with pytest.raises(OSError) as caught:
            _write(handle.mountpoint / "f", b"x")
        assert caught.value.errno == errno.EROFS
    assert_fsck_clean(image)
