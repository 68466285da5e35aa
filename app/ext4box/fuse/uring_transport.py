"""FUSE over io_uring: requests arrive as ring completions, answers go back as commits.

`choose` decides at INIT whether this session uses it (`transport=auto|uring|dev`):
auto takes io_uring when the kernel offers FUSE_OVER_IO_URING (enable_uring
is Y) and the rings with their buffers can be set up here, else the plain
/dev/fuse loop; the reason is logged either way. `UringTransport.serve`
then runs the loops, on the same dispatch table as the plain loop:

    register    one ring per kernel queue (one per possible CPU, see
                uring_protocol), its entries each a 288-byte header and a
                payload buffer of max_write; the kernel uses the rings once
                every queue has an entry
    threads     queue q is served by a thread pinned to CPU q: the kernel
                queues a request on the queue of its caller's CPU, so the
                answer needs no wake-up across CPUs (measured: a third of
                the plain loop's latency here; one thread for all queues
                was no better than /dev/fuse). The main thread serves queue
                0, /dev/fuse (FORGET and INTERRUPT still come that way, a
                poll in its ring) and the commit timer
    loop        wait; for each completed entry: rebuild the request body
                from op_in + payload, call the handler under the one lock
                (the filesystem is single-threaded), write the reply into
                the entry and queue COMMIT_AND_FETCH, submitted with the
                next wait: one io_uring_enter per request
    end         -ENOTCONN completions or ENODEV on /dev/fuse (unmount,
                abort), or a signal (main thread; the others are stopped
                through an eventfd); a refused REGISTER means the kernel
                has turned io_uring off for this connection: back to the
                plain loop

Requests are answered one at a time, as on the plain loop, and
notifications are still written to /dev/fuse between requests.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import signal
import struct
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from ext4box.ext4.write.caller import Caller, acting_as
from ext4box.fuse import negotiate, uring_ring
from ext4box.fuse import protocol as p
from ext4box.fuse import uring_protocol as up
from ext4box.fuse.dispatch import Dispatcher, Handler, Payload
from ext4box.fuse.errors import FuseError
from ext4box.fuse.operations import Operations
from ext4box.log import get_logger


class Session(Protocol):
    """What the loops use of session.Session (which imports this module)."""

    ops: Operations
    trace: bool
    buffer: bytearray
    stopped_by: signal.Signals | None
    _waiting: bool
    _commit_due: float | None
    _unknown_logged: set[int]

    def _commit(self) -> None: ...
    def _reply(self, unique: int, payload: bytes | list[bytes]) -> None: ...
    def _reply_error(self, unique: int, err: int) -> None: ...
    def notify_inval_inode(self, ino: int, offset: int = -1, length: int = 0) -> None: ...

log = get_logger("ext4box.fuse")

# Entries per queue. One server thread answers one request at a time; a
# second entry lets a queue hand over its next request while we answer.
QUEUE_DEPTH = 1
_HEADER = p.IN_HEADER.size
_POLL = 1 << 63  # user_data of the /dev/fuse poll
_U32 = struct.Struct("<I")
_IOVECS = struct.Struct("<QQQQ")
# At most this many /dev/fuse reads (FORGETs, mostly) per poll wake-up.
_DEVICE_BATCH = 64


class UringRefused(Exception):
    """transport=uring was asked for and cannot be had; the reason is the message."""


def why_unavailable() -> str | None:
    """Why this process cannot serve FUSE over io_uring now, or None if it can try."""
    unsupported = uring_ring.supported()
    if unsupported is not None:
        return unsupported
    try:
        with open(up.ENABLE_PARAMETER) as f:
            if f.read().strip() != "Y":
                return f"{up.ENABLE_PARAMETER} is not Y"
    except OSError as err:
        return f"cannot read {up.ENABLE_PARAMETER}: {err.strerror}"
    try:
        _queue_count()
    except (OSError, ValueError) as err:
        return f"cannot count the kernel's queues ({up.POSSIBLE_CPUS}): {err}"
    try:
        uring_ring.Ring(2).close()
    except OSError as err:
        return f"io_uring_setup: {err.strerror}"
    return None


def _queue_count() -> int:
    with open(up.POSSIBLE_CPUS) as f:
        return up.possible_cpus(f.read())


def offered(init_body: bytes) -> bool:
    """Whether the kernel's fuse_init_in offers FUSE_OVER_IO_URING."""
    padded = bytes(init_body[: p.INIT_IN.size]).ljust(p.INIT_IN.size, b"\0")
    flags, flags2 = p.INIT_IN.unpack_from(padded)[3:5]
    return bool(flags & p.InitFlag.INIT_EXT and (flags2 << 32) & up.OVER_IO_URING)


def choose(transport: str, init_body: bytes, fuse_fd: int) -> tuple[UringTransport | None, str]:
    """At INIT: the io_uring transport to use (None: the plain loop), and why.

    transport=uring raises UringRefused where auto falls back.
    """
    if transport == "dev":
        return None, "transport=dev"
    why: str | None
    if not offered(init_body):
        why = "the kernel does not offer FUSE_OVER_IO_URING (enable_uring is N)"
    elif (unsupported := uring_ring.supported()) is not None:
        why = unsupported
    else:
        try:
            ring = UringTransport(fuse_fd, _queue_count(), QUEUE_DEPTH,
                                  up.payload_size(negotiate.MAX_WRITE, negotiate.MAX_PAGES,
                                                  negotiate.PAGE_SIZE))  # fmt: skip
            return ring, f"transport={transport} and the kernel offers FUSE_OVER_IO_URING"
        except (OSError, ValueError) as err:
            why = f"cannot set up the ring: {err}"
    if transport == "uring":
        raise UringRefused(f"transport=uring: {why}")
    return None, f"transport=auto: {why}"


@dataclass(slots=True)
class _Entry:
    """One registered ring entry: its queue's ring, its header slot and its payload buffer."""

    index: int  # its user_data in its ring
    qid: int
    ring: uring_ring.Ring
    header: int  # offset of its fuse_uring_req_header in the shared header buffer
    payload: mmap.mmap
    payload_view: memoryview
    iovecs: ctypes.Array[ctypes.c_char]  # header and payload iovecs, read by REGISTER
    iovecs_at: int  # their address


class UringTransport:
    """One ring per kernel queue, the entries' buffers, and the loops (module doc)."""

    def __init__(self, fuse_fd: int, queues: int, depth: int, payload_size: int) -> None:
        self.fd = fuse_fd
        self.queues = queues
        self.depth = depth
        self.payload_size = payload_size
        count = queues * depth
        self.rings: list[uring_ring.Ring] = []
        self.entries: list[list[_Entry]] = []  # by qid
        try:
            self.headers = mmap.mmap(-1, max(count * up.REQ_HEADER_SIZE, mmap.PAGESIZE))
            self.header_view = memoryview(self.headers)
            headers_at = ctypes.addressof(ctypes.c_char.from_buffer(self.headers))
            for qid in range(queues):
                # Room for the entries, the /dev/fuse or stop poll, and a spare.
                ring = uring_ring.Ring(depth + 2)
                self.rings.append(ring)
                entries = []
                for index in range(depth):
                    payload = mmap.mmap(-1, payload_size)
                    address = ctypes.addressof(ctypes.c_char.from_buffer(payload))
                    iovecs = ctypes.create_string_buffer(_IOVECS.size)
                    header = (qid * depth + index) * up.REQ_HEADER_SIZE
                    _IOVECS.pack_into(iovecs, 0, headers_at + header, up.REQ_HEADER_SIZE,
                                      address, payload_size)  # fmt: skip
                    entries.append(_Entry(index, qid, ring, header, payload, memoryview(payload),
                                          iovecs, ctypes.addressof(iovecs)))  # fmt: skip
                self.entries.append(entries)
        except BaseException:
            for ring in self.rings:
                ring.close()
            raise
        # Handlers and the filesystem are single-threaded: one request at a time.
        self._lock = threading.Lock()
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._helpers: list[threading.Thread] = []
        self._early: list[list[tuple[int, int, int]]] = [[] for _ in range(queues)]

    def describe(self) -> str:
        return (f"{self.queues} queue(s) x {self.depth} entr{'y' if self.depth == 1 else 'ies'},"
                f" {self.payload_size // 1024} KiB payload each, one thread per queue")

    # -- the whole session ------------------------------------------------------------

    def serve(self, session: Session, dispatcher: Dispatcher, commit_interval: float) -> bool:
        """Serve until unmounted or signalled (True), or False when the kernel
        refused the ring and requests go to /dev/fuse again (the plain loop's job)."""
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        # A poll wake-up can be stale (an interrupt withdrawn): never block on a read.
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        affinity = os.sched_getaffinity(0)
        try:
            table = dispatcher.table()
            if not self._register():
                return False
            for qid in range(1, self.queues):
                helper = threading.Thread(target=self._serve_queue, args=(qid, session, table),
                                          name=f"fuse-uring-q{qid}", daemon=True)  # fmt: skip
                helper.start()
                self._helpers.append(helper)
            _pin(0)
            return self._main_loop(session, table, commit_interval)
        finally:
            self._stop_helpers()
            self.close()
            os.sched_setaffinity(0, affinity)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)

    def _register(self) -> bool:
        """Hand every entry to its queue; False if the kernel refused one.

        A refusal completes at once, so it is in the CQ right after the
        submit. So may a request: a caller already waiting is handed to an
        entry as soon as the last queue has one; those are kept in `_early`
        for the queue's loop. (The first request of each queue is handed
        over as task work of this thread, the submitter; from its commit
        on, the queue's own thread.)
        """
        refused = False
        for qid, ring in enumerate(self.rings):
            for entry in self.entries[qid]:
                ring.queue_fuse_cmd(self.fd, up.CMD_REGISTER, entry.iovecs_at, 2, entry.index,
                                    0, 0, qid)  # fmt: skip
            ring.enter(0)
        for qid, ring in enumerate(self.rings):
            for completion in ring.completions():
                if completion[1] < 0:
                    log.warning("io_uring entry refused", qid=qid,
                                errno=errno.errorcode.get(-completion[1], completion[1]))
                    refused = True
                else:
                    self._early[qid].append(completion)
        # A refused entry leaves its queue empty: the kernel never uses the rings.
        return not refused

    def _main_loop(self, session: Session, table: dict[int, tuple[int, Handler]],
                   commit_interval: float) -> bool:  # fmt: skip
        """Queue 0, /dev/fuse (FORGET, INTERRUPT) and the commit timer, on this thread."""
        ring, fd = self.rings[0], self.fd
        ring.queue_poll(fd, select.POLLIN, _POLL)
        live = len(self.entries[0])
        ops = session.ops
        for user_data, _result, _flags in self._early[0]:
            self._answer_locked(session, self.entries[0][user_data], table)
        while session.stopped_by is None:
            timeout = None
            if ops.dirty:
                now = time.monotonic()
                if session._commit_due is None:
                    session._commit_due = now + commit_interval
                timeout = session._commit_due - now
                if timeout <= 0:
                    with self._lock:
                        session._commit()
                    continue
            session._waiting = True
            try:
                ring.enter(1, timeout)
            except InterruptedError:
                continue
            finally:
                session._waiting = False
            for user_data, result, _flags in ring.completions():
                if user_data == _POLL:
                    with self._lock:
                        connected = self._read_device(session, table)
                    if not connected:
                        return True
                    ring.queue_poll(fd, select.POLLIN, _POLL)
                elif result == 0:
                    self._answer_locked(session, self.entries[0][user_data], table)
                else:
                    _released(result, 0)
                    live -= 1
                    if live == 0:
                        return True
        return True

    def _serve_queue(self, qid: int, session: Session, table: dict[int, tuple[int, Handler]]
                     ) -> None:  # fmt: skip
        """Queue `qid` on its own thread, on its CPU: the kernel hands a request to
        the queue of the CPU its caller runs on, so the answer needs no wake-up
        across CPUs. Ends when the kernel lets the entries go, or at _stop."""
        _pin(qid)
        ring = self.rings[qid]
        ring.queue_poll(self._stop, select.POLLIN, _POLL)
        live = len(self.entries[qid])
        try:
            for user_data, _result, _flags in self._early[qid]:
                self._answer_locked(session, self.entries[qid][user_data], table)
            while live:
                try:
                    ring.enter(1)
                except InterruptedError:
                    continue
                for user_data, result, _flags in ring.completions():
                    if user_data == _POLL:
                        return
                    if result == 0:
                        self._answer_locked(session, self.entries[qid][user_data], table)
                    else:
                        _released(result, qid)
                        live -= 1
        except Exception as err:  # the main thread still serves queue 0 and ends the session
            log.error("io_uring queue thread failed", qid=qid, exc_info=err)

    def _stop_helpers(self) -> None:
        os.eventfd_write(self._stop, 1)
        for helper in self._helpers:
            helper.join(timeout=30)
            if helper.is_alive():
                log.error("io_uring queue thread did not stop", thread=helper.name)

    def _answer_locked(self, session: Session, entry: _Entry,
                       table: dict[int, tuple[int, Handler]]) -> None:  # fmt: skip
        stale = session.ops.changed_behind_kernel
        with self._lock:
            self._answer(session, entry, table)
            if stale:
                for ino in stale:
                    session.notify_inval_inode(ino)
                stale.clear()
        # The commit goes in with this thread's next wait: one io_uring_enter.

    # -- requests from the ring ------------------------------------------------------

    def _answer(self, session: Session, entry: _Entry, table: dict[int, tuple[int, Handler]]
                ) -> None:  # fmt: skip
        headers, base = self.header_view, entry.header
        length, opcode, unique, nodeid, uid, gid, pid, extlen = p.IN_HEADER.unpack_from(
            headers, base)
        payload_size = _U32.unpack_from(headers, base + up.PAYLOAD_SZ_OFFSET)[0]
        op_size = length - _HEADER - payload_size
        if not 0 <= op_size <= up.OP_IN_OUT_SIZE or payload_size > self.payload_size:
            log.error("malformed ring request", length=length, payload=payload_size,
                      opcode=opcode)  # fmt: skip
            self._commit(entry, unique, -errno.EIO, None)
            return
        route = table.get(opcode)
        if route is None:
            session._unknown_logged.add(opcode)
            log.info("unsupported request", opcode=opcode, answer="ENOSYS")
            self._commit(entry, unique, -errno.ENOSYS, None)
            return
        min_size, handler = route
        if session.trace:
            log.debug("request", opcode=p.Opcode(opcode).name, unique=unique, nodeid=nodeid,
                      insize=length, uid=uid, pid=pid, via="uring")  # fmt: skip
        start = base + up.OP_IN_OFFSET
        if payload_size:
            body = b"".join((headers[start : start + op_size],
                             entry.payload_view[:payload_size]))  # fmt: skip
        else:
            body = bytes(headers[start : start + op_size])
        if extlen:
            body = body[: len(body) - extlen * 8]
        if len(body) < min_size:
            log.error("short request", opcode=opcode, body=len(body), needs=min_size)
            self._commit(entry, unique, -errno.EINVAL, None)
            return
        error, payload = _call(handler, nodeid, (uid, gid, pid), body, opcode)
        if not error and payload is None:
            log.error("no answer for a ring request", opcode=opcode)
            error = -errno.EIO
        self._commit(entry, unique, error, payload)

    def _commit(self, entry: _Entry, unique: int, error: int, payload: Payload) -> None:
        size = 0
        if not error and payload:
            view = entry.payload_view
            parts = payload if isinstance(payload, list) else (payload,)
            size = sum(len(part) for part in parts)
            if size > self.payload_size:
                log.error("reply larger than the ring payload", size=size)
                error, size = -errno.EIO, 0
            else:
                at = 0
                for part in parts:
                    view[at : at + len(part)] = part
                    at += len(part)
        headers, base = self.header_view, entry.header
        p.OUT_HEADER.pack_into(headers, base, p.OUT_HEADER.size + size, error, unique)
        _U32.pack_into(headers, base + up.PAYLOAD_SZ_OFFSET, size)
        entry.ring.queue_fuse_cmd(self.fd, up.CMD_COMMIT_AND_FETCH, entry.iovecs_at, 2,
                                  entry.index, 0, unique, entry.qid)  # fmt: skip

    # -- requests still on /dev/fuse (FORGET, INTERRUPT) ------------------------------

    def _read_device(self, session: Session, table: dict[int, tuple[int, Handler]]) -> bool:
        """Answer what /dev/fuse holds; False once the connection is gone."""
        buffer = session.buffer
        for _ in range(_DEVICE_BATCH):
            try:
                count = os.readv(self.fd, [buffer])
            except BlockingIOError:
                return True
            except OSError as err:
                if err.errno == errno.ENOENT:
                    continue  # interrupted before we read it
                if err.errno == errno.ENODEV:
                    return False
                raise
            length, opcode, unique, nodeid, uid, gid, pid, extlen = p.IN_HEADER.unpack_from(
                buffer)
            route = table.get(opcode)
            if length != count or route is None:
                session._reply_error(unique, errno.EIO if route else errno.ENOSYS)
                continue
            min_size, handler = route
            if session.trace:
                log.debug("request", opcode=p.Opcode(opcode).name, unique=unique,
                          nodeid=nodeid, insize=length, uid=uid, pid=pid, via="dev")  # fmt: skip
            body = bytes(buffer[_HEADER : length - extlen * 8])
            if len(body) < min_size:
                session._reply_error(unique, errno.EINVAL)
                continue
            error, payload = _call(handler, nodeid, (uid, gid, pid), body, opcode)
            if error:
                session._reply_error(unique, -error)
            elif payload is not None:
                session._reply(unique, payload)
        return True

    def close(self) -> None:
        """Close the rings (the kernel cancels the entries) and free the buffers."""
        alive = {helper.name for helper in self._helpers if helper.is_alive()}
        for qid, ring in enumerate(self.rings):
            if f"fuse-uring-q{qid}" not in alive:  # a thread still in it keeps it
                ring.close()
        for entries in self.entries:
            for entry in entries:
                entry.payload_view.release()
        self.header_view.release()
        os.close(self._stop)
        self.entries = []


def _pin(qid: int) -> None:
    """Run this thread on CPU `qid`, the CPU whose callers queue `qid` serves."""
    try:
        os.sched_setaffinity(0, {qid})
    except OSError as err:  # not in our cpuset: served all the same, with wake-ups across CPUs
        log.info("io_uring queue thread not pinned", qid=qid, errno=errno.errorcode.get(err.errno))


def _released(result: int, qid: int) -> None:
    """An entry the kernel gave back with an error: expected at unmount or abort
    (ENOTCONN, ECONNABORTED), logged otherwise; either way it serves no more."""
    if result not in (-errno.ENOTCONN, -errno.ECONNABORTED):
        log.error("io_uring entry failed", qid=qid, errno=errno.errorcode.get(-result, result))


def _call(handler: Handler, nodeid: int, caller: tuple[int, int, int], body: bytes,
          opcode: int) -> tuple[int, Payload]:  # fmt: skip
    """The handler's answer as (negative errno or 0, payload)."""
    try:
        # The caller's ids decide what it may allocate: see Session._answer.
        with acting_as(Caller(caller[0], caller[1])):
            return 0, handler(nodeid, caller, body)
    except FuseError as err:
        return -err.errno, None
    except Exception as err:  # a request must never take the server down
        log.error("unexpected error", opcode=opcode, exc_info=err)
        return -errno.EIO, None
