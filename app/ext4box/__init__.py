"""ext4box: a memory-safe ext4 implementation served through FUSE."""

__version__ = "0.1.0"
