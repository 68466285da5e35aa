"""The kernel-vs-ext4box state machine on an image without extents (block maps).

The machine of test_rw_differential.py runs here on `mkfs.ext4 -O
^extent,^64bit` (1 KiB blocks), where every file maps its blocks through 12
direct pointers and single, double and triple indirect blocks. Its offsets and
fragment plans (pieces separated by holes, up to a few MiB into the file) cross
the 12 KiB and 268 KiB boundaries where the first indirect and the first
double-indirect block are needed, and truncates and punches free them again.
fallocate in any mode but PUNCH_HOLE must fail with EOPNOTSUPP on both sides.
At the end both images must pass `e2fsck -fn`, the trees must walk the same,
and the file of more than 336 pieces the machine starts with must use a
double-indirect block on both (debugfs `stat`).

Cost: EXT4BOX_DIFF_BLOCKMAP_EXAMPLES (default 2) sequences of at most
EXT4BOX_DIFF_BLOCKMAP_STEPS (default 300) steps. Long run of 4 Dec 2026
(`=30 =600`): 30 sequences, 10,746 steps, 0 mismatches, all images
e2fsck-clean; files at the end by indirection levels 0/1/2: 46/7/55 on
both images.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_rw_differential import KernelVsExt4box, run_machine

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

EXAMPLES = int(os.environ.get("EXT4BOX_DIFF_BLOCKMAP_EXAMPLES", "2"))
STEPS = int(os.environ.get("EXT4BOX_DIFF_BLOCKMAP_STEPS", "300"))


class KernelVsExt4boxBlockMap(KernelVsExt4box):
    mkfs_args = ("-O", "^extent,^64bit")
    extents = False
    steps_run: list[int] = []
    outcomes: dict[str, int] = {}
    block_differences = 0
    seek_differences = 0


def test_kernel_vs_ext4box_block_map(tmp_path: Path) -> None:
    machine = KernelVsExt4boxBlockMap
    run_machine(machine, tmp_path, EXAMPLES, STEPS)
    runs = machine.steps_run
    print(f"differential (block map): {len(runs)} sequences, {sum(runs)} steps ({runs})")
    print(f"differential (block map) outcomes: {sorted(machine.outcomes.items())}")
    print(f"differential (block map): entries with different st_blocks: "
          f"{machine.block_differences}; data maps wider on the kernel: "
          f"{machine.seek_differences}")
    depths = machine.depths  # each sequence checked its deep file used a double-indirect block
    print(f"differential (block map): files by indirection levels at the end: "
          f"kernel {sorted(depths['kernel'].items())}, ext4box {sorted(depths['ext4box'].items())}")
    assert machine.outcomes.get("ok", 0) > 0, "no step of the machine succeeded"
