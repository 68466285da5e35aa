"""The rows of the results table, in order, with issue 7's target for each.

A target compares ext4box with the kernel ("kernel": ext4box rate / kernel rate
must reach `value`), with fuse2fs ("fuse2fs": ext4box rate / fuse2fs rate), or
bounds an absolute figure ("max": the memory workload's peak RSS in MiB).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # "kernel", "fuse2fs" or "max"
    value: float
    text: str


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    title: str
    group: str  # "data", "meta" or "memory": what --workloads selects
    target: Target | None


def _kernel(value: float, text: str | None = None) -> Target:
    return Target("kernel", value, text or f">= {value:.0%} of kernel")


_META = Target("fuse2fs", 3.0, ">= 3x fuse2fs")
# Issue 18: small appends (fstests generic/069) within 5x of the kernel's time.
_WITHIN_5X = _kernel(0.2, "within 5x of kernel (>= 20%)")

ROWS: tuple[Row, ...] = (
    Row("seq-read-cold", "seq read 1 MiB, buffered, cold", "data", _kernel(1.0)),
    Row("seq-read-warm", "seq re-read 1 MiB, warm cache", "data",
        _kernel(0.9, "= kernel (>= 90%)")),
    Row("seq-read-direct", "seq read 1 MiB, O_DIRECT", "data", _kernel(0.9)),
    Row("seq-write-direct", "seq write 1 MiB, O_DIRECT + fsync", "data", _kernel(0.9)),
    Row("seq-write", "seq write 1 MiB, buffered + fsync", "data", _kernel(0.9)),
    Row("rand-read-cold", "random read 4 KiB, buffered, cold", "data", _kernel(0.85)),
    Row("rand-read-direct", "random read 4 KiB, O_DIRECT", "data", _kernel(0.6)),
    Row("rand-write", "random write 4 KiB, buffered + fsync", "data", _kernel(0.5)),
    Row("append-small", "append 4 B x {app}, O_APPEND + fsync", "data", _WITHIN_5X),
    Row("append-small-wbc", "append 4 B x {app}, ext4box -o writeback_cache", "data",
        _WITHIN_5X),
    Row("meta-create", "create {n} empty files + syncfs", "meta", _META),
    Row("meta-stat", "stat {n} files, cold", "meta", _META),
    Row("meta-readdir", "readdir {n} files, cold", "meta", _META),
    Row("meta-unlink", "unlink {n} files + syncfs", "meta", _META),
    Row("untar", "untar {src}-file source tree + syncfs", "meta", _META),
    Row("find", "find over {src}-file source tree, cold", "meta", _META),
    Row("ls-lR", "ls -lR {n}-file tree, cold", "meta", None),
    Row("find-cat", "find + cat {src}-file source tree, cold", "meta", None),
    Row("memory-rss", "ext4box peak RSS, {mem}-file image", "memory",
        Target("max", 200.0, "< 200 MiB")),
)
ROW_BY_KEY = {row.key: row for row in ROWS}
GROUPS = ("data", "meta", "memory")


def met(target: Target, ext4box: float, kernel: float | None, fuse2fs: float | None
        ) -> bool | None:
    """Whether ext4box's figure meets the target; None when a comparison figure is missing."""
    if target.kind == "max":
        return ext4box < target.value
    other = kernel if target.kind == "kernel" else fuse2fs
    if other is None or other <= 0:
        return None
    return ext4box / other >= target.value
