"""Drive the read side in-process over one image, the way a FUSE client would.

`exercise(image)` opens the image through the facade and does what a mount
plus `find -exec cat` plus `getfattr -d` would: walk every directory (readdir,
also resumed from a cookie), look every name up, build the attributes the
FUSE layer would return, read every file through the iomap engine (start, a
middle window and the tail), read every symlink and every xattr.

The oracle is the contract of issue 6: only `Ext4Error` subclasses may
escape an operation (anything else propagates to the caller as a crash), no
operation may run longer than `op_timeout` seconds (an `OperationHang` is
raised from a timer signal), and the caller can bound memory around it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeVar

import structlog

from ext4box.blockdev import BlockDevice
from ext4box.ext4.format.errors import Ext4Error
from ext4box.ext4.opening import open_filesystem
from ext4box.ext4.read.filesystem import ACL_XATTRS, Filesystem
from ext4box.fuse.attr_replies import pack_entry
from ext4box.fuse.attrs import entry_attributes
from ext4box.iomap.engine import IOMapEngine

T = TypeVar("T")

OP_TIMEOUT_S = 5.0
MAX_INODES = 600  # per image: bounds a walk of an image full of hard-linked dirs
MAX_DIR_ENTRIES = 4096  # per directory listing
READ_CHUNK = 128 * 1024  # the kernel's usual FUSE read size
MAX_READ_BYTES = 1 << 20  # per file, from the start
ROOT_INO = 2


class OperationHang(BaseException):
    """An operation ran past its time bound. A BaseException so that no
    `except Exception` inside the engine can swallow it."""


@dataclass(slots=True)
class Report:
    opened: bool = False
    ops: int = 0
    errors: int = 0  # operations that ended in an Ext4Error (the accepted outcome)
    longest_s: float = 0.0
    longest_op: str = ""
    errnos: dict[str, int] = field(default_factory=dict)


class _Timer:
    """SIGALRM-based bound on one operation (main thread only; elsewhere a no-op)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = threading.current_thread() is threading.main_thread()
        self.current = ""

    def __enter__(self) -> _Timer:
        if self.active:
            self.previous = signal.signal(signal.SIGALRM, self._fire)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)

    def _fire(self, signum: int, frame: object) -> None:
        raise OperationHang(f"{self.current} ran longer than {self.seconds}s")

    def arm(self, what: str) -> None:
        self.current = what
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def disarm(self) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)


class _Session:
    def __init__(self, report: Report, timer: _Timer) -> None:
        self.report = report
        self.timer = timer

    def op(self, what: str, fn: Callable[[], T]) -> T | None:
        """Run one request; Ext4Error is an answer, anything else escapes."""
        report = self.report
        report.ops += 1
        self.timer.arm(what)
        start = time.perf_counter()
        try:
            return fn()
        except Ext4Error as err:
            report.errors += 1
            name = type(err).__name__
            report.errnos[name] = report.errnos.get(name, 0) + 1
            return None
        finally:
            self.timer.disarm()
            elapsed = time.perf_counter() - start
            if elapsed > report.longest_s:
                report.longest_s = elapsed
                report.longest_op = what


def quiet_logs() -> dict[str, object]:
    """Drop the engine's log lines (every Corrupt logs one); returns the config to restore."""
    saved = structlog.get_config()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        cache_logger_on_first_use=False,
    )
    return saved


def exercise(image: bytes | bytearray, *, op_timeout: float = OP_TIMEOUT_S) -> Report:
    """Open `image` and request everything in it; see the module docstring."""
    fd = os.memfd_create("fuzz-image")
    report = Report()
    try:
        os.write(fd, image)
        dev = BlockDevice(fd, size=len(image))
        with _Timer(op_timeout) as timer:
            session = _Session(report, timer)
            fs = session.op("open", lambda: open_filesystem(dev))
            if fs is None:
                return report
            report.opened = True
            _walk(session, fs, IOMapEngine(fs, dev))
            fs.close()
    finally:
        os.close(fd)
    return report


def _walk(s: _Session, fs: Filesystem, engine: IOMapEngine) -> None:
    s.op("statfs", fs.statfs)
    visited: set[int] = set()
    pending = [ROOT_INO]
    _visit(s, fs, engine, ROOT_INO)
    visited.add(ROOT_INO)
    while pending and len(visited) < MAX_INODES:
        dir_ino = pending.pop(0)
        items = s.op(f"readdir {dir_ino}",
                     lambda d=dir_ino: list(islice(fs.readdir(d), MAX_DIR_ENTRIES)))
        if not items:
            continue
        # Resume a listing from the middle, as the kernel does between batches.
        middle = items[len(items) // 2].cookie
        s.op(f"readdir {dir_ino} from {middle}",
             lambda d=dir_ino, c=middle: list(islice(fs.readdir(d, c), MAX_DIR_ENTRIES)))
        for item in items:
            if item.name in (b".", b".."):
                continue
            s.op(f"lookup {dir_ino}/{item.name!r}", lambda d=dir_ino, n=item.name: fs.lookup(d, n))
            if item.ino in visited or len(visited) >= MAX_INODES:
                continue
            visited.add(item.ino)
            if _visit(s, fs, engine, item.ino):
                pending.append(item.ino)
    s.op("lookup missing", lambda: fs.lookup(ROOT_INO, b"no-such-name"))


def _visit(s: _Session, fs: Filesystem, engine: IOMapEngine, ino: int) -> bool:
    """Everything a client can ask of one inode; True if it is a directory to descend."""
    inode = s.op(f"inode {ino}", lambda: fs.inode(ino))
    if inode is None:
        return False
    # Packed as the native session packs a LOOKUP reply: any inode field the
    # protocol cannot carry (a time before 1970, a huge id) must not crash it.
    s.op(f"getattr {ino}", lambda: pack_entry(entry_attributes(inode, fs.block_size)))
    names = s.op(f"listxattr {ino}", lambda: fs.listxattr(ino)) or []
    for name in [*names, *ACL_XATTRS]:
        s.op(f"getxattr {ino} {name!r}", lambda n=name: fs.getxattr(ino, n))
    if inode.is_symlink:
        s.op(f"readlink {ino}", lambda: fs.readlink(ino))
    elif inode.is_reg:
        _read_file(s, engine, inode)
    return inode.is_dir


def _read_file(s: _Session, engine: IOMapEngine, inode: object) -> None:
    size = inode.size  # type: ignore[attr-defined]
    ino = inode.ino  # type: ignore[attr-defined]
    offsets = list(range(0, min(size, MAX_READ_BYTES), READ_CHUNK))
    # A window in the middle and the tail: far offsets reach deep tree paths.
    offsets += [size // 2, max(0, size - READ_CHUNK)]
    for pos in dict.fromkeys(offsets):
        s.op(f"read {ino} @{pos}", lambda p=pos: engine.read(inode, p, READ_CHUNK))  # type: ignore[arg-type]
