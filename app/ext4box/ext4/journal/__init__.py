"""The jbd2 journal: on-disk structures (one module each) and recovery.

`recovery.plan_recovery` finds what a crashed journal holds; a read-only mount
serves it through `overlay.OverlayDevice`, a read-write mount writes it onto
the device with `recovery.replay_onto_device`.
"""
