"""Groups whose bitmap failed its checks, skipped by the allocators.

A crash without a journal can leave a bitmap written and its group
descriptor (which holds the bitmap's checksum and free count) not yet; a
damaged image can hold worse. As the kernel marks such a group's bitmap
corrupt and allocates elsewhere, an allocator asks `usable` and moves on to
the next group; the group stays skipped until the mount ends (e2fsck
repairs it). Freeing into it still reads the bitmap and fails with the
reason, so nothing is changed half-way.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from ext4box.ext4.format.errors import Corrupt

log = structlog.get_logger("ext4box.ext4")


class BadGroups:
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "block" or "inode", for the log
        self._why: dict[int, str] = {}

    def __contains__(self, group: int) -> bool:
        return group in self._why

    def usable(self, group: int, read_bitmap: Callable[[int], bytearray]) -> bytearray | None:
        """The group's bitmap, or None when it failed its checks (logged once)."""
        if group in self._why:
            return None
        try:
            return read_bitmap(group)
        except Corrupt as err:
            self._why[group] = err.why
            log.error("allocation_group_skipped", bitmap=self.kind, what=err.what,
                      where=err.where, why=err.why,
                      detail="not allocated from until e2fsck repairs it")
            return None
