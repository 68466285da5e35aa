"""Does the image have an ext4 feature the helper's policy refuses?

The helper checks the superblock before it mounts, but the image file may
change after that check; so the helper also sends the refused features in
MOUNT (protocol version 2) and the server refuses them itself, on a
superblock it read through its own image fd, after the stage-2 lockdown
(nothing here opens a path). The layer that parses the image for serving can
call refuse_features() on the superblock it parsed as well.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from ext4box.ext4.errors import Ext4Error
from ext4box.ext4.superblock import SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, Superblock


class FeatureRefused(Exception):
    """The image has a refused feature; `reason` and `errno` travel in ERROR."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = errno.EPERM


def refuse_features(superblock: Superblock, refused: Sequence[str]) -> None:
    """Raise FeatureRefused if `superblock` has any of `refused`."""
    present = set(superblock.feature_names())
    hits = [name for name in refused if name in present]
    if hits:
        raise FeatureRefused(
            f"the image has ext4 feature(s) {', '.join(hits)}, which the helper's policy refuses"
        )


def check_image_fd(image_fd: int, refused: Sequence[str]) -> None:
    """Read the superblock through the held image fd and refuse_features() it."""
    if not refused:
        return
    try:
        raw = os.pread(image_fd, SUPERBLOCK_SIZE, SUPERBLOCK_OFFSET)
        superblock = Superblock.parse(raw)
    except (OSError, Ext4Error) as err:
        raise FeatureRefused(
            f"cannot read the superblock to check the refused features: {err}"
        ) from None
    refuse_features(superblock, refused)
