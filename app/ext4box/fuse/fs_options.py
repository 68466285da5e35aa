"""Which `serve -o` options are for the server rather than the kernel's FUSE
mount, and what they change: the quota options and writeback_cache.

usrquota (or quota), grpquota and prjquota turn on the enforcement of that
type's limits, as they do for the kernel's ext4 on an image with the quota
feature; usage is counted with or without them. They never reach mount(2).

writeback_cache asks the kernel for FUSE_WRITEBACK_CACHE (native transport,
read-write mounts): buffered writes collect in the page cache and reach the
server as large WRITEs at writeback, fsync and close, so a loop of small
writes costs what it costs on the kernel's ext4 instead of one round trip
each. What the kernel cannot know then, because it lives in the image: a
write past ext4's per-file size limit succeeds in write(2) and fails (EFBIG)
at fsync/close with the bytes past the limit lost, where ext4 refuses the
write(2) itself; a file made immutable or append-only while it holds dirty
pages still gets them. Files already append-only when opened for writing
bypass the cache (FOPEN_DIRECT_IO), so their O_APPEND rule stays exact.
"""

from __future__ import annotations

from collections.abc import Iterable

from ext4box.ext4.format.quota_file import GRPQUOTA, PRJQUOTA, USRQUOTA
from ext4box.ext4.read.filesystem import Filesystem
from ext4box.log import get_logger

log = get_logger("ext4box.fuse")

QUOTA_OPTIONS = {"quota": USRQUOTA, "usrquota": USRQUOTA, "grpquota": GRPQUOTA,
                 "prjquota": PRJQUOTA}
WRITEBACK_CACHE = "writeback_cache"
# pyfuse3's libfuse session is not asked for the cache (`serve` and the appliance refuse it).
WRITEBACK_NEEDS_NATIVE = "writeback_cache needs the native FUSE transport, not pyfuse3"


def take_writeback_option(options: Iterable[str]) -> tuple[bool, list[str]]:
    """Whether `writeback_cache` is among `options`, and the other options."""
    given = list(options)
    rest = [opt for opt in given if opt != WRITEBACK_CACHE]
    return len(rest) != len(given), rest


def take_quota_options(options: Iterable[str]) -> tuple[frozenset[int], list[str]]:
    """Split the quota options (as quota types) from the rest of the mount options."""
    qtypes: set[int] = set()
    rest: list[str] = []
    for opt in options:
        if opt in QUOTA_OPTIONS:
            qtypes.add(QUOTA_OPTIONS[opt])
        else:
            rest.append(opt)
    return frozenset(qtypes), rest


def apply_quota_options(fs: Filesystem, qtypes: frozenset[int]) -> None:
    """Enforce the limits of `qtypes` on `fs` (nothing to enforce read-only, or
    on an image without quota files: logged, as the mount still serves)."""
    if not qtypes:
        return
    quota = getattr(fs, "quota", None)
    if quota is None:
        why = "read-only mount" if getattr(fs, "readonly", True) else "no quota feature"
        log.warning("quota options ignored", why=why)
        return
    quota.enforce(qtypes)
