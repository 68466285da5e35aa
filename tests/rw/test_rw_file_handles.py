"""File handles after a cache drop and a remount: kernel ext4 vs ext4box (FUSE export).

fstests generic/426, 467, 477, 756 and 777 take handles with
name_to_handle_at(2), drop the dentry and inode caches or remount, and open
the handles again with open_by_handle_at(2). Without FUSE_EXPORT_SUPPORT
the FUSE kernel module cannot find an inode it has forgotten, so every such
open is ESTALE. Here one scenario runs on a kernel rw mount and on an
ext4box rw mount of copies of one image, and what each step gives (content
read through the handle, the directory's reconnected path, its listing, its
parent, or the errno) must be the same on both:

- handles of files, of directories (one of them htree-indexed) and of the
  root, opened after `echo 2 > /proc/sys/vm/drop_caches` and again after an
  unmount and a mount by a new server process; files renamed since, or
  with one of their two links removed, still open;
- a directory handle reconnects to the tree (LOOKUP "..", then the
  parent's listing), so its /proc/self/fd path and its ".." are right, also
  after the directory moved;
- connectable handles (AT_HANDLE_CONNECTABLE: the parent's handle too)
  reconnect a file to its parent; one whose file moved to another parent
  since fails as on the kernel;
- the handle of a file unlinked and gone is ESTALE, of one unlinked but
  still held open opens until it is closed;
- the handle of a file whose inode number a new file took (another
  generation) is ESTALE, and so is a handle with its generation changed;
- forged handles naming inode 0, reserved inodes (1, 7, 8, 10), the last
  inode (never used), one past it and 2^32-1 are ESTALE, and the mount
  keeps serving.

Both images must be e2fsck-clean afterwards. On an image with ea_inode and
orphan_file, handles forged to name the EA inode or the orphan file (with
their true generations) are ESTALE on both, as ext4 refuses them. And the
FUSE-only cases: node id 2 (ext4's root, whose node id is 1) and one above
2^32 are ESTALE, each with a log line, and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from rw_support import (
    assert_fsck_clean,
    attempt,
    make_image,
    rw_mount,
    skip_unless_possible,
    syncfs,
)

from support.handles import (
    FUSE_FILEID,
    Handle,
    drop_dentries_and_inodes,
    name_to_handle,
    open_by_handle,
)
from support.kernel import kernel_mount
from support.serve import ext4box_argv, served

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

Mount = Callable[[], AbstractContextManager[Path]]

CONTENT = b"kept across remounts\n" * 100
# Directory entries enough to make a 4 KiB-block directory htree-indexed.
BIG_DIR_ENTRIES = 300
# New files tried until one takes the unlinked victim's inode number.
REUSE_ATTEMPTS = 64
RESERVED_INODES = (0, 1, 7, 8, 10)
EXT4_EA_INODE_FL = 0x200000
EA_VALUE_BYTES = 8000  # more than a 4 KiB block holds: stored in an EA inode


def _kernel(image: Path, mountpoint: Path) -> Mount:
    return lambda: kernel_mount(image, mountpoint, readonly=False)


def _ext4box(image: Path, mountpoint: Path) -> Mount:
    @contextmanager
    def mount() -> Iterator[Path]:
        with rw_mount(image, mountpoint) as handle:
            yield handle.mountpoint

    return mount


def _open_file(root: Path, handle: Handle, *, with_path: bool = False) -> object:
    """What reading through `handle` gives: a summary of the content (and, `with_path`,
    the path under the mount the opened file is connected to), or the errno."""

    def read(mount_fd: int) -> object:
        fd = open_by_handle(mount_fd, handle, os.O_RDONLY)
        try:
            data = os.read(fd, len(CONTENT) + 1)
            path = os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), root)
        finally:
            os.close(fd)
        summary = "content ok" if data == CONTENT else f"{len(data)} other bytes"
        return (summary, path) if with_path else summary

    return _with_mount_fd(root, read)


def _open_dir(root: Path, handle: Handle) -> object:
    """(path under the mount, listing, parent's inode == the expected one's) or the errno."""

    def inspect(mount_fd: int) -> tuple[str, list[str], int]:
        fd = open_by_handle(mount_fd, handle, os.O_RDONLY | os.O_DIRECTORY)
        try:
            path = os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), root)
            names = sorted(os.listdir(fd))[:5]
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            try:
                parent_ino = os.fstat(parent).st_ino
            finally:
                os.close(parent)
        finally:
            os.close(fd)
        return path, names, parent_ino

    seen = _with_mount_fd(root, inspect)
    if isinstance(seen, tuple):
        path, names, parent_ino = seen
        expected_parent = (root / path).parent
        return path, names, parent_ino == os.stat(expected_parent).st_ino
    return seen


def _with_mount_fd(root: Path, use: Callable[[int], object]) -> object:
    mount_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return attempt(use, mount_fd)
    finally:
        os.close(mount_fd)


def _build(root: Path) -> tuple[dict[str, Handle], int]:
    """The tree and the handles to open later, some of them of files renamed, linked,
    unlinked or moved since; and an fd that keeps one unlinked file open."""
    (root / "file").write_bytes(CONTENT)
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "inner").write_bytes(CONTENT)
    big = root / "a" / "big"
    big.mkdir()
    for index in range(BIG_DIR_ENTRIES):
        (big / f"entry-with-a-long-name-{index:04}").write_bytes(b"")
    (big / "sub").mkdir()
    # Connectable handles also name the parent: decoding reconnects the file to it.
    # This one is observed first, before any listing of "a": a READDIRPLUS listing
    # (pyfuse3's) caches the moved file's dentry under its new parent, and the
    # kernel returns a cached, connected dentry without consulting the handle's parent.
    (root / "a" / "b" / "leaves").write_bytes(CONTENT)
    moved_away = name_to_handle(root / "a" / "b" / "leaves", connectable=True)
    os.rename(root / "a" / "b" / "leaves", root / "a" / "left")
    handles = {
        "connectable, moved away": moved_away,
        "file": name_to_handle(root / "file"),
        "inner": name_to_handle(root / "a" / "b" / "inner"),
        "dir a/b": name_to_handle(root / "a" / "b"),
        "dir a/big": name_to_handle(big),
        "dir a/big/sub": name_to_handle(big / "sub"),
        "dir root": name_to_handle(root),
    }
    gone = root / "gone"
    gone.write_bytes(CONTENT)
    handles["gone"] = name_to_handle(gone)
    gone.unlink()
    (root / "renamed").write_bytes(CONTENT)
    handles["renamed"] = name_to_handle(root / "renamed")
    os.rename(root / "renamed", root / "a" / "b" / "renamed-here")
    (root / "first-name").write_bytes(CONTENT)
    os.link(root / "first-name", root / "a" / "second-name")
    handles["other link left"] = name_to_handle(root / "first-name")
    os.unlink(root / "first-name")
    held = root / "held-open"
    held.write_bytes(CONTENT)
    held_fd = os.open(held, os.O_RDONLY)
    handles["unlinked, held open"] = name_to_handle(held)
    held.unlink()
    (root / "a" / "moving").mkdir()
    handles["dir moved"] = name_to_handle(root / "a" / "moving")
    os.rename(root / "a" / "moving", root / "a" / "b" / "moved")
    (root / "a" / "b" / "stays").write_bytes(CONTENT)
    handles["connectable"] = name_to_handle(root / "a" / "b" / "stays", connectable=True)
    return handles, held_fd


def _reuse_inode(root: Path) -> tuple[Handle, Handle | None]:
    """A victim's handle, and the handle of a new file that took its inode number (or None)."""
    work = root / "reuse"
    work.mkdir()
    victim = work / "victim"
    victim.write_bytes(CONTENT)
    victim_handle = name_to_handle(victim)
    victim_ino = victim.stat().st_ino
    victim.unlink()
    # Committed, so the number is free to take again (FUSE sends no SYNCFS: fsync).
    directory = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    for index in range(REUSE_ATTEMPTS):
        candidate = work / f"new-{index}"
        candidate.write_bytes(CONTENT)
        if candidate.stat().st_ino == victim_ino:
            return victim_handle, name_to_handle(candidate)
    return victim_handle, None


def _observe(root: Path, handles: dict[str, Handle]) -> list[tuple[str, object]]:
    seen: list[tuple[str, object]] = []
    for name, handle in handles.items():
        if name.startswith("dir "):
            seen.append((name, _open_dir(root, handle)))
        else:
            seen.append((name, _open_file(root, handle, with_path=name.startswith("connectable"))))
    return seen


def _forged(root: Path, real: Handle) -> list[tuple[str, object]]:
    """Opening handles no file of this filesystem has, built from a real one."""
    ino, generation = real.inode_and_generation()
    inodes_count = os.statvfs(root).f_files
    cases = {
        "other generation": real.forged(ino, (generation + 1) & 0xFFFFFFFF),
        "last inode (never used)": real.forged(inodes_count, generation),
        "one past the last inode": real.forged(inodes_count + 1, generation),
        "inode 2^32-1": real.forged(0xFFFFFFFF, generation),
        **{f"reserved inode {n}": real.forged(n, generation) for n in RESERVED_INODES},
    }
    seen = [(name, _open_file(root, handle)) for name, handle in cases.items()]
    seen.append(("still serving", (root / "file").read_bytes() == CONTENT))
    return seen


def _scenario(mount: Mount) -> list[tuple[str, object]]:
    seen: list[tuple[str, object]] = []
    with mount() as root:
        handles, held_fd = _build(root)
        victim, successor = _reuse_inode(root)
        seen.append(("inode number reused", successor is not None))
        handles["victim"] = victim
        if successor is not None:
            handles["successor"] = successor
        syncfs(root)
        drop_dentries_and_inodes()
        seen += [("after drop_caches", step) for step in _observe(root, handles)]
        seen += [("forged", step) for step in _forged(root, handles["file"])]
        os.close(held_fd)
    with mount() as root:
        seen += [("after remount", step) for step in _observe(root, handles)]
        seen += [("forged after remount", step) for step in _forged(root, handles["file"])]
    return seen


def test_handles_survive_cache_drop_and_remount_as_on_the_kernel(tmp_path: Path) -> None:
    skip_unless_possible()
    image = make_image(tmp_path / "base.img", 32)
    kernel_image, ours_image = tmp_path / "kernel.img", tmp_path / "ext4box.img"
    kernel_image.write_bytes(image.read_bytes())
    ours_image.write_bytes(image.read_bytes())

    kernel_seen = _scenario(_kernel(kernel_image, tmp_path / "kmnt"))
    ours_seen = _scenario(_ext4box(ours_image, tmp_path / "omnt"))

    assert ours_seen == kernel_seen
    # The reference really resolved the handles and really refused the stale ones.
    by_step = dict(kernel_seen)
    assert by_step["inode number reused"] is True
    assert ("file", "content ok") in [s for p, s in kernel_seen if p == "after remount"]
    assert ("gone", "ESTALE") in [s for p, s in kernel_seen if p == "after remount"]
    assert ("victim", "ESTALE") in [s for p, s in kernel_seen if p == "after drop_caches"]
    assert_fsck_clean(kernel_image)
    assert_fsck_clean(ours_image)


def _debugfs_inode(image: Path, ino: int) -> tuple[int, int]:
    """(i_flags, i_generation) of inode `ino` as debugfs reads them."""
    out = subprocess.run(["debugfs", "-R", f"stat <{ino}>", str(image)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    flags = re.search(r"Flags: (0x[0-9a-f]+)", out)
    generation = re.search(r"Generation: (\d+)", out)
    assert flags and generation, out
    return int(flags.group(1), 16), int(generation.group(1))


def _metadata_inodes_image(tmp_path: Path) -> tuple[Path, int, int]:
    """An ea_inode + orphan_file image with a file whose xattr lives in an EA inode:
    (image, EA inode number, orphan file inode number)."""
    image = make_image(tmp_path / "meta.img", 32, "-O", "ea_inode,orphan_file")
    with kernel_mount(image, tmp_path / "setup", readonly=False) as root:
        (root / "file").write_bytes(CONTENT)
        os.setxattr(root / "file", "user.big", b"v" * EA_VALUE_BYTES)
    dumped = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    orphan_file = re.search(r"Orphan file inode:\s+(\d+)", dumped)
    assert orphan_file, dumped
    ea_inodes = [ino for ino in range(12, 40) if _debugfs_inode(image, ino)[0] & EXT4_EA_INODE_FL]
    assert len(ea_inodes) == 1, ea_inodes
    return image, ea_inodes[0], int(orphan_file.group(1))


def _metadata_handles(root: Path, image: Path, ea_inode: int, orphan_file: int) -> list:
    real = name_to_handle(root / "file")
    seen = []
    for name, ino in (("EA inode", ea_inode), ("orphan file", orphan_file)):
        forged = real.forged(ino, _debugfs_inode(image, ino)[1])
        seen.append((name, _open_file(root, forged)))
    seen.append(("real file", _open_file(root, real)))
    return seen


def test_ea_inode_and_orphan_file_handles_are_stale_as_on_the_kernel(tmp_path: Path) -> None:
    skip_unless_possible()
    image, ea_inode, orphan_file = _metadata_inodes_image(tmp_path)
    with kernel_mount(image, tmp_path / "kmnt") as root:
        kernel_seen = _metadata_handles(root, image, ea_inode, orphan_file)
    mountpoint = tmp_path / "omnt"
    with served(image, mountpoint, ext4box_argv(image, mountpoint, "ro")) as handle:
        ours_seen = _metadata_handles(handle.mountpoint, image, ea_inode, orphan_file)
    assert ours_seen == kernel_seen
    assert kernel_seen == [("EA inode", "ESTALE"), ("orphan file", "ESTALE"),
                           ("real file", "content ok")]  # fmt: skip


def test_forged_node_ids_are_stale_logged_and_harmless(tmp_path: Path) -> None:
    """FUSE-only handles: node 2 would be a second node of the root, node 2^40 is no
    inode. Each is ESTALE with a stale_handle log line, and the server serves on."""
    skip_unless_possible()
    image = make_image(tmp_path / "base.img", 16)
    mountpoint = tmp_path / "omnt"
    with served(image, mountpoint, ext4box_argv(image, mountpoint, "rw")) as handle:
        root = handle.mountpoint
        (root / "file").write_bytes(CONTENT)
        real = name_to_handle(root / "file")
        assert real.handle_type == FUSE_FILEID
        _, generation = real.inode_and_generation()
        forged = {2: 0, 1 << 40: generation}
        seen = [_open_file(root, real.forged(node, gen)) for node, gen in forged.items()]
        still_serving = (root / "file").read_bytes() == CONTENT
        events = [json.loads(line) for line in handle.stderr_text().splitlines()
                  if line.startswith("{")]  # fmt: skip
    assert_fsck_clean(image)
    assert seen == ["ESTALE", "ESTALE"]
    assert still_serving
    logged = {e["node"] for e in events if e.get("event") == "stale_handle"}
    assert logged == set(forged)
