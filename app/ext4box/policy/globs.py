"""Path globs for image paths and mountpoints.

The helper compares globs against *resolved* absolute paths (realpath), so a
glob is itself an absolute, normalised path: no empty, ``.`` or ``..``
components (they could never match, and a user who writes one almost
certainly meant something else). Unlike fnmatch, ``*`` and ``?`` never cross
a ``/``; ``**`` as a whole component matches zero or more components.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ANY_COMPONENTS = "(?:/[^/]+)*"


class GlobError(ValueError):
    """The glob text is not a valid path glob; the message says why."""


@dataclass(frozen=True, slots=True)
class PathGlob:
    pattern: str
    regex: re.Pattern[str]

    def matches(self, path: str) -> bool:
        return self.regex.fullmatch(path) is not None

    def __str__(self) -> str:
        return self.pattern


def compile_path_glob(pattern: str) -> PathGlob:
    if not pattern:
        raise GlobError("empty glob")
    if "\0" in pattern:
        raise GlobError("glob contains a NUL character")
    if not pattern.startswith("/"):
        raise GlobError(f"glob {pattern!r} is not an absolute path (it must start with /)")
    if pattern == "/":
        return PathGlob(pattern, re.compile("/"))
    if pattern.endswith("/"):
        raise GlobError(f"glob {pattern!r} ends with / (paths are compared after realpath)")
    pieces: list[str] = []
    components = pattern[1:].split("/")
    for component in components:
        if component in ("", ".", ".."):
            shown = component or "empty"
            raise GlobError(
                f"glob {pattern!r} has a {shown!s} path component "
                "(paths are compared after realpath)"
            )
        if component == "**":
            pieces.append(_ANY_COMPONENTS)
        elif "**" in component:
            raise GlobError(f"glob {pattern!r}: ** must be a whole path component")
        else:
            pieces.append("/" + _translate_component(pattern, component))
    regex_text = "".join(pieces)
    if components == ["**"]:
        regex_text = "/|" + _ANY_COMPONENTS  # "/**" matches "/" itself too
    try:
        regex = re.compile(f"(?:{regex_text})", re.DOTALL)
    except re.error as error:
        raise GlobError(f"glob {pattern!r}: {error}") from None
    return PathGlob(pattern, regex)


def _translate_component(pattern: str, component: str) -> str:
    out: list[str] = []
    position = 0
    while position < len(component):
        char = component[position]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\":
            if position + 1 >= len(component):
                raise GlobError(f"glob {pattern!r} ends a component with a lone backslash")
            position += 1
            out.append(re.escape(component[position]))
        elif char == "[":
            text, position = _translate_class(pattern, component, position)
            out.append(text)
            continue
        else:
            out.append(re.escape(char))
        position += 1
    return "".join(out)


def _translate_class(pattern: str, component: str, start: int) -> tuple[str, int]:
    """Translate ``[...]`` starting at `start`; return regex text and the index after ``]``."""
    position = start + 1
    negate = position < len(component) and component[position] in "!^"
    if negate:
        position += 1
    members: list[str] = []
    first = True
    while True:
        if position >= len(component):
            raise GlobError(f"glob {pattern!r} has an unclosed [ character class")
        char = component[position]
        if char == "]" and not first:
            break
        if (
            char == "-"
            and members
            and position + 1 < len(component)
            and (component[position + 1] != "]")
        ):
            members.append("-")
        else:
            members.append(re.escape(char))
        first = False
        position += 1
    body = "".join(members)
    # A component never holds "/", so a plain class cannot match one; a negated
    # class must exclude it explicitly.
    text = f"[^/{body}]" if negate else f"[{body}]"
    try:
        re.compile(text)
    except re.error as error:
        raise GlobError(f"glob {pattern!r} has a bad character class: {error}") from None
    return text, position + 1
