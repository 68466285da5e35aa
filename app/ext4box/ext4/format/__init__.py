"""ext4's on-disk format: parse, check and encode one structure per module.

The lowest layer of ext4/: plain values in and out (bytes, numbers, frozen
dataclasses), no device, no caches, no filesystem object. It may import only
itself and the standard library (plus the crc32c package in checksum.py).
"""
