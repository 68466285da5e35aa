"""What every benchmark module shares: sizes, the result record, mounts, cache drops.

The harness runs as a script (`python bench/run.py`), so its modules import each
other as top-level modules; `bench/` is on sys.path because the script lives
there. tests/ is added for the mount helpers the test suite already trusts.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from support.fileops import syncfs  # noqa: E402,F401 - re-exported for the workloads
from support.kernel import kernel_mount  # noqa: E402
from support.serve import ext4box_argv, fuse2fs_argv, served  # noqa: E402

# pyfuse3: ext4box on its second FUSE backend (`-o backend=pyfuse3`), the
# transport the native one replaced (issue 13): the gain shows in one run.
SYSTEMS = ("kernel", "ext4box", "fuse2fs", "pyfuse3")
MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big each workload is; --quick shrinks all of them."""

    seq_mb: int  # the streaming file, read and written
    random_ios: int  # 4 KiB reads or writes per random workload
    random_write_mb: int  # the preallocated file random writes land in
    meta_files: int  # create / stat / readdir / unlink, and the ls -lR tree
    source_files: int  # the source-like tree: untar, find, find + cat
    memory_files: int  # files in the memory workload's image
    memory_image_gib: int  # its (sparse) size
    append_writes: int  # 4-byte O_APPEND writes of the small-append workload


FULL = Sizes(seq_mb=256, random_ios=5_000, random_write_mb=64, meta_files=20_000,
             source_files=3_000, memory_files=1_000_000, memory_image_gib=20,
             append_writes=100_000)
QUICK = Sizes(seq_mb=64, random_ios=500, random_write_mb=16, meta_files=2_000,
              source_files=500, memory_files=20_000, memory_image_gib=1,
              append_writes=10_000)


@dataclass(frozen=True, slots=True)
class Result:
    """One cell of the table: a workload on a system.

    `rate` is always "higher is better" (MB/s, IOPS, files/s; for the memory
    workload MiB of peak RSS, where lower is better and the target says so).
    `error` replaces the figure when the system refused or failed the workload.
    """

    workload: str
    system: str
    rate: float | None
    unit: str
    seconds: float | None = None
    error: str | None = None
    note: str | None = None  # e.g. an e2fsck complaint after a write workload
    details: dict[str, object] | None = None  # workload-specific extras for the report


def errno_text(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def drop_caches() -> None:
    """Drop clean page cache, dentries and inodes (dirty data stays: syncfs first)."""
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# Set by run.py --ext4box-options: added to every read-write ext4box mount.
EXT4BOX_RW_OPTIONS: tuple[str, ...] = ()


@contextlib.contextmanager
def mounted(system: str, image: Path, mountpoint: Path, *, writable: bool = False,
            ext4box_options: tuple[str, ...] = ()) -> Iterator[Path]:
    """`image` mounted by `system` at `mountpoint` for the block, unmounted after.

    `ext4box_options`: more `-o` options for ext4box (others ignore them).
    """
    if system == "kernel":
        with kernel_mount(image, mountpoint, readonly=not writable) as mnt:
            yield mnt
        return
    argv = server_argv(system, image, mountpoint, writable=writable, extra=ext4box_options)
    with served(image, mountpoint, argv):
        yield mountpoint


# Set by bench/profile_server.py: wraps every ext4box server command line in a sampler.
PROFILER: Callable[[list[str]], list[str]] | None = None


def server_argv(system: str, image: Path, mountpoint: Path, *, writable: bool,
                extra: tuple[str, ...] = ()) -> list[str]:
    """The command line serving `image` with one of the FUSE servers (`extra`:
    more ext4box options; ext4box on either transport)."""
    if system in ("ext4box", "pyfuse3"):
        backend = "pyfuse3" if system == "pyfuse3" else None
        options = ("rw", *EXT4BOX_RW_OPTIONS) if writable else ("ro",)
        argv = ext4box_argv(image, mountpoint, ",".join(dict.fromkeys((*options, *extra))),
                            backend=backend)
        return argv if PROFILER is None else PROFILER(argv)
    if system == "fuse2fs":
        argv = fuse2fs_argv(image, mountpoint)
        if writable:
            argv[argv.index("ro,fakeroot")] = "rw,fakeroot"
        return argv
    raise ValueError(f"{system} is not a FUSE server")


@dataclass(slots=True)
class Context:
    """What a workload needs besides its system: sizes, the work dir, the built images."""

    work: Path
    sizes: Sizes
    read_image: Path | None = None
    write_image: Path | None = None
    cache_dir: Path | None = None  # where the memory workload keeps its big image

    def mountpoint(self, system: str) -> Path:
        return self.work / f"mnt-{system}"


RunFn = Callable[[str, Context], list[Result]]


@dataclass(frozen=True, slots=True)
class Runner:
    """One measurement procedure; it may fill several table rows (`keys`) at once.

    `needs` names the image it runs on ("read", "write" or "" for its own).
    """

    name: str
    keys: tuple[str, ...]
    needs: str
    run: RunFn
    systems: tuple[str, ...] = SYSTEMS
