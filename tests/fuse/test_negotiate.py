"""FUSE_INIT negotiation against kernels that offer more, less, or another major.

The rule is the protocol's: agree on the flags both sides have, answer in the
older minor, name our major when the kernel's is newer (it then sends INIT
again), refuse an older major. Bodies are built from protocol.INIT_IN, which
tests/fuse/test_protocol_layouts.py checks against linux/fuse.h.
"""

from __future__ import annotations

import errno

import pytest

from ext4box.fuse import negotiate
from ext4box.fuse import protocol as p
from ext4box.fuse.errors import FuseError
from ext4box.fuse.protocol import InitFlag


def _init_out(reply: bytes) -> dict[str, int]:
    return dict(zip(p.INIT_OUT.value_names(), p.INIT_OUT.unpack_from(reply), strict=True))


def test_a_new_kernel_offering_everything_gets_exactly_what_we_want() -> None:
    offered = (1 << 36) - 1  # every flag up to HAS_EXPIRE_ONLY, INIT_EXT included
    body = p.INIT_IN.pack(7, 45, 131072, offered & 0xFFFFFFFF, offered >> 32)
    reply, agreed = negotiate.negotiate(body)
    out = _init_out(reply)
    assert agreed is not None and agreed.flags == negotiate.wanted_flags()
    assert (out["major"], out["minor"]) == (7, p.KERNEL_MINOR_VERSION)
    assert out["flags"] | out["flags2"] << 32 == negotiate.wanted_flags()
    assert out["max_pages"] * negotiate.PAGE_SIZE == out["max_write"] == negotiate.MAX_WRITE
    assert out["max_readahead"] == 131072  # the kernel's own offer, never more
    assert not negotiate.missing_wanted(agreed)
    for flag, _ in negotiate.DECLINED:
        assert not agreed.has(flag), flag.name


def test_an_old_kernel_gets_only_what_it_offers() -> None:
    # Before 7.36: a 16-byte fuse_init_in and no flags2.
    offered = InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.POSIX_LOCKS
    body = p.INIT_IN.pack(7, 31, 65536, offered, 0)[: p.INIT_IN_COMPAT_SIZE]
    reply, agreed = negotiate.negotiate(body)
    out = _init_out(reply)
    assert agreed is not None
    assert agreed.flags == InitFlag.ASYNC_READ | InitFlag.BIG_WRITES  # POSIX_LOCKS declined
    assert (out["minor"], out["flags2"]) == (31, 0)
    missing = negotiate.missing_wanted(agreed)
    assert "DONT_MASK" in missing and "HANDLE_KILLPRIV_V2" in missing


def test_a_newer_major_is_told_ours_and_an_older_one_refused() -> None:
    reply, agreed = negotiate.negotiate(p.INIT_IN.pack(8, 0, 0, 0, 0))
    assert agreed is None and _init_out(reply)["major"] == p.KERNEL_VERSION
    with pytest.raises(FuseError) as refused:
        negotiate.negotiate(p.INIT_IN.pack(6, 0, 0, 0, 0))
    assert refused.value.errno == errno.EPROTO
    with pytest.raises(FuseError):
        negotiate.negotiate(b"\x07\x00")  # shorter than any fuse_init_in
