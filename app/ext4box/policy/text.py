"""How is text from a policy file (or a path) shown to a person?

Policy files are root's, but their text ends up in terminals and logs:
a rule name or description with an escape sequence must not recolour,
clear or rewrite the screen of whoever reads a denial. Every character that
is not printable is shown as a Python-style escape (ESC becomes \\x1b).
"""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with every non-printable character escaped; a space stays a space."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
