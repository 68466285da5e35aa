"""The kernel's switch for FUSE over io_uring, turned for a test and put back.

/sys/module/fuse/parameters/enable_uring is machine-wide. Turning it on
changes nothing for servers that do not ask for io_uring at INIT (libfuse
servers and ext4box with transport=dev), so tests running at the same time
are unaffected; it is still put back as it was. Two runs that overlap can
put it back in the wrong order (the later one restores what the earlier one
set): seen once here, when a uring pass and a single uring test overlapped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")


def why_no_uring_switch() -> str | None:
    """Why this process cannot turn FUSE over io_uring on and off, or None."""
    if not ENABLE_URING.exists():
        return f"no {ENABLE_URING}: the kernel has no FUSE over io_uring (CONFIG_FUSE_IO_URING)"
    if os.geteuid() != 0:
        return f"writing {ENABLE_URING} needs root"
    return None


@contextmanager
def uring_enabled(on: bool) -> Iterator[str | None]:
    """enable_uring set to `on` for the block (yields None), or the reason it cannot be."""
    reason = why_no_uring_switch()
    if reason is not None:
        yield reason
        return
    previous = ENABLE_URING.read_text().strip()
    ENABLE_URING.write_text("Y" if on else "N")
    try:
        yield None
    finally:
        ENABLE_URING.write_text(previous)
