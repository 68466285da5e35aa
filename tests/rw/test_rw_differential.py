"""Differential test: one random operation sequence, kernel ext4 vs ext4box, step by step.

A hypothesis state machine applies every step to a kernel rw loop mount and to
an `ext4box serve -o rw` mount of identical fresh images, and insists on the
same outcome (value or errno) each time. At the end both trees must walk the
same (names, types, modes, owners, sizes, blocks, content hashes, xattrs,
link counts, symlink targets; not times or inode numbers), both images must
pass `e2fsck -fn`, and the kernel's view of the ext4box image must match what
the ext4box mount showed.

Besides the namespace, data and attribute operations, the steps include
fallocate in every mode the kernel's FUSE forwards (default, KEEP_SIZE,
PUNCH_HOLE, ZERO_RANGE), SEEK_DATA/SEEK_HOLE maps (taken after fsync with the
file's pages dropped: the kernel's ext4 counts a cached page over an unwritten
extent as data, which a FUSE server cannot see), copy_file_range between any
two paths, truncates, which then cross unwritten extents, stores through a
shared mapping (msync), and aligned O_DIRECT writes and reads. pyfuse3 has no
fallocate, lseek or copy_file_range handlers, so on EXT4BOX_TEST_BACKEND=pyfuse3
those three rules are left out (the kernel answers EOPNOTSUPP there).

Cost: EXT4BOX_DIFF_EXAMPLES (default 6) sequences of EXT4BOX_DIFF_STEPS
(default 300) steps. Set EXT4BOX_DIFF_STEPS=3000 for a long run, and
EXT4BOX_DIFF_SHRINK=1 to let hypothesis minimise a failing sequence.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from rw_support import (
    ACL_MINIMAL,
    ACL_NAMED_USER,
    NONDETERMINISTIC,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    assert_fsck_clean,
    attempt,
    kernel_walk,
    make_image,
    renameat2,
    rw_mount,
    skip_unless_possible,
    strip,
    syncfs,
    tree_differences,
)

from support.fileops import truncate_by_fd
from support.kernel import kernel_mount
from support.serve import fuse_backend
from support.walk import walk

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

EXAMPLES = int(os.environ.get("EXT4BOX_DIFF_EXAMPLES", "6"))
STEPS = int(os.environ.get("EXT4BOX_DIFF_STEPS", "300"))
SHRINK = os.environ.get("EXT4BOX_DIFF_SHRINK") == "1"

DIRS = ("", "d0", "d1", "d0/d2")
NAMES = ("f0", "f1", "f2", "d0", "d1", "d2", "s0")
MODES = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2775, 0o1777, 0o000, 0o640])
# Relative targets only: nothing may lead outside the mount.
# Lengths around the 60-byte fast-symlink limit and a slow one, mostly resolvable.
TARGETS = st.sampled_from(
    ["f0", "f1", "d0", "d1", "nowhere", "./" * 29 + "f0", "./" * 30 + "f1", "./" * 100 + "d0"]
)
XATTR_NAMES = st.sampled_from(["user.a", "user.b", "user.long" + "x" * 40, "trusted.t"])
OFFSETS = st.one_of(
    st.integers(0, 20_000),
    st.integers(0, 512).map(lambda b: b * 4096),
    st.integers(0, 8 * 1024 * 1024),
)
RENAME_FLAGS = st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
SIZES = st.one_of(st.integers(0, 10_000), st.integers(0, 3 * 1024 * 1024))
# fallocate modes fs/fuse forwards: none, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE,
# ZERO_RANGE, ZERO_RANGE|KEEP_SIZE (and PUNCH_HOLE alone, EOPNOTSUPP on both).
FALLOCATE_MODES = st.sampled_from([0, 0x01, 0x03, 0x03, 0x10, 0x11, 0x02])
# The backend under test answers FALLOCATE, LSEEK and COPY_FILE_RANGE.
RANGE_OPS = fuse_backend() == "native"
LENGTHS = st.one_of(st.integers(1, 20_000), st.integers(1, 256).map(lambda b: b * 4096))


@dataclass(frozen=True)
class Pick:
    """A path choice resolved against the current tree: mostly an existing entry
    (or a new name in an existing directory), sometimes any path of the pool,
    so that both the success and the error paths get exercised."""

    kind: int  # 0: any pool path, 1-3: existing entry, 4-5: a name in an existing dir
    index: int
    name: str


PICK = st.builds(Pick, st.integers(0, 5), st.integers(0, 10_000), st.sampled_from(NAMES))


# Times and inode numbers come from each side's clock and allocator. st_blocks
# too: the kernel allocates at writeback (delayed allocation, per-inode
# preallocation), so files appended to in turns stay contiguous there, while an
# allocate-on-write implementation may split them into more extents and need
# an extent block the kernel does not. Those differences are counted, not failed.
IGNORED = NONDETERMINISTIC | {"blocks"}


def _block_differences(kroot: Path, oroot: Path) -> int:
    count = 0
    for parent, dirnames, filenames in os.walk(kroot):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(parent, name), kroot)
            try:
                ours = os.lstat(oroot / rel).st_blocks
            except OSError:
                continue
            count += os.lstat(os.path.join(parent, name)).st_blocks != ours
    return count


def _payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _create(path: Path, mode: int) -> str:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, mode))
    return "ok"


def _write(path: Path, offset: int, data: bytes, append: bool) -> int:
    fd = os.open(path, os.O_WRONLY | (os.O_APPEND if append else 0))
    try:
        return os.write(fd, data) if append else os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(path: Path, mode: int, offset: int, length: int) -> str:
    fd = os.open(path, os.O_WRONLY)
    try:
        if _libc.fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
    return "ok"


def _seek_map(path: Path) -> list[tuple[int, int]]:
    """(data, hole) pairs by SEEK_DATA/SEEK_HOLE, in the state a later mount sees."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        pairs, pos = [], 0
        for _ in range(100_000):
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                return pairs
            pos = os.lseek(fd, data, os.SEEK_HOLE)
            pairs.append((data, pos))
        raise AssertionError(f"{path}: SEEK_DATA/SEEK_HOLE never reached the end")
    finally:
        os.close(fd)


def _copy_range(src: Path, dst: Path, src_pos: int, dst_pos: int, length: int) -> int:
    fd_in = os.open(src, os.O_RDONLY)
    try:
        fd_out = os.open(dst, os.O_WRONLY)
        try:
            return os.copy_file_range(fd_in, fd_out, length, src_pos, dst_pos)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _mmap_write(path: Path, offset: int, data: bytes) -> str:
    """Store `data` at `offset` (clipped to the file) through a shared mapping, then msync."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return "empty"  # nothing to map
        offset %= size
        data = data[: size - offset]
        with mmap.mmap(fd, size) as mapped:
            mapped[offset : offset + len(data)] = data
            mapped.flush()  # msync(MS_SYNC)
        return f"{len(data)} stored"
    finally:
        os.close(fd)


def _direct_io(path: Path, block: int, count: int, seed: int) -> tuple[int, str]:
    """An O_DIRECT write of `count` aligned 4 KiB blocks at block `block`, then an
    O_DIRECT read of them back (aligned, so both sides accept the request)."""
    length = count * 4096
    buffer = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
    try:
        buffer[:] = _payload(seed, length)
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            written = os.pwritev(fd, [buffer], block * 4096)
            buffer[:] = bytes(length)
            read = os.preadv(fd, [buffer], block * 4096)
        finally:
            os.close(fd)
        return written, f"{read} {hashlib.sha256(buffer[:read]).hexdigest()[:16]}"
    finally:
        buffer.close()


def _within(inner: list[tuple[int, int]], outer: list[tuple[int, int]]) -> bool:
    """Every range of `inner` lies inside one range of `outer` (both sorted, disjoint)."""
    return all(any(start >= o_start and end <= o_end for o_start, o_end in outer)
               for start, end in inner)  # fmt: skip


def _read_hash(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _stat(path: Path) -> tuple[int, int, int, int, int]:
    # Not st_blocks: before writeback the kernel's counts delayed-allocation
    # reservations (compared at the end, after syncfs).
    st_ = os.lstat(path)
    return (st_.st_mode, st_.st_nlink, st_.st_uid, st_.st_gid, st_.st_size)


class KernelVsExt4box(RuleBasedStateMachine):
    workdir: Path  # set by the test before the machine runs
    mkfs_args: tuple[str, ...] = ()  # image variant (a sibling machine sets its own)
    mount_options: tuple[str, ...] = ()  # more ext4box -o options (likewise)
    steps_run: list[int] = []  # steps of each finished sequence, for the report
    outcomes: dict[str, int] = {}  # "ok" or errno name -> count, over all sequences
    block_differences = 0  # entries whose st_blocks differ (reported, not failed)
    seek_differences = 0  # data maps where the kernel zeroed out more (see seek_map)

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diff-", dir=self.workdir))
        self.steps = 0
        self.outcomes: dict[str, int] = {}
        base = make_image(self.dir / "base.img", 48, *self.mkfs_args)
        self.kernel_image = self.dir / "kernel.img"
        self.ours_image = self.dir / "ext4box.img"
        shutil.copyfile(base, self.kernel_image)
        shutil.copyfile(base, self.ours_image)
        base.unlink()
        self._kernel_cm = kernel_mount(self.kernel_image, self.dir / "kmnt", readonly=False)
        self.kroot = self._kernel_cm.__enter__()
        try:
            self._ours_cm = rw_mount(self.ours_image, self.dir / "omnt", *self.mount_options)
            self.oroot = self._ours_cm.__enter__().mountpoint
        except BaseException:
            self._kernel_cm.__exit__(None, None, None)
            raise

    def resolve(self, pick: Pick) -> str:
        pool = [f"{d}/{n}" if d else n for d in DIRS for n in NAMES]
        entries: list[str] = []
        dirs = [""]
        for parent, dirnames, filenames in os.walk(self.kroot):
            rel = os.path.relpath(parent, self.kroot)
            rel = "" if rel == "." else rel
            for name in dirnames + filenames:
                if rel == "" and name == "lost+found":
                    continue
                entries.append(f"{rel}/{name}" if rel else name)
            dirnames[:] = [d for d in dirnames if not (rel == "" and d == "lost+found")]
            dirs.extend(f"{rel}/{d}" if rel else d for d in dirnames)
        if pick.kind == 0:
            return pool[pick.index % len(pool)]
        if pick.kind >= 4 or not entries:
            parent = sorted(dirs)[pick.index % len(dirs)]
            return f"{parent}/{pick.name}" if parent else pick.name
        return sorted(entries)[pick.index % len(entries)]

    def both(self, func, *paths: str, **kwargs: object) -> object:
        """Apply func to the same paths under both roots; the outcomes must agree."""
        self.steps += 1
        k = attempt(func, *[self.kroot / p for p in paths], **kwargs)
        o = attempt(func, *[self.oroot / p for p in paths], **kwargs)
        shown = {n: (f"<{len(v)} bytes>" if isinstance(v, bytes) else v) for n, v in kwargs.items()}
        step = f"step {self.steps} {func.__name__}{paths} {shown}"
        assert o == k, f"{step}: kernel={k!r:.300} ext4box={o!r:.300}"
        outcome = o if isinstance(o, str) and o.isupper() else "ok"
        if os.environ.get("EXT4BOX_DIFF_TRACE"):
            print(step, o)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        return o

    # -- namespace ---------------------------------------------------------

    @rule(path_pick=PICK, mode=MODES)
    def create(self, path_pick: Pick, mode: int) -> None:
        path = self.resolve(path_pick)
        self.both(_create, path, mode=mode)

    @rule(path_pick=PICK, mode=MODES)
    def mkdir(self, path_pick: Pick, mode: int) -> None:
        path = self.resolve(path_pick)
        self.both(os.mkdir, path, mode=mode)

    @rule(path_pick=PICK)
    def rmdir(self, path_pick: Pick) -> None:
        path = self.resolve(path_pick)
        self.both(os.rmdir, path)

    @rule(path_pick=PICK)
    def unlink(self, path_pick: Pick) -> None:
        path = self.resolve(path_pick)
        self.both(os.unlink, path)

    @rule(src_pick=PICK, dst_pick=PICK, flags=RENAME_FLAGS)
    def rename(self, src_pick: Pick, dst_pick: Pick, flags: int) -> None:
        src = self.resolve(src_pick)
        dst = self.resolve(dst_pick)
        self.both(renameat2, src, dst, flags=flags)

    @rule(src_pick=PICK, dst_pick=PICK)
    def link(self, src_pick: Pick, dst_pick: Pick) -> None:
        src = self.resolve(src_pick)
        dst = self.resolve(dst_pick)
        self.both(os.link, src, dst, follow_symlinks=False)

    @rule(link_to=TARGETS, path_pick=PICK)
    def symlink(self, link_to: str, path_pick: Pick) -> None:
        path = self.resolve(path_pick)
        self.steps += 1
        k = attempt(os.symlink, link_to, self.kroot / path)
        o = attempt(os.symlink, link_to, self.oroot / path)
        assert o == k, f"step {self.steps} symlink {link_to!r} {path}: kernel={k!r} ext4box={o!r}"

    # -- data --------------------------------------------------------------

    @rule(path_pick=PICK, offset=OFFSETS, size=st.integers(1, 40_000), seed=st.integers(0, 2**16))
    def write(self, path_pick: Pick, offset: int, size: int, seed: int) -> None:
        path = self.resolve(path_pick)
        self.both(_write, path, offset=offset, data=_payload(seed, size), append=False)

    @rule(path_pick=PICK, size=st.integers(1, 9000), seed=st.integers(0, 2**16))
    def append(self, path_pick: Pick, size: int, seed: int) -> None:
        path = self.resolve(path_pick)
        self.both(_write, path, offset=0, data=_payload(seed, size), append=True)

    @rule(path_pick=PICK, size=SIZES)
    def truncate(self, path_pick: Pick, size: int) -> None:
        path = self.resolve(path_pick)
        self.both(truncate_by_fd, path, length=size)

    @precondition(lambda self: RANGE_OPS)
    @rule(path_pick=PICK, mode=FALLOCATE_MODES, offset=OFFSETS, length=LENGTHS)
    def fallocate(self, path_pick: Pick, mode: int, offset: int, length: int) -> None:
        path = self.resolve(path_pick)
        self.both(_fallocate, path, mode=mode, offset=offset, length=length)

    @precondition(lambda self: RANGE_OPS)
    @rule(path_pick=PICK)
    def seek_map(self, path_pick: Pick) -> None:
        """Data maps agree, except that the kernel may report more data.

        Seen once in ~80 sequences (1 KiB blocks, after mmap, O_DIRECT and
        copy steps over fallocated ranges): the kernel's ext4 reported a
        64 KiB-aligned range as data where ext4box has unwritten blocks, with
        equal contents. The cause is not established: a cached large folio the
        fadvise could not drop, or ext4 writing zeros over small unwritten
        neighbours instead of splitting an extent (extent_max_zeroout_kb),
        which ext4box never does. Either way ext4box's data must lie within the
        kernel's; wider kernel maps are counted (seek_differences), not failed.
        """
        path = self.resolve(path_pick)
        self.steps += 1
        kernel = attempt(_seek_map, self.kroot / path)
        ours = attempt(_seek_map, self.oroot / path)
        step = f"step {self.steps} seek_map {path}"
        if isinstance(kernel, list) and isinstance(ours, list):
            assert _within(ours, kernel), f"{step}: kernel={kernel!r:.600} ext4box={ours!r:.600}"
            if ours != kernel:
                type(self).seek_differences += 1
                print(f"{step}: wider on the kernel: kernel={kernel!r:.600} ext4box={ours!r:.600}")
        else:
            assert ours == kernel, f"{step}: kernel={kernel!r:.300} ext4box={ours!r:.300}"
        outcome = ours if isinstance(ours, str) else "ok"
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    @precondition(lambda self: RANGE_OPS)
    @rule(src_pick=PICK, dst_pick=PICK, src_pos=OFFSETS, dst_pos=OFFSETS, length=LENGTHS)
    def copy_file_range(self, src_pick: Pick, dst_pick: Pick, src_pos: int, dst_pos: int,
                        length: int) -> None:  # fmt: skip
        src = self.resolve(src_pick)
        dst = self.resolve(dst_pick)
        self.both(_copy_range, src, dst, src_pos=src_pos, dst_pos=dst_pos, length=length)

    @rule(path_pick=PICK, offset=OFFSETS, size=st.integers(1, 20_000), seed=st.integers(0, 2**16))
    def mmap_write(self, path_pick: Pick, offset: int, size: int, seed: int) -> None:
        path = self.resolve(path_pick)
        self.both(_mmap_write, path, offset=offset, data=_payload(seed, size))

    @rule(path_pick=PICK, block=st.integers(0, 600), count=st.integers(1, 64),
          seed=st.integers(0, 2**16))  # fmt: skip
    def direct_io(self, path_pick: Pick, block: int, count: int, seed: int) -> None:
        path = self.resolve(path_pick)
        self.both(_direct_io, path, block=block, count=count, seed=seed)

    @rule(path_pick=PICK)
    def read(self, path_pick: Pick) -> None:
        path = self.resolve(path_pick)
        self.both(_read_hash, path)

    # -- attributes ----------------------------------------------------------

    @rule(path_pick=PICK, mode=MODES)
    def chmod(self, path_pick: Pick, mode: int) -> None:
        path = self.resolve(path_pick)
        self.both(os.chmod, path, mode=mode)

    @rule(path_pick=PICK, uid=st.sampled_from([-1, 0, 1000]), gid=st.sampled_from([-1, 0, 1000]))
    def chown(self, path_pick: Pick, uid: int, gid: int) -> None:
        path = self.resolve(path_pick)
        self.both(os.chown, path, uid=uid, gid=gid, follow_symlinks=False)

    @rule(
        path_pick=PICK,
        name=XATTR_NAMES,
        size=st.one_of(st.integers(0, 64), st.integers(0, 2500)),
        flags=st.sampled_from([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE]),
    )
    def setxattr(self, path_pick: Pick, name: str, size: int, flags: int) -> None:
        path = self.resolve(path_pick)
        self.both(os.setxattr, path, attribute=name, value=b"v" * size, flags=flags)

    @rule(path_pick=PICK, acl=st.sampled_from([ACL_NAMED_USER, ACL_MINIMAL]))
    def set_acl(self, path_pick: Pick, acl: bytes) -> None:
        path = self.resolve(path_pick)
        self.both(os.setxattr, path, attribute="system.posix_acl_access", value=acl)

    @rule(path_pick=PICK, name=XATTR_NAMES)
    def removexattr(self, path_pick: Pick, name: str) -> None:
        path = self.resolve(path_pick)
        self.both(os.removexattr, path, attribute=name)

    @rule(path_pick=PICK)
    def stat(self, path_pick: Pick) -> None:
        path = self.resolve(path_pick)
        self.both(_stat, path)

    @invariant()
    def server_alive(self) -> None:
        assert os.path.ismount(self.oroot), "the ext4box mount went away"

    def check_kernel_image(self) -> None:
        """e2fsck -fn of the kernel's image (a sibling machine may know a kernel bug)."""
        assert_fsck_clean(self.kernel_image)

    def teardown(self) -> None:
        totals = type(self)  # a sibling machine keeps its own figures
        totals.steps_run.append(self.steps)
        for name, count in self.outcomes.items():
            totals.outcomes[name] = totals.outcomes.get(name, 0) + count
        failure = None
        try:
            syncfs(self.kroot)
            kernel_tree = strip(walk(self.kroot), IGNORED)
            ours_tree = strip(walk(self.oroot), IGNORED)
            differences = tree_differences(kernel_tree, ours_tree)
            totals.block_differences += _block_differences(self.kroot, self.oroot)
            if differences:
                failure = "final trees differ:\n" + "\n".join(differences[:200])
        finally:
            try:
                self._ours_cm.__exit__(None, None, None)
            finally:
                self._kernel_cm.__exit__(None, None, None)
        assert failure is None, failure
        self.check_kernel_image()
        assert_fsck_clean(self.ours_image)
        view = strip(kernel_walk(self.ours_image, self.dir / "vmnt"), IGNORED)
        differences = tree_differences(view, ours_tree)
        assert not differences, "kernel view of the ext4box image:\n" + "\n".join(differences)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_machine(machine: type[KernelVsExt4box], workdir: Path, examples: int, steps: int) -> None:
    """Run `machine` for `examples` sequences of at most `steps` steps in `workdir`."""
    skip_unless_possible()
    machine.workdir = workdir
    phases = [Phase.generate] + ([Phase.shrink] if SHRINK else [])
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            phases=phases,
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        ),
    )


def test_kernel_vs_ext4box(tmp_path: Path) -> None:
    run_machine(KernelVsExt4box, tmp_path, EXAMPLES, STEPS)
    runs = KernelVsExt4box.steps_run
    print(f"differential: {len(runs)} sequences, {sum(runs)} steps ({runs})")
    print(f"differential outcomes: {sorted(KernelVsExt4box.outcomes.items())}")
    print(f"differential: entries with different st_blocks: {KernelVsExt4box.block_differences}")
    print(f"differential: data maps wider on the kernel: {KernelVsExt4box.seek_differences}")
