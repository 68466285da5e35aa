"""Timed filesystem requests for the hostile tests: each under a bound, the slowest kept.

A request runs in a worker thread so that a hang fails the test instead of
freezing it; every request updates LONGEST, every refused serve LONGEST_REFUSAL, which
the modules print at the end (run with -s to see them).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

import pytest

T = TypeVar("T")

REQUEST_BOUND_S = 5.0
LONGEST: list[tuple[float, str]] = [(0.0, "")]  # the slowest request seen, for the report
# The slowest refused `ext4box serve` (process start to exit 1): not a request.
LONGEST_REFUSAL: list[tuple[float, str]] = [(0.0, "")]

_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hostile-request")


def record(elapsed: float, what: str) -> None:
    LONGEST[0] = max(LONGEST[0], (elapsed, what))


def record_refusal(elapsed: float, what: str) -> None:
    LONGEST_REFUSAL[0] = max(LONGEST_REFUSAL[0], (elapsed, what))


def timed(what: str, action: Callable[[], T]) -> T:
    """Run one filesystem request; fail the test if it takes longer than the bound."""
    start = time.monotonic()
    future = _pool.submit(action)
    try:
        return future.result(timeout=REQUEST_BOUND_S)
    except FutureTimeout:
        pytest.fail(f"{what} did not return within {REQUEST_BOUND_S}s")
    finally:
        record(time.monotonic() - start, what)


def expect_errno(code: int, what: str, action: Callable[[], object]) -> None:
    with pytest.raises(OSError) as info:
        timed(what, action)
    got = info.value.errno or 0
    assert got == code, f"{what}: expected {errno.errorcode[code]}, got {errno.errorcode.get(got)}"
