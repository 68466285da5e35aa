"""Where things are in a TOML file's text: line numbers for error messages.

tomllib returns plain dicts with no positions, so after a file has parsed we
scan its text once more to find the line of each ``[[rule]]`` header and of
each key inside it. The scan only has to be right for text tomllib accepted,
but it must not be fooled by brackets, quotes or ``key =`` look-alikes inside
strings, multi-line strings, multi-line arrays or comments: it tracks those
states line by line and only classifies lines that start at the top level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

try:
    import tomllib
except ImportError:  # Python < 3.11 (pyproject pulls in tomli there)
    import tomli as tomllib  # type: ignore[no-redef]

# The one TOML parser of the policy layer; the loader uses these too.
TOMLDecodeError = tomllib.TOMLDecodeError
loads = tomllib.loads

RULE_TABLE = "rule"

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(slots=True)
class RuleLayout:
    """Lines of one ``[[rule]]`` table: its header and the first line of each key."""

    header_line: int
    key_lines: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class TomlLayout:
    top_key_lines: dict[str, int] = field(default_factory=dict)
    rules: list[RuleLayout] = field(default_factory=list)

    def rule_line(self, index: int) -> int | None:
        if index < len(self.rules):
            return self.rules[index].header_line
        # Rules written as an inline array (rule = [{...}]) have no header.
        return self.top_key_lines.get(RULE_TABLE)

    def key_line(self, index: int, key: str) -> int | None:
        if index < len(self.rules):
            found = self.rules[index].key_lines.get(key)
            if found is not None:
                return found
        return self.rule_line(index)


def scan_layout(text: str) -> TomlLayout:
    layout = TomlLayout()
    # Where keys on a top-level line belong: "top" (before any header), "rule"
    # (inside the latest [[rule]]), or None (some other table).
    context: str | None = "top"
    in_multiline: str | None = None  # '"""' or "'''" while inside one
    depth = 0  # open [ and { of values that continue over lines
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline is None and depth == 0:
            stripped = line.lstrip()
            if stripped.startswith("["):
                context = _record_header(layout, stripped, number)
                continue  # a header line holds nothing else but a comment
            if stripped and not stripped.startswith("#"):
                key = _first_key(stripped)
                if key is not None:
                    _record_key(layout, context, key, number)
        in_multiline, depth = _scan_line(line, in_multiline, depth)
    return layout


def _record_header(layout: TomlLayout, stripped: str, number: int) -> str | None:
    is_array = stripped.startswith("[[")
    path = _key_path(stripped[2:] if is_array else stripped[1:])
    if not path:
        return None
    if path == [RULE_TABLE] and is_array:
        layout.rules.append(RuleLayout(header_line=number))
        return "rule"
    if path[0] == RULE_TABLE and len(path) > 1 and layout.rules:
        # [rule.sub] defines key "sub" inside the latest rule.
        layout.rules[-1].key_lines.setdefault(path[1], number)
        return None
    layout.top_key_lines.setdefault(path[0], number)
    return None


def _record_key(layout: TomlLayout, context: str | None, key: str, number: int) -> None:
    if context == "top":
        layout.top_key_lines.setdefault(key, number)
    elif context == "rule" and layout.rules:
        layout.rules[-1].key_lines.setdefault(key, number)


def _first_key(text: str) -> str | None:
    path = _key_path(text)
    return path[0] if path else None


def _key_path(text: str) -> list[str]:
    """Parse a dotted key (bare or quoted parts) at the start of `text`."""
    parts: list[str] = []
    position = 0
    while True:
        while position < len(text) and text[position] in " \t":
            position += 1
        if position >= len(text):
            return parts
        char = text[position]
        if char in "\"'":
            end = _string_end(text, position)
            if end is None:
                return parts
            quoted = text[position:end]
            try:
                parts.append(loads(f"k = {quoted}")["k"])
            except TOMLDecodeError:
                return parts
            position = end
        else:
            match = _BARE_KEY.match(text, position)
            if match is None:
                return parts
            parts.append(match.group())
            position = match.end()
        while position < len(text) and text[position] in " \t":
            position += 1
        if position < len(text) and text[position] == ".":
            position += 1
            continue
        return parts


def _string_end(text: str, start: int) -> int | None:
    """Index just after the single-line string opening at `start`."""
    quote = text[start]
    position = start + 1
    while position < len(text):
        char = text[position]
        if quote == '"' and char == "\\":
            position += 2
            continue
        if char == quote:
            return position + 1
        position += 1
    return None


def _scan_line(line: str, in_multiline: str | None, depth: int) -> tuple[str | None, int]:
    """Carry string and bracket state across one line."""
    position = 0
    length = len(line)
    while position < length:
        if in_multiline is not None:
            close = _multiline_close(line, position, in_multiline)
            if close is None:
                return in_multiline, depth
            position = close
            in_multiline = None
            continue
        char = line[position]
        if char == "#":
            break
        if line.startswith('"""', position) or line.startswith("'''", position):
            in_multiline = line[position : position + 3]
            position += 3
            continue
        if char in "\"'":
            end = _string_end(line, position)
            position = length if end is None else end
            continue
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        position += 1
    return in_multiline, depth


def _multiline_close(line: str, position: int, delimiter: str) -> int | None:
    """Index after the closing delimiter of a multi-line string, or None."""
    quote = delimiter[0]
    while position < len(line):
        char = line[position]
        if quote == '"' and char == "\\":
            position += 2
            continue
        if char == quote and line.startswith(delimiter, position):
            # A run of up to five quotes closes with its last three.
            end = position
            while end < len(line) and line[end] == quote:
                end += 1
            return end
        position += 1
    return None
