"""Larger workloads through `ext4box serve -o rw`: big directories, fragmented files,
a full filesystem, and a server killed in the middle of writing.

Sizes are kept to seconds of CI time; EXT4BOX_RW_STRESS_SCALE multiplies them.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rw_support import (
    assert_fsck_clean,
    fsck,
    kernel_view,
    make_image,
    rw_mount,
    skip_unless_possible,
)

from support.kernel import unmount
from support.serve import ext4box_argv, served

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

SCALE = max(1, int(os.environ.get("EXT4BOX_RW_STRESS_SCALE", "1")))


@pytest.fixture(autouse=True)
def _possible() -> None:
    skip_unless_possible()


def test_directory_stress(tmp_path: Path) -> None:
    """Thousands of creates and deletes in one directory (htree splits), e2fsck clean."""
    image = make_image(tmp_path / "dir.img", 64, "-N", str(20_000 * SCALE))
    count = 3000 * SCALE
    names = [f"entry-{i:06d}-{'x' * (i % 40)}" for i in range(count)]
    with rw_mount(image, tmp_path / "mnt") as handle:
        big = handle.mountpoint / "big"
        big.mkdir()
        for name in names:
            os.close(os.open(big / name, os.O_CREAT | os.O_WRONLY, 0o644))
        assert len(os.listdir(big)) == count
        rng = random.Random(1)
        removed = set(rng.sample(names, count * 2 // 3))
        for name in removed:
            os.unlink(big / name)
        for name in names[:50]:
            assert (big / name).exists() == (name not in removed)
        kept = sorted(set(names) - removed)
        assert sorted(os.listdir(big)) == kept
    assert_fsck_clean(image)
    with kernel_view(image, tmp_path / "kmnt") as root:
        assert sorted(os.listdir(root / "big")) == kept


def _extent_summary(image: Path, path: str) -> tuple[int, int]:
    """(number of leaf extents, tree depth) of a file, from debugfs."""
    out = subprocess.run(
        ["debugfs", "-R", f"ex {path}", str(image)], capture_output=True, text=True, check=True
    ).stdout
    # " 1/ 2   3/ 40  ..." : level / max level, entry / entries, ...
    levels = [
        (int(m.group(1)), int(m.group(2)))
        for line in out.splitlines()
        if (m := re.match(r"\s*(\d+)/\s*(\d+)\s", line))
    ]
    depth = max((total for _, total in levels), default=0)
    leaves = sum(1 for level, _ in levels if level == depth)
    return leaves, depth


def test_fragmented_file_then_truncate_in_steps(tmp_path: Path) -> None:
    """Random small writes to > 1000 extents (depth >= 2), then truncation in steps,
    content checked against a model after every step; e2fsck clean."""
    image = make_image(tmp_path / "frag.img", 64, "-b", "4096", "-O", "^has_journal")
    block = 4096
    slots = 1200 * SCALE  # every other block written: each write is its own extent
    rng = random.Random(7)
    order = list(range(slots))
    rng.shuffle(order)
    model = bytearray()
    with rw_mount(image, tmp_path / "mnt") as handle:
        path = handle.mountpoint / "frag"
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            for slot in order:
                offset = 2 * slot * block + rng.randrange(0, 64)
                data = rng.randbytes(rng.randrange(100, block - 64))
                os.pwrite(fd, data, offset)
                end = offset + len(data)
                if len(model) < end:
                    model.extend(bytes(end - len(model)))
                model[offset:end] = data
        finally:
            os.close(fd)
        assert path.read_bytes() == bytes(model)
    assert_fsck_clean(image)
    leaves, depth = _extent_summary(image, "/frag")
    assert leaves >= 1000 and depth >= 2, (leaves, depth)
    with rw_mount(image, tmp_path / "mnt") as handle:
        path = handle.mountpoint / "frag"
        size = len(model)
        while size > 0:
            size = max(0, size - rng.randrange(block, 400 * block) - rng.randrange(block))
            os.truncate(path, size)
            del model[size:]
            assert path.read_bytes() == bytes(model), f"content after truncate to {size}"
        assert os.stat(path).st_blocks == 0
    assert_fsck_clean(image)
    assert _extent_summary(image, "/frag") == (0, 0)


def test_enospc(tmp_path: Path) -> None:
    """Fill the filesystem: every error is ENOSPC, nothing written is damaged, and
    deleting gives the space back."""
    image = make_image(tmp_path / "full.img", 16, "-O", "^has_journal")
    chunk = 256 * 1024
    written: dict[str, bytes] = {}
    with rw_mount(image, tmp_path / "mnt") as handle:
        root = handle.mountpoint
        errors: list[int] = []
        for i in range(200):
            data = bytes([i % 251 + 1]) * chunk
            try:
                fd = os.open(root / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
            except OSError as exc:
                errors.append(exc.errno or 0)
                break
            try:
                done = os.write(fd, data)
                written[f"f{i}"] = data[:done]
            except OSError as exc:
                errors.append(exc.errno or 0)
                written[f"f{i}"] = b""
                break
            finally:
                os.close(fd)
        assert errors and set(errors) == {28}, errors  # ENOSPC
        for name, data in written.items():
            on_disk = (root / name).read_bytes()
            assert on_disk == data[: len(on_disk)] and len(on_disk) >= len(data) - chunk, name
        free_full = os.statvfs(root).f_bavail
        for name in list(written)[: len(written) // 2]:
            os.unlink(root / name)
            del written[name]
        # Freed blocks count as free once the metadata dropping them is
        # committed (fsync of the directory commits).
        dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dir_fd)
        os.close(dir_fd)
        assert os.statvfs(root).f_bavail > free_full
        (root / "again").write_bytes(b"a" * chunk)
        written["again"] = b"a" * chunk
    assert_fsck_clean(image)
    with kernel_view(image, tmp_path / "kmnt") as root:
        for name, data in written.items():
            on_disk = (root / name).read_bytes()
            assert on_disk == data[: len(on_disk)], name


_WORKLOAD = r"""
import os, sys
root = sys.argv[1]
i = 0
while True:
    i += 1
    name = os.path.join(root, f"w{i % 40:02d}")
    # every byte of file n is the byte n: foreign data is visible as another value
    tag = bytes([i % 40 + 1])
    try:
        if i % 3 == 0:
            os.unlink(name)
        else:
            with open(name, "ab") as f:
                f.write(tag * (4096 * (1 + i % 7)))
    except FileNotFoundError:
        pass
    if i % 25 == 0:
        print(i, flush=True)
"""


def test_kill_9_mid_workload(tmp_path: Path, record_property) -> None:
    """kill -9 of the server while a workload writes; e2fsck -fn afterwards.

    Without a journal some repair may be needed (its output is recorded as a
    test property for the report); what must never happen is a file showing
    another file's data.
    """
    image = make_image(tmp_path / "kill.img", 32, "-O", "^has_journal")
    mountpoint = tmp_path / "mnt"
    argv = ext4box_argv(image, mountpoint, "rw")
    with served(image, mountpoint, argv, expect_exit_zero=False) as handle:
        worker = subprocess.Popen(
            [sys.executable, "-c", _WORKLOAD, str(mountpoint)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert worker.stdout is not None
            # past a few commit intervals, so committed and uncommitted state mix
            deadline = time.monotonic() + 7
            progress = ""
            while time.monotonic() < deadline:
                progress = worker.stdout.readline().strip() or progress
            handle.process.kill()
            handle.process.wait()
        finally:
            worker.kill()
            worker.wait()
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    result = fsck(image)
    record_property("kill9_iterations", progress)
    record_property("kill9_e2fsck_exit", result.returncode)
    record_property("kill9_e2fsck_output", result.stdout[-3000:])
    print(f"kill -9 after {progress} iterations: e2fsck -fn exit {result.returncode}")
    print(result.stdout)
    repaired = tmp_path / "repaired.img"
    shutil.copyfile(image, repaired)
    fix = subprocess.run(["e2fsck", "-fy", str(repaired)], capture_output=True, text=True)
    assert fix.returncode in (0, 1), fix.stdout
    assert_fsck_clean(repaired)
    with kernel_view(repaired, tmp_path / "kmnt") as root:
        for entry in os.scandir(root):
            if not entry.name.startswith("w") or not entry.is_file():
                continue
            tag = int(entry.name[1:]) + 1
            foreign = set(Path(entry.path).read_bytes()) - {0, tag}
            assert not foreign, f"{entry.name} holds bytes {sorted(foreign)} of other files"
    if os.path.ismount(mountpoint):
        unmount(mountpoint)


def test_fsync_and_commit_timer_survive_kill_9(tmp_path: Path) -> None:
    """What fsync returned for, and what the 5 s commit timer covered, is on the
    image when the server dies without warning."""
    image = make_image(tmp_path / "durable.img", 32, "-O", "^has_journal")
    mountpoint = tmp_path / "mnt"
    argv = ext4box_argv(image, mountpoint, "rw")
    with served(image, mountpoint, argv, expect_exit_zero=False) as handle:
        root = handle.mountpoint
        fd = os.open(root / "synced", os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, b"s" * 100_000)
        os.fsync(fd)
        os.close(fd)
        (root / "timed").write_bytes(b"t" * 50_000)
        (root / "dir").mkdir()
        time.sleep(7)  # more than one commit interval
        handle.process.kill()
        handle.process.wait()
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    assert_fsck_clean(image)
    with kernel_view(image, tmp_path / "kmnt") as root:
        assert (root / "synced").read_bytes() == b"s" * 100_000
        assert (root / "timed").read_bytes() == b"t" * 50_000
        assert (root / "dir").is_dir()


def test_sigterm_unmounts_cleanly(tmp_path: Path) -> None:
    """SIGTERM: the server unmounts, commits and marks the image clean (exit 0)."""
    image = make_image(tmp_path / "term.img", 32, "-O", "^has_journal")
    mountpoint = tmp_path / "mnt"
    argv = ext4box_argv(image, mountpoint, "rw")
    with served(image, mountpoint, argv, expect_exit_zero=False) as handle:
        (handle.mountpoint / "f").write_bytes(b"f" * 5000)
        handle.process.terminate()
        assert handle.process.wait(timeout=30) == 0
    state = subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"Filesystem state:\s+clean$", state, re.M), state
    assert_fsck_clean(image)
    with kernel_view(image, tmp_path / "kmnt") as root:
        assert (root / "f").read_bytes() == b"f" * 5000
