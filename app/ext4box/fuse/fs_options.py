"""Which `serve -o` options are for the filesystem rather than the kernel's FUSE
mount, and what they change: today the quota options.

usrquota (or quota), grpquota and prjquota turn on the enforcement of that
type's limits, as they do for the kernel's ext4 on an image with the quota
feature; usage is counted with or without them. They never reach mount(2).
"""

from __future__ import annotations

from collections.abc import Iterable

from ext4box.ext4.format.quota_file import GRPQUOTA, PRJQUOTA, USRQUOTA
from ext4box.ext4.read.filesystem import Filesystem
from ext4box.log import get_logger

log = get_logger("ext4box.fuse")

QUOTA_OPTIONS = {"quota": USRQUOTA, "usrquota": USRQUOTA, "grpquota": GRPQUOTA,
                 "prjquota": PRJQUOTA}


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
