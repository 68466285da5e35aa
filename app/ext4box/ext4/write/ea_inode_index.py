"""Which EA inodes seen on this mount may already hold a value, by its hash?"""

from __future__ import annotations

import threading
from collections import OrderedDict

INDEX_LIMIT = 4096  # EA inodes remembered for sharing (about 100 bytes each)


class EaInodeIndex:
    """Value hash -> EA inodes seen on this mount (the kernel's mbcache of EA inodes).

    A hint only: entries may be stale (an inode freed, reused, rewritten by a
    crafted image); `acquire` checks a candidate fully before using it. At most
    `limit` inodes, the least recently noted forgotten first. Reads note values
    outside the filesystem's write lock, hence a lock of its own."""

    def __init__(self, limit: int = INDEX_LIMIT) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._hash_of: OrderedDict[int, int] = OrderedDict()  # ino -> value hash
        self._inos_of: dict[int, set[int]] = {}  # value hash -> inos

    def __len__(self) -> int:
        return len(self._hash_of)

    def note(self, ino: int, value_hash: int) -> None:
        with self._lock:
            self._forget(ino)
            self._hash_of[ino] = value_hash
            self._inos_of.setdefault(value_hash, set()).add(ino)
            while len(self._hash_of) > self._limit:
                self._forget(next(iter(self._hash_of)))

    def forget(self, ino: int) -> None:
        with self._lock:
            self._forget(ino)

    def _forget(self, ino: int) -> None:
        value_hash = self._hash_of.pop(ino, None)
        if value_hash is None:
            return
        inos = self._inos_of[value_hash]
        inos.discard(ino)
        if not inos:
            del self._inos_of[value_hash]

    def candidates(self, value_hash: int) -> list[int]:
        with self._lock:
            return sorted(self._inos_of.get(value_hash, ()))
