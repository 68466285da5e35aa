"""The io_uring layouts and constants uring_ring.py declares match the installed linux/io_uring.h,
and the FUSE-over-io_uring ones in uring_protocol.py have the kernel's (7.42) sizes.

The io_uring ABI is checked by a C program compiled against the header, as
test_protocol_layouts does for linux/fuse.h. The FUSE ring structs are newer
than the installed linux/fuse.h (7.38), so their sizes are checked against
the numbers of the kernel's uapi header; the real-mount tests in
test_uring_transport.py are the proof that the kernel reads them as we write them.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from ext4box.fuse import uring_protocol as up
from ext4box.fuse import uring_ring as ur

HEADER = Path("/usr/include/linux/io_uring.h")


def _offsets(fmt: str) -> list[int]:
    """The offset of each field of a little-endian struct format (padding 'Nx' skipped)."""
    offsets, at = [], "<"
    for code in fmt[1:]:
        if not code.isdigit() and code != "x" and not at[-1].isdigit():
            offsets.append(struct.calcsize(at))
        at += code
    return offsets


def _c_values(tmp_path: Path, expressions: list[str]) -> list[int]:
    lines = [f'    printf("%llu\\n", (unsigned long long)({expr}));' for expr in expressions]
    source = "\n".join(["#include <stdio.h>", "#include <stddef.h>", "#include <linux/io_uring.h>",
                        "int main(void) {", *lines, "    return 0;", "}"])  # fmt: skip
    (tmp_path / "uring.c").write_text(source)
    subprocess.run(["gcc", "-std=gnu11", "-o", str(tmp_path / "uring"), str(tmp_path / "uring.c")],
                   check=True, capture_output=True)  # fmt: skip
    out = subprocess.run([str(tmp_path / "uring")], check=True, capture_output=True, text=True)
    return [int(line) for line in out.stdout.split()]


def test_io_uring_abi_matches_the_installed_header(tmp_path: Path) -> None:
    if not HEADER.exists() or shutil.which("gcc") is None:
        pytest.skip(f"needs gcc and {HEADER} (package linux-libc-dev)")
    sqe_fields = ("opcode", "flags", "ioprio", "fd", "cmd_op", "__pad1", "addr", "len",
                  "rw_flags", "user_data", "buf_index", "personality", "splice_fd_in")
    ours = [(f"offsetof(struct io_uring_sqe, {name})", offset)
            for name, offset in zip(sqe_fields, _offsets(ur.SQE_HEAD.format), strict=True)]
    ours += [("offsetof(struct io_uring_sqe, cmd)", ur.SQE_HEAD.size),
             ("sizeof(struct io_uring_sqe) * 2", ur.SQE_SIZE),
             ("sizeof(struct io_uring_cqe)", ur.CQE_SIZE),
             ("offsetof(struct io_uring_cqe, res)", _offsets(ur.CQE.format)[1]),
             ("offsetof(struct io_uring_cqe, flags)", _offsets(ur.CQE.format)[2]),
             ("sizeof(struct io_uring_params)", ur.PARAMS.size),
             ("offsetof(struct io_uring_params, sq_off)", 40),
             ("offsetof(struct io_uring_params, cq_off)", 80),
             ("IORING_OP_URING_CMD", ur.OP_URING_CMD), ("IORING_OP_POLL_ADD", ur.OP_POLL_ADD),
             ("IORING_SETUP_SQE128", ur.SETUP_SQE128),
             ("IORING_SETUP_SINGLE_ISSUER", ur.SETUP_SINGLE_ISSUER),
             ("IORING_SETUP_DEFER_TASKRUN", ur.SETUP_DEFER_TASKRUN),
             ("IORING_FEAT_SINGLE_MMAP", ur.FEAT_SINGLE_MMAP),
             ("IORING_FEAT_EXT_ARG", ur.FEAT_EXT_ARG),
             ("IORING_ENTER_GETEVENTS", ur.ENTER_GETEVENTS),
             ("IORING_ENTER_EXT_ARG", ur.ENTER_EXT_ARG),
             ("IORING_OFF_SQ_RING", ur.OFF_SQ_RING), ("IORING_OFF_SQES", ur.OFF_SQES),
             ("sizeof(struct io_uring_getevents_arg)", ur.GETEVENTS_ARG.size),
             ("sizeof(struct __kernel_timespec)", ur.TIMESPEC.size)]  # fmt: skip
    theirs = _c_values(tmp_path, [expr for expr, _ in ours])
    mismatches = [(expr, mine, real) for (expr, mine), real in zip(ours, theirs, strict=True)
                  if mine != real]
    assert not mismatches


def test_fuse_ring_structs_have_the_kernels_sizes() -> None:
    # include/uapi/linux/fuse.h (7.42): fuse_uring_cmd_req is 24 bytes (it must fit
    # the SQE's 80-byte command area), fuse_uring_ent_in_out 32, and
    # fuse_uring_req_header is two 128-byte areas and the ent_in_out.
    assert up.CMD_REQ.size == 24 <= ur.SQE_SIZE - ur.SQE_HEAD.size
    # The ring packs whole SQEs: its FUSE command SQE is the head, then fuse_uring_cmd_req.
    assert ur.SQE_FUSE_CMD.size == ur.SQE_SIZE == ur.SQE_PLAIN.size
    assert ur.SQE_FUSE_CMD.format.startswith(ur.SQE_HEAD.format + up.CMD_REQ.format[1:])
    assert up.ENT_IN_OUT.size == 32
    assert up.REQ_HEADER_SIZE == 128 + 128 + 32
    assert up.ENT_IN_OUT_OFFSET + _offsets(up.ENT_IN_OUT.format)[2] == up.PAYLOAD_SZ_OFFSET


@pytest.mark.parametrize(("text", "count"), [("0\n", 1), ("0-1\n", 2), ("0-3,8-9\n", 6),
                                             ("0,2,4", 3)])  # fmt: skip
def test_possible_cpus_counts_a_cpu_list(text: str, count: int) -> None:
    assert up.possible_cpus(text) == count


@pytest.mark.parametrize("text", ["", "3-1", "x"])
def test_possible_cpus_refuses_a_bad_list(text: str) -> None:
    with pytest.raises(ValueError):
        up.possible_cpus(text)


def test_the_ring_carries_a_poll_completion() -> None:
    """A real ring (io_uring_setup, the mapped SQ and CQ): a poll on a pipe
    completes with POLLIN once the pipe has data, and a timed wait returns."""
    import os
    import select

    try:
        ring = ur.Ring(4)
    except OSError as err:
        pytest.skip(f"io_uring_setup: {err.strerror}")
    read_end, write_end = os.pipe()
    try:
        ring.queue_poll(read_end, select.POLLIN, 42)
        ring.enter(1, timeout=0.01)
        assert ring.completions() == []
        os.write(write_end, b"x")
        ring.enter(1, timeout=30)
        assert [(data, res & select.POLLIN) for data, res, _ in ring.completions()] == [
            (42, select.POLLIN)]
        # Timed waits again (the timeout's size travels on the stack to syscall(2)).
        for _ in range(3):
            ring.enter(1, timeout=0.001)
        assert ring.completions() == []
    finally:
        ring.close()
        os.close(read_end)
        os.close(write_end)
