"""Which -o words does `ext4box serve` accept? (For tests that try each one.)"""

from __future__ import annotations

from ext4box.fuse.atime import ATIME_OPTIONS
from ext4box.fuse.fs_options import QUOTA_OPTIONS, WRITEBACK_CACHE
from ext4box.fuse.mount import (
    FSTAB_ONLY_OPTIONS,
    FSTAB_ONLY_PREFIXES,
    IMPLIED_OPTIONS,
    PASSTHROUGH_OPTIONS,
)


def accepted_options(backend: str = "native") -> list[str]:
    """Every -o word `ext4box serve` accepts on the FUSE transport `backend`, from
    the lists that accept them (a prefix stands for every word it starts).
    writeback_cache is the native transport's alone: pyfuse3 refuses it."""
    words = {"ro", "rw", *PASSTHROUGH_OPTIONS, *IMPLIED_OPTIONS, *FSTAB_ONLY_OPTIONS,
             *QUOTA_OPTIONS, *ATIME_OPTIONS}  # fmt: skip
    words |= {prefix + "example" for prefix in FSTAB_ONLY_PREFIXES}
    if backend == "native":
        words.add(WRITEBACK_CACHE)
    return sorted(words)
