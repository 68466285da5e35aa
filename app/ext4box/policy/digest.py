"""SHA-256 of an image the helper already opened (never by path)."""

from __future__ import annotations

import hashlib
import os

_CHUNK = 1 << 20


def sha256_of_fd(fd: int) -> str:
    """Hash the whole file behind `fd` with pread, leaving its offset alone.

    Reads until end of file rather than trusting a size taken earlier, so a
    file that grows or shrinks meanwhile is hashed as it is now; the helper
    holds its lock on the image while hashing.
    """
    digest = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, _CHUNK, offset)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        offset += len(chunk)
