"""The native FUSE session: our own request loop on a mounted /dev/fuse descriptor.

    INIT:  read the kernel's first request, negotiate (negotiate.py), reply,
           log what was agreed, then `after_init` (the appliance's READY,
           read-ahead tuning)
    loop:  one blocking readv into a preallocated buffer sized for the
           largest WRITE, parse the header, look the opcode up in the
           dispatch table, check the body's length, call the handler,
           answer with one writev (no answer for FORGET/INTERRUPT)
    end:   ENODEV when the kernel unmounts (or the connection is aborted),
           or SIGINT/SIGTERM/SIGHUP; either way returns normally

With FUSE over io_uring chosen at INIT (`transport`, uring_transport.choose),
the loop is uring_transport's instead, on the same dispatch table.

One thread, no event loop: requests are answered in the order they are read.
A read-write session commits every COMMIT_INTERVAL_S while changes are
pending: then (only then) the loop polls the fd with a timeout before
reading. Signals end the loop only between requests: a request being
answered is always finished.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import signal
import time
from collections.abc import Callable
from types import FrameType

from ext4box.ext4.write.caller import Caller, acting_as
from ext4box.fuse import negotiate
from ext4box.fuse import protocol as p
from ext4box.fuse.dispatch import Dispatcher, Handler, Payload
from ext4box.fuse.errors import FuseError
from ext4box.fuse.operations import Operations
from ext4box.fuse.uring_protocol import OVER_IO_URING
from ext4box.fuse.uring_transport import UringRefused, UringTransport, choose
from ext4box.log import get_logger

log = get_logger("ext4box.fuse")

# ext4's default commit interval: changes are made durable at least this often.
COMMIT_INTERVAL_S = 5.0
# The largest request: a WRITE of max_write bytes after its headers.
BUFFER_SIZE = negotiate.MAX_WRITE + 4096
_HEADER = p.IN_HEADER.size
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Distinct (uid, gid) callers remembered at once (a bound, not a working set).
_CALLERS_KEPT = 256


class NotMounted(Exception):
    """The descriptor has no FUSE connection (never mounted, or already gone)."""


class _Stop(Exception):
    """Raised by the signal handler while the loop waits for a request."""


class Session:
    """Serve `ops` on the mounted /dev/fuse descriptor `fuse_fd` (see module doc)."""

    def __init__(self, ops: Operations, fuse_fd: int, *,
                 after_init: Callable[[], None] | None = None, trace: bool = False,
                 transport: str = "dev") -> None:  # fmt: skip
        self.ops = ops
        # auto|uring|dev: FUSE over io_uring, or the plain loop on /dev/fuse.
        self.transport = transport
        self._uring: UringTransport | None = None
        # One debug line per request (`ext4box serve --debug`).
        self.trace = trace
        self.fd = fuse_fd
        self.after_init = after_init
        self.buffer = bytearray(BUFFER_SIZE)
        self.agreed: negotiate.Agreed | None = None
        self.stopped_by: signal.Signals | None = None
        self._waiting = False
        self._unknown_logged: set[int] = set()
        self._commit_due: float | None = None
        # Registered once: while changes are pending every request is waited
        # for through it (a new poll object per request cost as much as the poll).
        self._poller: select.poll | None = None
        # One Caller per (uid, gid) seen: a frozen dataclass costs a µs to build.
        self._callers: dict[tuple[int, int], Caller] = {}

    # -- the whole session -------------------------------------------------------

    def run(self) -> None:
        """Negotiate, then serve until unmounted or signalled.

        Raises NotMounted when the fd carries no mount (before any reply).
        """
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _SIGNALS}
        try:
            try:
                dispatcher = self._initialise()
                if dispatcher is None:
                    return
                uring, self._uring = self._uring, None
                if uring is None or not uring.serve(self, dispatcher, COMMIT_INTERVAL_S):
                    if uring is not None:
                        log.warning("transport", transport="dev",
                                    why="the kernel refused the io_uring entries")
                    self._serve(dispatcher)
            except _Stop:
                pass
            if self.stopped_by is not None:
                log.info("terminating", signal=self.stopped_by.name)
            self._commit()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopped_by = signal.Signals(signum)
        if self._waiting:
            raise _Stop  # nothing is half-answered while we wait for a request

    # -- INIT --------------------------------------------------------------------

    def _initialise(self) -> Dispatcher | None:
        while True:
            request = self._read()
            if request is None:
                if self.agreed is None and self.stopped_by is None:
                    raise NotMounted("the FUSE connection ended before INIT")
                return None
            length, opcode, unique = p.IN_HEADER.unpack_from(self.buffer)[:3]
            body = bytes(self.buffer[_HEADER:length])
            if opcode != p.Opcode.INIT:
                log.warning("request before INIT", opcode=opcode)
                self._reply_error(unique, errno.EIO)
                continue
            try:
                self._uring, why = choose(self.transport, body, self.fd)
            except UringRefused as err:
                self._reply_error(unique, errno.EPROTO)
                raise NotMounted(str(err)) from None
            try:
                reply, agreed = negotiate.negotiate(
                    body, also=OVER_IO_URING if self._uring is not None else 0,
                    writeback_cache=self.ops.writeback_cache,
                    time_gran_ns=self.ops.time_gran_ns)
            except FuseError as err:
                log.error("INIT refused", errno=errno.errorcode.get(err.errno, err.errno))
                self._reply_error(unique, err.errno)
                raise NotMounted("the kernel's FUSE protocol is not supported") from None
            self._reply(unique, reply)
            if agreed is None:
                if self._uring is not None:
                    self._uring.close()
                    self._uring = None
                continue  # the kernel retries with our major version
            self.agreed = agreed
            padded = body.ljust(p.INIT_IN.size, b"\0")
            kernel_major, kernel_minor = p.INIT_IN.unpack_from(padded)[:2]
            transport = "uring" if self._uring is not None else "dev"
            log.info("session", backend="native", fuse_fd=self.fd, transport=transport,
                     transport_why=why + (f" ({self._uring.describe()})" if self._uring else ""),
                     kernel_protocol=f"{kernel_major}.{kernel_minor}",
                     protocol=f"{agreed.major}.{agreed.minor}",
                     # FUSE_OVER_IO_URING is the transport field's business.
                     flags=",".join(p.flag_names(agreed.flags & ~OVER_IO_URING)),
                     not_offered=",".join(negotiate.missing_wanted(agreed)),
                     max_write=agreed.max_write, block_size=self.ops.block_size)  # fmt: skip
            # Everything alive now lives as long as the session: out of the
            # collector's sight, a full collection walks only what requests create.
            gc.freeze()
            if self.after_init is not None:
                self.after_init()
            return Dispatcher(self.ops, agreed)

    # -- the loop ----------------------------------------------------------------

    def _serve(self, dispatcher: Dispatcher) -> None:
        table = dispatcher.table()
        buffer = self.buffer
        view = memoryview(buffer)
        unpack_header = p.IN_HEADER.unpack_from
        ops = self.ops
        stale = ops.changed_behind_kernel
        while self.stopped_by is None:
            if ops.dirty and not self._wait_for_request():
                self._commit()
                continue
            count = self._read()
            if count is None:
                return
            length, opcode, unique, nodeid, uid, gid, pid, extlen = unpack_header(buffer)
            if length != count or length < _HEADER:
                log.error("malformed request", length=length, read=count, opcode=opcode)
                self._reply_error(unique, errno.EIO)
                continue
            route = table.get(opcode)
            if route is None:
                self._unknown(opcode, unique)
                continue
            min_size, handler = route
            if self.trace:
                log.debug("request", opcode=p.Opcode(opcode).name, unique=unique,
                          nodeid=nodeid, insize=length, uid=uid, pid=pid)
            # One copy out of the reused buffer; handlers may keep the bytes.
            body = bytes(view[_HEADER : length - extlen * 8])
            if len(body) < min_size:
                log.error("short request", opcode=opcode, body=len(body), needs=min_size)
                self._reply_error(unique, errno.EINVAL)
                continue
            self._answer(handler, unique, nodeid, (uid, gid, pid), body, opcode)
            if stale:
                for ino in stale:
                    self.notify_inval_inode(ino)
                stale.clear()
            if ops.listings_to_drop:
                for ino in ops.listings_to_drop:
                    self.notify_inval_inode(ino, 0, 0)  # the cached listing too
                ops.listings_to_drop.clear()

    def _answer(self, handler: Handler, unique: int, nodeid: int,
                caller: tuple[int, int, int], body: bytes, opcode: int) -> None:  # fmt: skip
        try:
            # The caller's ids decide what it may allocate (reserved blocks,
            # quota): the filesystem learns them for this request only.
            with acting_as(self._caller(caller[0], caller[1])):
                payload: Payload = handler(nodeid, caller, body)
        except FuseError as err:
            self._reply_error(unique, err.errno)
            return
        except Exception as err:  # a request must never take the server down
            log.error("unexpected error", opcode=opcode, exc_info=err)
            self._reply_error(unique, errno.EIO)
            return
        if payload is not None:
            self._reply(unique, payload)

    def _caller(self, uid: int, gid: int) -> Caller:
        known = self._callers.get((uid, gid))
        if known is None:
            if len(self._callers) >= _CALLERS_KEPT:
                self._callers.clear()
            known = self._callers[uid, gid] = Caller(uid, gid)
        return known

    def _unknown(self, opcode: int, unique: int) -> None:
        if opcode not in self._unknown_logged:
            self._unknown_logged.add(opcode)
            try:
                name = p.Opcode(opcode).name
            except ValueError:
                name = str(opcode)
            log.info("unsupported request", opcode=name, answer="ENOSYS")
        self._reply_error(unique, errno.ENOSYS)

    # -- reading and writing the device ------------------------------------------

    def _read(self) -> int | None:
        """Read one request into the buffer; its length, or None when the session is over."""
        while True:
            self._waiting = True
            try:
                count = os.readv(self.fd, [self.buffer])
                # /dev/fuse never reads 0 bytes; a socket standing in for it
                # (tests) does when the other end is gone.
                return count if count > 0 else None
            except OSError as err:
                if err.errno == errno.ENOENT:
                    continue  # the request was interrupted before we read it
                if err.errno in (errno.ENODEV, errno.EPERM):
                    # ENODEV: unmounted or aborted; EPERM: never mounted.
                    return None
                raise
            finally:
                self._waiting = False

    def _wait_for_request(self) -> bool:
        """While changes are pending: wait for a request until the commit is due."""
        now = time.monotonic()
        if self._commit_due is None:
            self._commit_due = now + COMMIT_INTERVAL_S
        remaining = self._commit_due - now
        if remaining <= 0:
            return False
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.fd, select.POLLIN)
        self._waiting = True
        try:
            return bool(poller.poll(remaining * 1000))
        finally:
            self._waiting = False

    def _commit(self) -> None:
        self._commit_due = None
        try:
            self.ops.commit_tick()
        except Exception as err:  # a failed commit must not stop the server
            log.error("commit failed", exc_info=err)

    def _reply(self, unique: int, payload: bytes | list[bytes]) -> None:
        if isinstance(payload, list):
            length = sum(len(part) for part in payload)
            self._write([p.OUT_HEADER.pack(p.OUT_HEADER.size + length, 0, unique), *payload])
        else:
            self._write([p.OUT_HEADER.pack(p.OUT_HEADER.size + len(payload), 0, unique),
                         payload])  # fmt: skip

    def _reply_error(self, unique: int, err: int) -> None:
        self._write([p.OUT_HEADER.pack(p.OUT_HEADER.size, -err, unique)])

    def _write(self, parts: list[bytes]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as err:
            # ENOENT: the request was interrupted or aborted meanwhile; the
            # kernel no longer waits for this answer.
            if err.errno != errno.ENOENT:
                raise

    # -- notifications -----------------------------------------------------------

    def _notify(self, code: p.NotifyCode, parts: list[bytes]) -> None:
        length = p.OUT_HEADER.size + sum(len(part) for part in parts)
        try:
            os.writev(self.fd, [p.OUT_HEADER.pack(length, code, 0), *parts])
        except OSError as err:
            # ENOENT: the kernel holds nothing for that inode or name.
            if err.errno != errno.ENOENT:
                log.warning("notify failed", code=code.name, errno=err.errno)

    def notify_inval_inode(self, ino: int, offset: int = -1, length: int = 0) -> None:
        """Drop the kernel's cached attributes of `ino` (and pages, for offset >= 0).

        Sent only between requests: the kernel may take locks the request
        being answered holds.
        """
        self._notify(p.NotifyCode.INVAL_INODE,
                     [p.NOTIFY_INVAL_INODE_OUT.pack(ino, offset, length)])

    def notify_inval_entry(self, parent: int, name: bytes) -> None:
        """Drop the kernel's dentry `name` in directory `parent` (between requests)."""
        self._notify(p.NotifyCode.INVAL_ENTRY,
                     [p.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0), name + b"\0"])
