"""How deep is each file's extent tree in an unmounted image, as debugfs reads it?

One debugfs run answers for every file (a request file of `ex` commands), so
a test can afford to ask about all the regular files of a tree at once.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

# "debugfs: ex "/a/b"" opens one answer; "Level Entries ..." lines follow,
# each extent line starting with "level/ depth".
_REQUEST = re.compile(r'^debugfs: ex "/(.*)"$')
_EXTENT_LINE = re.compile(r"^\s*\d+/\s*(\d+)\s+\d+/\s*\d+\s")


def extent_depths(image: Path, paths: Iterable[str]) -> dict[str, int]:
    """Depth of each path's extent tree (0: all extents in the inode).

    `paths` are relative to the image's root. A path with no extent at all
    (empty, block-mapped, missing) is left out of the answer.
    """
    requests = []
    for path in paths:
        if '"' in path or "\n" in path:
            raise ValueError(f"debugfs cannot be asked about {path!r}")
        requests.append(f'ex "/{path}"\n')
    if not requests:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as request_file:
        request_file.writelines(requests)
        request_file.flush()
        result = subprocess.run(
            ["debugfs", "-f", request_file.name, str(image)],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"debugfs -f on {image} failed ({result.returncode}): {result.stderr}")
    depths: dict[str, int] = {}
    current: str | None = None
    for line in result.stdout.splitlines():
        request = _REQUEST.match(line)
        if request:
            current = request.group(1)
            continue
        extent = _EXTENT_LINE.match(line)
        if extent and current is not None:
            depths[current] = max(depths.get(current, 0), int(extent.group(1)))
    return depths
