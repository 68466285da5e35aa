"""The one error type of the host helper: a single line for the user."""

from __future__ import annotations

from ext4box.policy.text import printable


class HelperError(Exception):
    """Printed as `ext4box: error: <line>`; the command exits 1.

    `line` never contains a newline: whatever reaches the user is one line,
    even when it quotes a container log or a tool's stderr; and no control
    character (a policy's rule name, a path) reaches the terminal unescaped.
    """

    def __init__(self, line: str) -> None:
        self.line = printable(" ".join(line.split()))
        super().__init__(self.line)
