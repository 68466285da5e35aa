"""Writing the jbd2 log: where the next transaction goes, and when log space is reused.

The MetadataWriter hands one commit's blocks to `log_transaction`, which
writes the transaction as the kernel's ordered mode does:

1. revoke, descriptor and copy blocks at the log head (with the journal
   superblock first if the log was empty, so replay knows where to start);
2. flush: those blocks and every file data block written before the commit
   are on the device;
3. the commit block, flush: from here on a crash replays the transaction.

The caller then writes the same blocks in place (the checkpoint) without a
flush. Log space is reclaimed lazily: when a transaction does not fit, one
flush makes every earlier checkpoint durable and the journal superblock
moves the log start to the head. A block that was logged in a transaction
still in the log and is freed gets a revoke record, so a replay can never
write old metadata over the data a later owner put in it.

The journal's own blocks are never written here except through the log
positions, and the log's device blocks come from the journal inode's
mapping, checked at open (JournalBlocks).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Corrupt, Unsupported
from ext4box.ext4.journal.log import JournalBlocks
from ext4box.ext4.journal.superblock import (
    COMPAT_CHECKSUM,
    INCOMPAT_64BIT,
    INCOMPAT_ASYNC_COMMIT,
    INCOMPAT_CSUM_V2,
    INCOMPAT_CSUM_V3,
    INCOMPAT_REVOKE,
    JournalSuperblock,
)
from ext4box.ext4.journal.transaction import build_transaction, log_blocks_needed

log = structlog.get_logger("ext4box.ext4.journal")

_MASK32 = 0xFFFFFFFF
# jbd2 keeps one transaction under a quarter of the log; so do we, by asking
# for a commit once this share of the log is dirty (MetadataWriter.wants_commit).
_SOFT_LIMIT_SHARE = 4


class JournalWriter:
    def __init__(self, dev: BlockDevice, blocks: JournalBlocks, jsb: JournalSuperblock,
                 *, metadata_csum: bool, fs_64bit: bool) -> None:
        if jsb.start:
            raise Corrupt("journal", "journal block 0",
                          "the log is not empty; it must be recovered before writing")
        if jsb.version != 2:
            raise Unsupported("journal v1", "journal block 0",
                              "writing a version 1 journal is not implemented")
        self.dev = dev
        self.blocks = blocks
        self.block_size = jsb.block_size
        self._jsb = self._with_our_features(jsb, metadata_csum=metadata_csum,
                                            fs_64bit=fs_64bit)
        self._sequence = jsb.sequence  # the next transaction's id
        self._head = self._jsb.first  # where it goes
        self._tail: int | None = None  # log start on the device; None = log empty
        self._tail_sequence = self._sequence
        # Blocks logged by transactions still in the log: freeing one needs a revoke.
        self._live: dict[int, int] = {}
        self._revokes: set[int] = set()
        self.transactions = 0

    @staticmethod
    def _with_our_features(jsb: JournalSuperblock, *, metadata_csum: bool,
                           fs_64bit: bool) -> JournalSuperblock:
        """Set the journal features as the kernel does when it mounts: checksum v3
        with metadata_csum and none otherwise, 64-bit tags on a 64bit filesystem,
        synchronous commits. Written now, while the log is empty."""
        incompat = jsb.incompat & ~(INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3 | INCOMPAT_ASYNC_COMMIT)
        if metadata_csum:
            incompat |= INCOMPAT_CSUM_V3
        if fs_64bit:
            incompat |= INCOMPAT_64BIT
        # Revoke records may appear in any transaction (the kernel sets this bit
        # with its first revoke; replay honours revoke blocks either way).
        incompat |= INCOMPAT_REVOKE
        compat = jsb.compat & ~COMPAT_CHECKSUM
        return JournalSuperblock.parse(
            jsb.encode_log_state(sequence=jsb.sequence, start=0, compat=compat,
                                 incompat=incompat),
            fs_block_size=jsb.block_size, journal_blocks=jsb.maxlen)

    def start(self) -> None:
        """Write the journal superblock with our features (the log stays empty)."""
        self._write_superblock(self._jsb)
        self.dev.flush()

    # ---- space -------------------------------------------------------------

    @property
    def soft_limit(self) -> int:
        """Dirty blocks at which the filesystem should commit."""
        return max(self._jsb.log_blocks // _SOFT_LIMIT_SHARE, 1)

    def fits(self, copies: int, revokes: int) -> bool:
        """Whether a transaction of this size fits in an emptied log."""
        return log_blocks_needed(self._jsb, copies, revokes) <= self._jsb.log_blocks - 1

    def _free_blocks(self) -> int:
        if self._tail is None:
            return self._jsb.log_blocks
        used = (self._head - self._tail) % self._jsb.log_blocks
        return self._jsb.log_blocks - used

    # ---- revokes ------------------------------------------------------------

    def block_released(self, pblk: int, count: int) -> None:
        """Blocks [pblk, pblk + count) are free from the next transaction on."""
        live = self._live
        if not live:
            return
        if count <= len(live):
            hits = [b for b in range(pblk, pblk + count) if b in live]
        else:
            hits = [b for b in live if pblk <= b < pblk + count]
        for block in hits:
            self._revokes.add(block)

    @property
    def pending_revokes(self) -> int:
        return len(self._revokes)

    @property
    def revoke_bound(self) -> int:
        """At most how many revokes the next transaction can carry."""
        return len(self._revokes) + len(self._live)

    # ---- transactions ---------------------------------------------------------

    def log_transaction(self, copies: Mapping[int, bytes]) -> None:
        """Write and commit one transaction holding `copies` (filesystem block →
        contents) and the pending revokes; durable when this returns."""
        revokes = self._revokes
        needed = log_blocks_needed(self._jsb, len(copies), len(revokes))
        if needed > self._jsb.log_blocks - 1:
            raise ValueError(f"transaction of {needed} blocks exceeds the log")
        if needed >= self._free_blocks():
            # Leave one block free so head never catches up with the tail.
            self.reclaim()
            revokes = self._revokes  # emptied: nothing older is in the log any more
        sequence = self._sequence
        txn = build_transaction(self._jsb, sequence, copies, revokes, commit_ns=time.time_ns())
        first_position = self._head
        if self._tail is None:
            # Replay must know where the log starts before a commit block can count.
            self._write_superblock_state(sequence, first_position)
            self._tail, self._tail_sequence = first_position, sequence
        body, commit = txn.blocks[:-1], txn.blocks[-1]
        commit_position = self._write_log(first_position, body)
        self.dev.flush()
        self._write_log(commit_position, [commit])
        self.dev.flush()
        self._head = self._jsb.wrap(commit_position + 1)
        self._sequence = (sequence + 1) & _MASK32
        for target in copies:
            self._live[target] = sequence
        self._revokes = set()
        self.transactions += 1

    def _write_log(self, position: int, blocks: list[bytes]) -> int:
        """Write consecutive log blocks from `position` (wrapping, merged into runs of
        adjacent device blocks); returns the position after the last one."""
        bs = self.block_size
        run_start = -1
        run: list[bytes] = []
        for data in blocks:
            pblk = self.blocks.device_block(position)
            if run and pblk != run_start + len(run):
                self.dev.pwrite(run_start * bs, b"".join(run))
                run = []
            if not run:
                run_start = pblk
            run.append(data)
            position = self._jsb.wrap(position + 1)
        if run:
            self.dev.pwrite(run_start * bs, b"".join(run))
        return position

    # ---- checkpoint --------------------------------------------------------------

    def reclaim(self) -> None:
        """Make every checkpoint durable and empty the log (the next transaction
        starts a new one at the head)."""
        if self._tail is None:
            return
        self.dev.flush()
        self._write_superblock_state(self._sequence, 0)
        self.dev.flush()
        self._tail = None
        self._tail_sequence = self._sequence
        self._live.clear()
        self._revokes.clear()

    def close(self) -> None:
        """Clean unmount: everything checkpointed, the log empty on the device."""
        self.reclaim()
        log.info("journal_closed", transactions=self.transactions,
                 next_sequence=self._sequence)

    def record_abort(self, errno: int) -> None:
        """Record in the journal superblock that the journal was aborted (as jbd2
        does, s_errno = -errno), so whoever mounts or checks the image next knows
        the filesystem needs a full check. Best effort: the device may be failing."""
        raw = self._jsb.encode_errno(-abs(errno))
        self._jsb = JournalSuperblock.parse(raw, fs_block_size=self.block_size,
                                            journal_blocks=self._jsb.maxlen)
        self._write_superblock(self._jsb)
        self.dev.flush()

    # ---- the journal superblock ---------------------------------------------------

    def _write_superblock_state(self, sequence: int, start: int) -> None:
        raw = self._jsb.encode_log_state(sequence=sequence, start=start)
        self._jsb = JournalSuperblock.parse(raw, fs_block_size=self.block_size,
                                            journal_blocks=self._jsb.maxlen)
        self._write_superblock(self._jsb)

    def _write_superblock(self, jsb: JournalSuperblock) -> None:
        # The rest of block 0 is kept as it is on the device (s_users and beyond).
        pblk = self.blocks.device_block(0)
        block = bytearray(self.blocks.read(0))
        block[: len(jsb.raw)] = jsb.raw
        self.dev.pwrite(pblk * self.block_size, block)
