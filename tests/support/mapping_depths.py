"""How deep is each file's block mapping in an unmounted image, as debugfs reads it?

For an extent-mapped file, the depth of its extent tree (0: all extents in
the inode); for a block-mapped one, the indirection levels it uses (0: direct
pointers only, 1: an indirect block, 2: double, 3: triple). One debugfs run
answers for every file (a request file), so a test can afford to ask about all
the regular files of a tree at once.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

# Each answer opens with the request echoed: `debugfs: ex "/a/b"`.
_REQUEST = re.compile(r'^debugfs: \w+ "/(.*)"$')
# An `ex` line: "level/ depth  entry/ entries  ...".
_EXTENT_LINE = re.compile(r"^\s*\d+/\s*(\d+)\s+\d+/\s*\d+\s")
# A `stat` BLOCKS line names the indirect blocks it lists: (IND), (DIND), (TIND).
_INDIRECT = re.compile(r"\(([DT]?)IND\)")
_INDIRECT_LEVELS = {"": 1, "D": 2, "T": 3}


def extent_depths(image: Path, paths: Iterable[str]) -> dict[str, int]:
    """Depth of each path's extent tree (0: all extents in the inode).

    `paths` are relative to the image's root. A path with no extent at all
    (empty, block-mapped, missing) is left out of the answer.
    """

    def depth(line: str) -> int | None:
        match = _EXTENT_LINE.match(line)
        return int(match.group(1)) if match else None

    return _ask(image, "ex", paths, depth)


def indirect_levels(image: Path, paths: Iterable[str]) -> dict[str, int]:
    """Indirection levels each block-mapped path uses (0: direct pointers only).

    Missing paths are left out; an extent-mapped file answers 0.
    """

    def levels(line: str) -> int | None:
        found = [_INDIRECT_LEVELS[match] for match in _INDIRECT.findall(line)]
        return max(found, default=0)

    return _ask(image, "stat", paths, levels, require="Inode:")


def _ask(
    image: Path,
    request: str,
    paths: Iterable[str],
    level_of: Callable[[str], int | None],
    require: str | None = None,
) -> dict[str, int]:
    """Run `request "/path"` for every path in one debugfs and keep, per path, the
    highest level `level_of` finds in its answer's lines (only answers with a line
    containing `require`, if given, count)."""
    lines = []
    for path in paths:
        if '"' in path or "\n" in path:
            raise ValueError(f"debugfs cannot be asked about {path!r}")
        lines.append(f'{request} "/{path}"\n')
    if not lines:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as request_file:
        request_file.writelines(lines)
        request_file.flush()
        result = subprocess.run(
            ["debugfs", "-f", request_file.name, str(image)],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"debugfs -f on {image} failed ({result.returncode}): {result.stderr}")
    levels: dict[str, int] = {}
    seen: set[str] = set()
    current: str | None = None
    for line in result.stdout.splitlines():
        echoed = _REQUEST.match(line)
        if echoed:
            current = echoed.group(1)
            continue
        if current is None:
            continue
        if require is not None and require in line:
            seen.add(current)
        level = level_of(line)
        if level is not None:
            levels[current] = max(levels.get(current, 0), level)
    if require is not None:
        levels = {path: level for path, level in levels.items() if path in seen}
    return levels
