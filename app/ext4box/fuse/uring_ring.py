"""A minimal io_uring for one thread: set a ring up, queue 128-byte SQEs, reap CQEs.

Only what the FUSE transport needs, over syscall(2) through ctypes and the
kernel's shared rings mapped with the mmap module (no liburing):

    Ring(entries)           io_uring_setup with SQE128 (the FUSE command area)
    queue_fuse_cmd(...)     fill the next SQE; nothing reaches the kernel yet
    queue_poll(...)         a one-shot poll of another fd
    enter(wait, timeout)    submit what is queued, wait for `wait` completions
    completions()           the CQEs that arrived, consumed

Memory ordering: the kernel reads our SQ tail only inside io_uring_enter,
called by this thread (no SQPOLL), so program order covers submission. A
CQE may be posted from another CPU; we rely on x86-64's ordering (stores are
seen in order, so a CQ tail we read covers CQEs already written) and refuse
other machines (`supported`) rather than emulate acquire loads from Python.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct

# The io_uring syscalls have one number on every architecture.
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426

# io_uring_params.flags
SETUP_SQE128 = 1 << 10
SETUP_SINGLE_ISSUER = 1 << 12
SETUP_DEFER_TASKRUN = 1 << 13
# SQE128 only: the FUSE command needs the 80-byte command area. Measured with
# 500 O_DIRECT 4 KiB reads per mount, interleaved, busy 2-core VM: SQE128 alone
# 56-75 µs per read; + SINGLE_ISSUER 135-300 µs; + DEFER_TASKRUN 60-400 µs
# (the kernel's hand-over of a request to us is task work; deferred, it waits
# for our next io_uring_enter instead of waking the wait at once).
SETUP_FLAGS = SETUP_SQE128
# io_uring_params.features
FEAT_SINGLE_MMAP = 1 << 0
FEAT_EXT_ARG = 1 << 8
# io_uring_enter flags
ENTER_GETEVENTS = 1 << 0
ENTER_EXT_ARG = 1 << 3
# mmap offsets
OFF_SQ_RING = 0
OFF_CQ_RING = 0x8000000
OFF_SQES = 0x10000000
# opcodes
OP_POLL_ADD = 6
OP_URING_CMD = 46

SQE_SIZE = 128
CQE_SIZE = 16
# struct io_uring_params: 10 u32, then io_sqring_offsets and io_cqring_offsets.
PARAMS = struct.Struct("<10I" "7IIQ" "8IQ")
# The first 48 bytes of an SQE: opcode, flags, ioprio, fd, cmd_op/off (low,
# high), addr, len, op flags, user_data, buf_index, personality, splice_fd_in.
SQE_HEAD = struct.Struct("<BBHiIIQIIQHHi")
# Whole SQEs, written with one pack: a URING_CMD whose command area starts with
# (u64, u64, u16) as FUSE's does (the rest zero), and a POLL_ADD.
SQE_FUSE_CMD = struct.Struct(SQE_HEAD.format + "QQH6x56x")
SQE_PLAIN = struct.Struct(SQE_HEAD.format + "80x")
CQE = struct.Struct("<QiI")
U32 = struct.Struct("<I")
# struct io_uring_getevents_arg: sigmask, sigmask_sz, min_wait_usec, ts.
GETEVENTS_ARG = struct.Struct("<QIIQ")
TIMESPEC = struct.Struct("<qq")
_NO_ARG = ctypes.c_long(0)
_ARG_SIZE = ctypes.c_long(GETEVENTS_ARG.size)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def supported() -> str | None:
    """Why this machine cannot use the ring (see module doc), or None."""
    machine = platform.machine()
    if machine != "x86_64":
        return f"the ring's memory ordering is argued for x86-64 only, not {machine}"
    return None


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class Ring:
    """One io_uring instance with SQE128 entries (see module doc)."""

    def __init__(self, entries: int) -> None:
        params = ctypes.create_string_buffer(PARAMS.size)
        PARAMS.pack_into(params, 0, 0, 0, SETUP_FLAGS, *([0] * 25))
        self.fd = _check(_syscall(ctypes.c_long(SYS_IO_URING_SETUP), ctypes.c_long(entries),
                                  params))  # fmt: skip
        try:
            self._map(PARAMS.unpack(params.raw))
        except BaseException:
            os.close(self.fd)
            raise
        # Reused for every timed wait: the arg points at the timespec.
        self._timespec = ctypes.create_string_buffer(TIMESPEC.size)
        self._wait_arg = ctypes.create_string_buffer(GETEVENTS_ARG.size)
        GETEVENTS_ARG.pack_into(self._wait_arg, 0, 0, 0, 0, ctypes.addressof(self._timespec))

    def _map(self, values: tuple[int, ...]) -> None:
        sq_entries, cq_entries, _flags, _cpu, _idle, features = values[:6]
        sq_off = values[10:19]  # head, tail, mask, entries, flags, dropped, array, resv
        cq_off = values[19:28]  # head, tail, mask, entries, overflow, cqes, flags, resv
        if not features & FEAT_SINGLE_MMAP or not features & FEAT_EXT_ARG:
            raise OSError(errno.ENOSYS, "io_uring lacks SINGLE_MMAP or EXT_ARG")
        self.sq_entries, self.cq_entries = sq_entries, cq_entries
        ring_size = max(sq_off[6] + sq_entries * 4, cq_off[5] + cq_entries * CQE_SIZE)
        self._rings = mmap.mmap(self.fd, ring_size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                offset=OFF_SQ_RING)  # fmt: skip
        self._sqes = mmap.mmap(self.fd, sq_entries * SQE_SIZE,
                               mmap.MAP_SHARED | mmap.MAP_POPULATE, offset=OFF_SQES)  # fmt: skip
        self._sq_head, self._sq_tail, self._sq_mask = sq_off[0], sq_off[1], sq_off[2]
        self._cq_head, self._cq_tail, self._cq_mask = cq_off[0], cq_off[1], cq_off[2]
        self._cqes = cq_off[5]
        # SQ slot i always holds SQE i: the indirection array is set once.
        array = sq_off[6]
        for index in range(sq_entries):
            U32.pack_into(self._rings, array + index * 4, index)
        self._sqe_mask = U32.unpack_from(self._rings, self._sq_mask)[0]
        self._cqe_mask = U32.unpack_from(self._rings, self._cq_mask)[0]

    # -- submission ----------------------------------------------------------------

    def _next_sqe(self) -> int:
        rings = self._rings
        tail = U32.unpack_from(rings, self._sq_tail)[0]
        head = U32.unpack_from(rings, self._sq_head)[0]
        if (tail - head) & 0xFFFFFFFF >= self.sq_entries:
            raise OSError(errno.EBUSY, "io_uring submission queue full")
        offset = (tail & self._sqe_mask) * SQE_SIZE
        U32.pack_into(rings, self._sq_tail, (tail + 1) & 0xFFFFFFFF)
        return offset

    def queue_fuse_cmd(self, fd: int, cmd_op: int, addr: int, length: int, user_data: int,
                       flags: int, commit_id: int, qid: int) -> None:  # fmt: skip
        """IORING_OP_URING_CMD on `fd` carrying FUSE's (flags, commit_id, qid) command."""
        SQE_FUSE_CMD.pack_into(self._sqes, self._next_sqe(), OP_URING_CMD, 0, 0, fd, cmd_op, 0,
                               addr, length, 0, user_data, 0, 0, 0, flags, commit_id, qid)

    def queue_poll(self, fd: int, events: int, user_data: int) -> None:
        """A one-shot IORING_OP_POLL_ADD: completes with the events `fd` shows."""
        SQE_PLAIN.pack_into(self._sqes, self._next_sqe(), OP_POLL_ADD, 0, 0, fd, 0, 0, 0, 0,
                            events, user_data, 0, 0, 0)  # fmt: skip

    # -- waiting and completion ---------------------------------------------------

    def enter(self, wait: int, timeout: float | None = None) -> None:
        """Submit what is queued and wait for `wait` completions (or `timeout` seconds).

        EINTR propagates as InterruptedError once Python has run the signal
        handlers; what was queued stays queued for the next call.
        """
        rings = self._rings
        pending = (U32.unpack_from(rings, self._sq_tail)[0]
                   - U32.unpack_from(rings, self._sq_head)[0]) & 0xFFFFFFFF  # fmt: skip
        flags = ENTER_GETEVENTS if wait else 0
        arg, arg_size = None, _NO_ARG
        if timeout is not None and wait:
            seconds = max(timeout, 0.0)
            TIMESPEC.pack_into(self._timespec, 0, int(seconds),
                               int((seconds % 1) * 1_000_000_000))  # fmt: skip
            flags |= ENTER_EXT_ARG
            arg, arg_size = self._wait_arg, _ARG_SIZE
        # Plain ints where they travel in registers (libffi sign-extends them;
        # all are small and non-negative); the last argument goes on the stack,
        # where an int fills only half of syscall(2)'s long: a c_long. Measured:
        # 1.7 µs a call, against 2.9 µs with a CFUNCTYPE prototype, 4.3 with argtypes.
        result = _syscall(SYS_IO_URING_ENTER, self.fd, pending, wait, flags, arg, arg_size)
        if result < 0:
            err = ctypes.get_errno()
            if err == errno.ETIME:
                return
            if err == errno.EINTR:
                raise InterruptedError(err, os.strerror(err))
            raise OSError(err, os.strerror(err))

    def completions(self) -> list[tuple[int, int, int]]:
        """(user_data, res, flags) of every CQE that arrived, oldest first; consumed."""
        rings = self._rings
        head = U32.unpack_from(rings, self._cq_head)[0]
        tail = U32.unpack_from(rings, self._cq_tail)[0]
        out = []
        mask, base = self._cqe_mask, self._cqes
        while head != tail:
            out.append(CQE.unpack_from(rings, base + (head & mask) * CQE_SIZE))
            head = (head + 1) & 0xFFFFFFFF
        U32.pack_into(rings, self._cq_head, head)
        return out

    def close(self) -> None:
        """Unmap and close: the kernel cancels whatever is still in flight."""
        self._sqes.close()
        self._rings.close()
        os.close(self.fd)
