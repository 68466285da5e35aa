"""FUSE over io_uring (protocol 7.42): the layouts and constants the kernel and we share.

The installed linux/fuse.h (7.38) predates these, so they are declared here
from the kernel's include/uapi/linux/fuse.h and fs/fuse/dev_uring.c (6.18):

- INIT: the kernel offers FUSE_OVER_IO_URING (flags2 bit 9) only while
  /sys/module/fuse/parameters/enable_uring is Y; a server that answers with
  the flag makes every new request wait until its ring is ready.
- Each ring entry is one IORING_OP_URING_CMD on a ring set up with
  IORING_SETUP_SQE128, its 80-byte command area holding `fuse_uring_cmd_req`
  (flags, commit_id, qid). `sqe.addr` points to two iovecs: a
  `fuse_uring_req_header` and a payload buffer of at least the connection's
  max payload (max(8 KiB, max_write, max_pages * page size)).
- REGISTER hands an entry to queue `qid`; the kernel keeps one queue per
  *possible* CPU (num_possible_cpus) and sends a request to the queue of the
  CPU the caller runs on. The ring is ready (requests flow through it) only
  once every queue has an entry waiting; a failed REGISTER turns io_uring off
  for the connection and requests go to /dev/fuse again.
- A request completes the entry's command (CQE res 0): the fuse_in_header is
  in `in_out`, the first argument (the opcode's fixed struct, possibly empty)
  in `op_in`, the other arguments in the payload (`payload_sz` bytes).
- COMMIT_AND_FETCH (commit_id = the request's unique) answers it: the
  fuse_out_header in `in_out`, the reply arguments in the payload, their
  length in `payload_sz` (the out header not counted), and gives the entry
  back for the next request.
- FORGET and INTERRUPT still travel on /dev/fuse, and notifications (unique 0)
  are written there; umount or abort completes waiting entries with -ENOTCONN.
"""

from __future__ import annotations

import struct

# fuse_init_out.flags2 bit 9: FUSE_OVER_IO_URING (1 << 41 in the 64-bit flags).
OVER_IO_URING = 1 << 41

# enum fuse_uring_cmd: sqe.cmd_op of an IORING_OP_URING_CMD on /dev/fuse.
CMD_REGISTER = 1
CMD_COMMIT_AND_FETCH = 2

# struct fuse_uring_cmd_req, at the start of the SQE's command area:
# flags, commit_id, qid, 6 bytes of padding.
CMD_REQ = struct.Struct("<QQH6x")

# struct fuse_uring_req_header: in_out[128], op_in[128], fuse_uring_ent_in_out.
IN_OUT_HEADER_SIZE = 128
OP_IN_OUT_SIZE = 128
OP_IN_OFFSET = IN_OUT_HEADER_SIZE
ENT_IN_OUT_OFFSET = IN_OUT_HEADER_SIZE + OP_IN_OUT_SIZE
# struct fuse_uring_ent_in_out: flags, commit_id, payload_sz, padding, reserved.
ENT_IN_OUT = struct.Struct("<QQII8x")
PAYLOAD_SZ_OFFSET = ENT_IN_OUT_OFFSET + 16
REQ_HEADER_SIZE = ENT_IN_OUT_OFFSET + ENT_IN_OUT.size  # 288

# The smallest payload buffer the kernel accepts (FUSE_MIN_READ_BUFFER).
MIN_PAYLOAD = 8192

ENABLE_PARAMETER = "/sys/module/fuse/parameters/enable_uring"
POSSIBLE_CPUS = "/sys/devices/system/cpu/possible"


def payload_size(max_write: int, max_pages: int, page_size: int) -> int:
    """The payload buffer each entry needs (the kernel's ring->max_payload_sz)."""
    return max(MIN_PAYLOAD, max_write, max_pages * page_size)


def possible_cpus(text: str) -> int:
    """How many queues the kernel expects: the CPUs in a cpu list like "0-3,8"."""
    count = 0
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        first = int(low)
        last = int(high) if high else first
        if last < first:
            raise ValueError(f"bad cpu range {part!r}")
        count += last - first + 1
    if count == 0:
        raise ValueError("empty cpu list")
    return count
