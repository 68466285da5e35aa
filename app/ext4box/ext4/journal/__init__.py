"""The jbd2 journal: on-disk structures (one module each), recovery and the log writer.

`recovery.plan_recovery` finds what a crashed journal holds; a read-only mount
serves it through `overlay.OverlayDevice`, a read-write mount writes it onto
the device with `recovery.replay_onto_device`. Fast commits are found here
(`fast_commit`, `fast_commit_recovery`) but replayed by the write side, which
`ext4/opening.py` passes in.

This layer may import `ext4.read` (recovery reads the journal inode through a
read-only `Filesystem`), `ext4.format` and `ext4box.blockdev`; never
`ext4.write` or `ext4.opening`.
"""
