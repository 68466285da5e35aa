"""A device whose writes stay in memory: fast-commit replay runs on it.

Reads come from the written blocks first, then from `base` (the device, or
the OverlayDevice with the full commits replayed). A read-only mount serves
the result without the image ever being written; a read-write mount copies
`dirty_blocks()` onto the real device. `freeze()` makes it read-only, so a
read-only mount cannot change it by accident.
"""

from __future__ import annotations

from collections.abc import Sequence

from ext4box.blockdev import BlockDevice, preadv_by_pread


class CopyOnWriteDevice(BlockDevice):
    def __init__(self, base: BlockDevice, block_size: int) -> None:
        super().__init__(base.fd, writable=True, size=base.size)
        self.base = base
        self.block_size = block_size
        self._blocks: dict[int, bytes] = {}

    def close(self) -> None:
        """The base device belongs to whoever opened it."""

    def freeze(self) -> None:
        self.writable = False

    def dirty_blocks(self) -> dict[int, bytes]:
        """Every block written so far (block number → its bytes)."""
        return dict(self._blocks)

    def _block(self, block: int) -> bytes:
        data = self._blocks.get(block)
        if data is None:
            data = self.base.pread(block * self.block_size, self.block_size)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        if not self._blocks or length == 0:
            return self.base.pread(offset, length)
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        if not any(block in self._blocks for block in range(first, last + 1)):
            return self.base.pread(offset, length)
        data = b"".join(self._block(block) for block in range(first, last + 1))
        skip = offset - first * bs
        return data[skip : skip + length]

    def preadv(self, buffers: Sequence[bytearray | memoryview], offset: int) -> int:
        return preadv_by_pread(self.pread, buffers, offset)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise OSError("the copy-on-write device is frozen (read-only)")
        self.check_range(offset, len(data))
        bs = self.block_size
        view = memoryview(bytes(data))
        done = 0
        while done < len(view):
            at = offset + done
            block, skip = divmod(at, bs)
            piece = min(bs - skip, len(view) - done)
            if skip == 0 and piece == bs:
                self._blocks[block] = bytes(view[done : done + piece])
            else:
                current = bytearray(self._block(block))
                current[skip : skip + piece] = view[done : done + piece]
                self._blocks[block] = bytes(current)
            done += piece

    def flush(self) -> None:
        """Nothing to make durable: the blocks live in memory."""
