"""Allocation bitmaps: search for free bits, set and clear ranges, checksums.

ext4 numbers bits little-endian: bit i lives in byte i // 8 at position
i % 8. That is exactly the bit order of `int.from_bytes(bitmap, "little")`,
so searches work on one Python integer (a few machine-word operations per
step) instead of looping over bits.

Every function takes the number of meaningful bits (`nbits`: blocks or
inodes in the group) and never looks past it, so padding bits and a hostile
geometry cannot widen a search.
"""

from __future__ import annotations

from ext4box.ext4.format.checksum import crc32c_raw


def _check_range(nbits: int, start: int, count: int, size_bytes: int) -> None:
    if nbits < 0 or nbits > size_bytes * 8:
        raise ValueError(f"bitmap of {size_bytes} bytes cannot hold {nbits} bits")
    if start < 0 or count < 0 or start + count > nbits:
        raise ValueError(f"bit range {start}+{count} outside bitmap of {nbits} bits")


def bitmap_int(bitmap: bytes | bytearray, nbits: int) -> int:
    """The first `nbits` bits as one integer (bit i of the bitmap = bit i of the int)."""
    value = int.from_bytes(bitmap[: (nbits + 7) // 8], "little")
    return value & ((1 << nbits) - 1)


def _lowest_bit(value: int) -> int:
    return (value & -value).bit_length() - 1


def find_first_zero(bitmap: bytes | bytearray, nbits: int, goal: int = 0) -> int | None:
    """The first clear bit at or after `goal`, wrapping to 0; None if all are set."""
    if nbits <= 0:
        return None
    goal = goal if 0 <= goal < nbits else 0
    free = ~bitmap_int(bitmap, nbits) & ((1 << nbits) - 1)
    if not free:
        return None
    after = free >> goal
    if after:
        return goal + _lowest_bit(after)
    return _lowest_bit(free)


def find_zero_run(
    bitmap: bytes | bytearray, nbits: int, goal: int, want: int
) -> tuple[int, int] | None:
    """A run of clear bits, searched from `goal` forward and then from 0.

    Returns (start, length) of the first run at least `want` long (cut to
    `want`), else the longest run seen (the first of equal ones), else None
    when no bit is clear. A run starting at `goal` itself wins if it is long
    enough, which lets a file grow in place.
    """
    if nbits <= 0 or want <= 0:
        return None
    goal = goal if 0 <= goal < nbits else 0
    used = bitmap_int(bitmap, nbits)
    free = ~used & ((1 << nbits) - 1)
    if not free:
        return None
    best: tuple[int, int] | None = None
    # Two passes: [goal, nbits) then [0, goal). A run never wraps around.
    for lo, hi in ((goal, nbits), (0, goal)):
        pos = lo
        # Each iteration consumes one free run and the used run after it,
        # so the loop is bounded by the number of runs (<= nbits / 2).
        while pos < hi:
            tail = free >> pos
            if not tail:
                break
            start = pos + _lowest_bit(tail)
            if start >= hi:
                break
            used_after = used >> start
            end = start + _lowest_bit(used_after) if used_after else nbits
            end = min(end, hi)
            length = end - start
            if length >= want:
                return start, want
            if best is None or length > best[1]:
                best = (start, length)
            pos = end
    return best


def count_zeros(bitmap: bytes | bytearray, nbits: int) -> int:
    return nbits - bitmap_int(bitmap, nbits).bit_count()


def range_is_clear(bitmap: bytes | bytearray, start: int, count: int) -> bool:
    _check_range(start + count, start, count, len(bitmap))
    return not (bitmap_int(bitmap, start + count) >> start)


def range_is_set(bitmap: bytes | bytearray, start: int, count: int) -> bool:
    _check_range(start + count, start, count, len(bitmap))
    return (bitmap_int(bitmap, start + count) >> start) == (1 << count) - 1


def set_range(bitmap: bytearray, start: int, count: int, nbits: int | None = None) -> None:
    """Set bits [start, start + count); `nbits` (default: the whole buffer) bounds them."""
    _apply_range(bitmap, start, count, nbits, True)


def clear_range(bitmap: bytearray, start: int, count: int, nbits: int | None = None) -> None:
    _apply_range(bitmap, start, count, nbits, False)


def _apply_range(bitmap: bytearray, start: int, count: int, nbits: int | None, value: bool) -> None:
    limit = len(bitmap) * 8 if nbits is None else nbits
    _check_range(limit, start, count, len(bitmap))
    if count == 0:
        return
    end = start + count
    first_byte, last_byte = start // 8, (end - 1) // 8
    mask = ((1 << count) - 1) << (start - first_byte * 8)
    span = last_byte - first_byte + 1
    current = int.from_bytes(bitmap[first_byte : last_byte + 1], "little")
    current = current | mask if value else current & ~mask
    bitmap[first_byte : last_byte + 1] = current.to_bytes(span, "little")


def mark_padding(bitmap: bytearray, nbits: int) -> None:
    """Set every bit from `nbits` to the end of the buffer, as the kernel and mke2fs do."""
    set_range(bitmap, nbits, len(bitmap) * 8 - nbits)


def block_bitmap_checksum(fs_seed: int, bitmap: bytes | bytearray, clusters_per_group: int) -> int:
    """Full 32-bit crc32c of a block bitmap (stored split lo/hi in the descriptor)."""
    return crc32c_raw(fs_seed, bitmap[: clusters_per_group // 8])


def inode_bitmap_checksum(fs_seed: int, bitmap: bytes | bytearray, inodes_per_group: int) -> int:
    return crc32c_raw(fs_seed, bitmap[: inodes_per_group // 8])
