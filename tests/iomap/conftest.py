"""Fixtures of the iomap tests; the helpers live in iomap_support (importable by name)."""

from iomap_support import kernel_image, opened

__all__ = ["kernel_image", "opened"]
