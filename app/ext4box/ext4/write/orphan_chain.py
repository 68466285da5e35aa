"""Who precedes each inode on the on-disk orphan list, so one can leave it without a walk.

The list is singly linked (s_last_orphan, then each inode's i_dtime); this
index of its links backwards is what orphans.py keeps beside it.
"""

from __future__ import annotations

# The superblock's place in the chain, as a predecessor.
SUPERBLOCK = 0


class OrphanChain:
    """The links of the on-disk list, backwards: for each listed inode, the inode
    whose i_dtime names it, or SUPERBLOCK when s_last_orphan does."""

    def __init__(self) -> None:
        self._before: dict[int, int] = {}

    def __contains__(self, ino: int) -> bool:
        return ino in self._before

    def __len__(self) -> int:
        return len(self._before)

    def pushed(self, ino: int, old_head: int) -> None:
        """`ino` became the head, in front of `old_head` (0: the list was empty)."""
        self._before[ino] = SUPERBLOCK
        if old_head:
            self._before[old_head] = ino

    def removed(self, ino: int, following: int) -> int | None:
        """`ino` leaves the list, `following` (0: none) taking its place; returns the
        predecessor that must now name `following`, or None if `ino` was not listed."""
        before = self._before.pop(ino, None)
        if before is not None and following:
            self._before[following] = before
        return before

    def clear(self) -> None:
        self._before.clear()
