"""Command-line entry point (placeholder until the serve command lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    del argv
    print("ext4box: no command yet", file=sys.stderr)
    return 2
