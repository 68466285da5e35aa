"""Does the image have an ext4 feature the helper's policy refuses?

The helper checks the superblock before it mounts, but the image file may
change after that check; so the helper also sends the refused features in
MOUNT (protocol version 2) and the server refuses them itself
(ext4box.service.serve), on the superblock it parsed to serve, after the
stage-2 lockdown.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from ext4box.ext4.format.superblock import Superblock


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
