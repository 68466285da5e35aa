"""Reads move atime as the kernel's ext4 moves it, under each atime mount option
(issue 18 item 4, fstests generic/003).

The same steps run on a kernel rw loop mount and on `ext4box serve -o rw` of
copies of one image, under relatime (the default), strictatime, noatime,
nodiratime and strictatime,nodiratime. What is compared is the rule, not the
timestamp: for each read, "atime moved to the time of the read" or "atime
kept". Exact equality is impossible: the two sides' clocks differ (the
kernel's is coarse, ours is the server's), and a FUSE server only sees reads
that reach it. So every read here is one that reaches the server whenever
the kernel's ext4 would move atime:

- each file read is a fresh open (the server drops the page cache at an open
  whose next read must move atime, so that read arrives as a READ); a second
  read through the same descriptor, served from the page cache, is not a
  step (under strictatime the kernel moves atime there and we cannot: the
  difference docs/status.md states);
- O_DIRECT reads always reach the server;
- every directory listing (getdents) arrives as READDIR; a readlink of a new
  symlink as READLINK.

Between steps the clock moves past the kernel's coarse tick, so "the time
stored already is now" (no update under strictatime) never decides a step.
The 24-hour rule uses a file whose atime, mtime and ctime debugfs set days
back. Afterwards the ext4box image passes `e2fsck -fn`, and a kernel mount of
it shows the atimes the ext4box mount showed (they went through the journal).
fstests generic/003's own steps, with a fresh mount per option, are run on
both as well; a read-only mount must leave its image byte for byte; and the
mount's own atime flags must move nothing (the kernel leaves atime to us).
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import pytest
from rw_support import assert_fsck_clean, make_image, skip_unless_possible

from ext4box.fuse.atime import AtimeMode, take_atime_options
from support.kernel import kernel_mount
from support.serve import ext4box_argv, fuse_backend, served

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

NS = 1_000_000_000
# The kernel stamps times from a coarse clock (a tick of up to 10 ms).
CLOCK_TICK_NS = 20_000_000
HOUR_NS = 3600 * NS
DAY_S = 24 * 3600
BLOCK = 4096
# Files and directories the scenario reads; `_last_atimes` reports these.
READ_PATHS = ("fresh", "old", "flagged", "d", "link")

Scenario = Callable[[Path], list[tuple[str, str]]]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    skip_unless_possible()
    if shutil.which("debugfs") is None or shutil.which("chattr") is None:
        pytest.skip("needs debugfs and chattr (e2fsprogs)")
    tmp = tmp_path_factory.mktemp("atime")
    tree = tmp / "tree"
    (tree / "d").mkdir(parents=True)
    for name in ("fresh", "old", "flagged"):
        (tree / name).write_bytes(name.encode() * (BLOCK // len(name) + 1))
    (tree / "d" / "entry").write_bytes(b"x")
    path = make_image(tmp / "atime.img", 32, "-b", "4096", "-I", "256", root=tree)
    # "old": atime two days back, and after mtime and ctime (three days
    # back): only the 24-hour rule makes relatime update it.
    now_s = time.time_ns() // NS
    for field, days in (("atime", 2), ("mtime", 3), ("ctime", 3)):
        subprocess.run(["debugfs", "-w", "-R", f"sif /old {field} @{now_s - days * DAY_S}",
                        str(path)], check=True, capture_output=True)  # fmt: skip
    return path


def _after_a_tick() -> int:
    """Let both clocks move past the kernel's coarse tick; the time then."""
    start = time.time_ns()
    while time.time_ns() < start + CLOCK_TICK_NS:
        time.sleep(0.005)
    return time.time_ns()


def _verdict(before_ns: int, after_ns: int, read_at_ns: int) -> str:
    if after_ns == before_ns:
        return "kept"
    if after_ns >= read_at_ns - CLOCK_TICK_NS:
        return "moved to the read's time"
    return f"moved elsewhere ({after_ns - read_at_ns} ns from the read)"


def _step(label: str, path: Path, read: Callable[[], object]) -> tuple[str, str]:
    before = os.lstat(path).st_atime_ns
    at = _after_a_tick()
    read()
    return label, _verdict(before, os.lstat(path).st_atime_ns, at)


def _read_fresh_open(path: Path) -> None:
    with path.open("rb") as f:
        assert f.read()


def _read_direct(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, BLOCK) as buffer:  # page-aligned, as O_DIRECT wants
            assert os.preadv(fd, [buffer], 0) == BLOCK
    finally:
        os.close(fd)


def _chattr_reaches_the_server() -> bool:
    """pyfuse3 has no FUSE_IOCTL: chattr works on the native transport only."""
    if fuse_backend() == "native":
        return True
    print("chattr +A step left out: the pyfuse3 backend has no FUSE_IOCTL")
    return False


def _scenario(root: Path) -> list[tuple[str, str]]:
    fresh, old, flagged, d = root / "fresh", root / "old", root / "flagged", root / "d"
    with_flag = _chattr_reaches_the_server()
    if with_flag:
        subprocess.run(["chattr", "+A", str(flagged)], check=True)
    now = time.time_ns()
    # atime before mtime: relatime's first rule.
    for path in (fresh, flagged, d):
        os.utime(path, ns=(now - HOUR_NS, now - HOUR_NS // 2))
    obs = [
        _step("file, atime <= mtime", fresh, lambda: _read_fresh_open(fresh)),
        _step("same file, again", fresh, lambda: _read_fresh_open(fresh)),
        _step("same file, O_DIRECT", fresh, lambda: _read_direct(fresh)),
        _step("same file, O_DIRECT again", fresh, lambda: _read_direct(fresh)),
        _step("file, atime a day old", old, lambda: _read_fresh_open(old)),
        *([_step("file with chattr +A", flagged, lambda: _read_fresh_open(flagged))]
          if with_flag else []),
        _step("directory, atime <= mtime", d, lambda: os.listdir(d)),
        _step("same directory, again", d, lambda: os.listdir(d)),
    ]
    os.symlink("fresh", root / "link")
    obs.append(_step("new symlink, readlink", root / "link",
                     lambda: os.readlink(root / "link")))  # fmt: skip
    return obs


def _last_atimes(root: Path) -> dict[str, int]:
    return {name: os.lstat(root / name).st_atime_ns for name in READ_PATHS}


def _on_kernel(image: Path, tmp: Path, options: str) -> list[tuple[str, str]]:
    with kernel_mount(image, tmp / "kmnt", readonly=False, options=options) as root:
        return _scenario(root)


def _on_ext4box(image: Path, tmp: Path, options: str) -> tuple[list, dict[str, int]]:
    mnt = tmp / "omnt"
    with served(image, mnt, ext4box_argv(image, mnt, f"rw,{options}")) as handle:
        obs = _scenario(handle.mountpoint)
        shown = _last_atimes(handle.mountpoint)
    return obs, shown


@pytest.mark.parametrize(
    "options", ["relatime", "strictatime", "noatime", "nodiratime", "strictatime,nodiratime"]
)
def test_reads_move_atime_as_the_kernel(tmp_path: Path, image: Path, options: str) -> None:
    kernel_image, ours_image = tmp_path / "kernel.img", tmp_path / "ext4box.img"
    shutil.copyfile(image, kernel_image)
    shutil.copyfile(image, ours_image)
    expected = _on_kernel(kernel_image, tmp_path, options)
    observed, shown = _on_ext4box(ours_image, tmp_path, options)
    differences = [f"{k[0]}: kernel {k[1]}, ext4box {o[1]}"
                   for k, o in zip(expected, observed, strict=True) if k != o]  # fmt: skip
    assert not differences, "\n".join(differences)
    assert_fsck_clean(kernel_image)
    assert_fsck_clean(ours_image)
    # What the mount showed is what it wrote.
    with kernel_mount(ours_image, tmp_path / "vmnt") as root:
        assert _last_atimes(root) == shown
    # The comparison means something only if the kernel did move atime.
    if options != "noatime":
        assert ("moved to the read's time" in {verdict for _, verdict in expected}), expected


def test_read_only_mount_never_writes(tmp_path: Path, image: Path) -> None:
    """Reads that would move atime on a rw mount (atime <= mtime, strictatime)
    leave a read-only mount's image byte for byte as it was."""
    prepared = tmp_path / "prepared.img"
    shutil.copyfile(image, prepared)
    mnt = tmp_path / "rw"
    with served(prepared, mnt, ext4box_argv(prepared, mnt, "rw")) as handle:
        now = time.time_ns()
        for name in ("fresh", "d"):
            os.utime(handle.mountpoint / name, ns=(now - HOUR_NS, now - HOUR_NS // 2))
    before = prepared.read_bytes()
    for options in ("ro", "ro,strictatime"):
        mnt = tmp_path / options.replace(",", "-")
        with served(prepared, mnt, ext4box_argv(prepared, mnt, options)) as handle:
            root = handle.mountpoint
            atime = os.stat(root / "fresh").st_atime_ns
            _after_a_tick()
            _read_fresh_open(root / "fresh")
            _read_direct(root / "fresh")
            os.listdir(root / "d")
            assert os.stat(root / "fresh").st_atime_ns == atime
        assert prepared.read_bytes() == before, f"-o {options} changed the image"


def test_the_kernel_never_moves_atime_on_a_fuse_mount(tmp_path: Path, image: Path) -> None:
    """The mount's own atime flags do nothing on FUSE: its inodes are S_NOATIME,
    so only the server moves atime. Served with -o noatime (the server never
    moves it), the mount is switched to strictatime by a bind remount (a VFS
    change the server never hears of): a read still leaves atime alone."""
    served_image = tmp_path / "vfs.img"
    shutil.copyfile(image, served_image)
    mnt = tmp_path / "mnt"
    with served(served_image, mnt, ext4box_argv(served_image, mnt, "rw,noatime")) as handle:
        root = handle.mountpoint
        subprocess.run(["mount", "-o", "remount,bind,strictatime", str(root)], check=True)
        flags = next(line.split()[5] for line in Path("/proc/self/mountinfo").read_text()
                     .splitlines() if line.split()[4] == str(root))  # fmt: skip
        assert "noatime" not in flags.split(","), flags  # the VFS would update now
        now = time.time_ns()
        os.utime(root / "fresh", ns=(now - HOUR_NS, now - HOUR_NS // 2))
        step = _step("read under the VFS's strictatime", root / "fresh",
                     lambda: _read_fresh_open(root / "fresh"))  # fmt: skip
        assert step[1] == "kept"
    assert_fsck_clean(served_image)


# -- fstests generic/003, step by step -----------------------------------------

MountAt = Callable[[str], AbstractContextManager[Path]]


def _times(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def _changed(before: tuple[int, int, int], after: tuple[int, int, int]) -> str:
    """generic/003's notation: Y or N for atime, mtime and ctime."""
    return "".join("Y" if b != a else "N" for b, a in zip(before, after, strict=True))


def _generic_003(mount_at: MountAt) -> list[tuple[str, str]]:
    """generic/003's steps (its one-second sleeps are clock ticks here: both
    sides keep nanoseconds). `mount_at(options)` unmounts what was mounted
    and mounts the image again with `options`."""
    obs: list[tuple[str, str]] = []
    with ExitStack() as stack:

        def cycle(options: str) -> Path:
            stack.close()
            return stack.enter_context(mount_at(options))

        def check(step: str, path: Path, before: tuple[int, int, int]) -> tuple[int, int, int]:
            after = _times(path)
            obs.append((step, _changed(before, after)))
            return after

        root = cycle("relatime")
        (root / "dir1").mkdir()
        file1 = root / "dir1" / "file1"
        file1.write_bytes(b"aaa\n")
        stat1 = _times(file1)
        _after_a_tick()
        _read_fresh_open(file1)
        stat1 = check("file1, first read", file1, stat1)
        _after_a_tick()
        _read_fresh_open(file1)
        stat1 = check("file1, second read", file1, stat1)
        root = cycle("nodiratime")
        stat1 = check("file1 after remount", root / "dir1" / "file1", stat1)
        dir2 = root / "dir2"
        dir2.mkdir()
        stat_dir2 = _times(dir2)
        _after_a_tick()
        (dir2 / "file2").write_bytes(b"bbb\n")
        stat_dir2 = check("dir2 after a file is created in it", dir2, stat_dir2)
        stat2 = _times(dir2 / "file2")
        _after_a_tick()
        _read_fresh_open(dir2 / "file2")
        check("file2, first read", dir2 / "file2", stat2)
        check("dir2 after file2 is read", dir2, stat_dir2)
        root = cycle("noatime")
        file3 = root / "dir2" / "file3"
        file3.write_bytes(b"ccc\n")
        stat3 = _times(file3)
        _after_a_tick()
        _read_fresh_open(file3)
        stat3 = check("file3, first read (noatime)", file3, stat3)
        file1 = root / "dir1" / "file1"
        stat1 = _times(file1)
        _after_a_tick()
        file1.write_bytes(b"xyz\n")
        stat1 = check("file1 rewritten (noatime)", file1, stat1)
        _after_a_tick()
        file1.rename(root / "dir1" / "file1_renamed")
        check("file1 renamed", root / "dir1" / "file1_renamed", stat1)
        root = cycle("strictatime")
        file3 = root / "dir2" / "file3"
        _read_fresh_open(file3)
        stat3 = check("file3, second read (strictatime)", file3, stat3)
        _after_a_tick()
        _read_fresh_open(file3)
        stat3 = check("file3, third read (strictatime)", file3, stat3)
        stat_dir2 = _times(root / "dir2")
        _after_a_tick()
        root = cycle("ro,strictatime")
        os.listdir(root / "dir2")
        _read_fresh_open(root / "dir2" / "file3")
        check("dir2, read-only mount", root / "dir2", stat_dir2)
        check("file3, read-only mount", root / "dir2" / "file3", stat3)
    return obs


# What generic/003 expects, step by step (the kernel is checked against it too).
GENERIC_003 = ["YNN", "NNN", "NNN", "NYY", "YNN", "NNN", "NNN", "NYY", "NNY", "YNN", "YNN",
               "NNN", "NNN"]  # fmt: skip


def test_generic_003_as_the_kernel(tmp_path: Path, image: Path) -> None:
    """fstests generic/003 (relatime, nodiratime, noatime, strictatime and a
    read-only strictatime mount, each a fresh mount of the same image) gives
    the kernel's answers on ext4box."""
    kernel_image, ours_image = tmp_path / "kernel.img", tmp_path / "ext4box.img"
    shutil.copyfile(image, kernel_image)
    shutil.copyfile(image, ours_image)

    def kernel_at(options: str) -> AbstractContextManager[Path]:
        readonly = options.startswith("ro,")
        return kernel_mount(kernel_image, tmp_path / "kmnt", readonly=readonly,
                            options=options.removeprefix("ro,"))  # fmt: skip

    @contextmanager
    def ours_at(options: str) -> Iterator[Path]:
        mnt = tmp_path / "omnt"
        opts = options if options.startswith("ro,") else f"rw,{options}"
        with served(ours_image, mnt, ext4box_argv(ours_image, mnt, opts)) as handle:
            yield handle.mountpoint

    expected = _generic_003(kernel_at)
    assert [changed for _, changed in expected] == GENERIC_003, expected
    observed = _generic_003(ours_at)
    differences = [f"{k[0]}: kernel {k[1]}, ext4box {o[1]}"
                   for k, o in zip(expected, observed, strict=True) if k != o]  # fmt: skip
    assert not differences, "\n".join(differences)
    assert_fsck_clean(kernel_image)
    assert_fsck_clean(ours_image)


def test_small_inodes_keep_whole_seconds(tmp_path: Path) -> None:
    """128-byte inodes have no i_atime_extra: the kernel's ext4 stamps whole
    seconds there, and so must ext4box, in what it shows and what it writes."""
    skip_unless_possible()
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"small inode" * 100)
    image = make_image(tmp_path / "small.img", 32, "-I", "128", root=tree)
    kernel_image = tmp_path / "kernel.img"
    shutil.copyfile(image, kernel_image)

    def scenario(root: Path) -> tuple[str, int]:
        os.utime(root / "f", (1000, 2000))  # atime before mtime: relatime moves it
        at = time.time_ns()
        _read_fresh_open(root / "f")
        atime = os.stat(root / "f").st_atime_ns
        moved = "moved" if at - NS - CLOCK_TICK_NS <= atime else f"atime {atime}"
        return moved, atime % NS

    with kernel_mount(kernel_image, tmp_path / "kmnt", readonly=False) as root:
        expected = scenario(root)
    mnt = tmp_path / "omnt"
    with served(image, mnt, ext4box_argv(image, mnt, "rw")) as handle:
        observed = scenario(handle.mountpoint)
        shown = os.stat(handle.mountpoint / "f").st_atime_ns
    assert observed == expected == ("moved", 0)
    assert_fsck_clean(image)
    with kernel_mount(image, tmp_path / "vmnt") as root:
        assert os.stat(root / "f").st_atime_ns == shown


# -- option precedence ---------------------------------------------------------

OPTION_STRINGS = [
    "relatime", "norelatime", "strictatime", "nostrictatime", "noatime", "atime",
    "nodiratime", "diratime", "lazytime", "noatime,strictatime", "strictatime,noatime",
    "noatime,atime", "atime,noatime", "strictatime,relatime", "strictatime,norelatime",
    "strictatime,nostrictatime", "noatime,relatime", "nodiratime,diratime",
    "strictatime,nodiratime", "noatime,nodiratime",
]  # fmt: skip


def _kernel_atime_rule(image: Path, mountpoint: Path, options: str) -> tuple[AtimeMode, bool]:
    """What the kernel made of `options`: the mount's own flags, read back."""
    with kernel_mount(image, mountpoint, options=options) as root:
        flags = next(line.split()[5] for line in Path("/proc/self/mountinfo").read_text()
                     .splitlines() if line.split()[4] == str(root)).split(",")  # fmt: skip
    if "noatime" in flags:
        mode = AtimeMode.NOATIME
    elif "relatime" in flags:
        mode = AtimeMode.RELATIME
    else:
        mode = AtimeMode.STRICTATIME
    return mode, "nodiratime" in flags


@pytest.mark.parametrize("options", OPTION_STRINGS)
def test_atime_options_combine_as_the_kernels(tmp_path: Path, image: Path, options: str) -> None:
    policy, rest = take_atime_options(options.split(","))
    assert rest == []
    kernel = _kernel_atime_rule(image, tmp_path / "kmnt", options)
    assert (policy.mode, policy.nodiratime) == kernel
