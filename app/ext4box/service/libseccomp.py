"""A minimal binding of libseccomp 2.5 through cffi in ABI mode.

ABI mode (`ffi.dlopen`) needs no compiler and no header files, so the image
only carries Debian's libseccomp2 (already there: apt links it). The
declarations below are the few entry points of <seccomp.h> the service uses;
constants are libseccomp's public ABI values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import cffi

LIBRARY = "libseccomp.so.2"

_CDEF = """
typedef void *scmp_filter_ctx;
typedef uint64_t scmp_datum_t;
struct scmp_arg_cmp {
    unsigned int arg;
    int op;
    scmp_datum_t datum_a;
    scmp_datum_t datum_b;
};
scmp_filter_ctx seccomp_init(uint32_t def_action);
void seccomp_release(scmp_filter_ctx ctx);
int seccomp_attr_set(scmp_filter_ctx ctx, int attr, uint32_t value);
int seccomp_syscall_resolve_name(const char *name);
int seccomp_rule_add_array(scmp_filter_ctx ctx, uint32_t action, int syscall,
                           unsigned int arg_cnt, const struct scmp_arg_cmp *arg_array);
int seccomp_load(scmp_filter_ctx ctx);
"""

# Actions (seccomp.h).
ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000
ACT_LOG = 0x7FFC0000


def act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


# enum scmp_compare
CMP_NE = 1
CMP_EQ = 4
CMP_MASKED_EQ = 7

# enum scmp_filter_attr
FLTATR_ACT_BADARCH = 2
FLTATR_CTL_NNP = 3
FLTATR_CTL_TSYNC = 4


class SeccompError(Exception):
    """libseccomp is missing or refused to build or load the filter."""


@dataclass(frozen=True, slots=True)
class ArgCmp:
    """Compare syscall argument `arg` (0-based); MASKED_EQ: (arg & a) == b."""

    arg: int
    op: int
    datum_a: int
    datum_b: int = 0


@dataclass(frozen=True, slots=True)
class Rule:
    syscall: str
    action: int
    args: tuple[ArgCmp, ...] = ()


@cache
def _library() -> tuple[cffi.FFI, object]:
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    try:
        return ffi, ffi.dlopen(LIBRARY)
    except OSError as exc:
        raise SeccompError(f"cannot load {LIBRARY}: {exc}") from None


def load_library() -> None:
    """dlopen libseccomp now: after the lock-down no library can be opened."""
    _library()


def resolve(name: str) -> int:
    """The native syscall number, or -1 when this kernel ABI has no such call."""
    _, lib = _library()
    return int(lib.seccomp_syscall_resolve_name(name.encode("ascii")))  # type: ignore[attr-defined]


def install(default_action: int, rules: Sequence[Rule], *, all_threads: bool = True) -> None:
    """Build a filter for the native architecture and load it into this process.

    Syscalls of a foreign ABI (i386 through int 0x80, x32) do not match the
    native architecture and kill the process: a filter written in terms of
    x86_64 numbers says nothing about them. Unknown syscall names are skipped
    (an older kernel ABI): an allowlist then simply does not allow them.
    """
    ffi, lib = _library()
    ctx = lib.seccomp_init(default_action)  # type: ignore[attr-defined]
    if ctx == ffi.NULL:
        raise SeccompError("seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, FLTATR_ACT_BADARCH, ACT_KILL_PROCESS), "badarch")  # type: ignore[attr-defined]
        if all_threads:
            _check(lib.seccomp_attr_set(ctx, FLTATR_CTL_TSYNC, 1), "tsync")  # type: ignore[attr-defined]
        for rule in rules:
            number = resolve(rule.syscall)
            if number < 0:
                continue
            cmps = ffi.new("struct scmp_arg_cmp[]", max(1, len(rule.args)))
            for i, cmp in enumerate(rule.args):
                cmps[i].arg = cmp.arg
                cmps[i].op = cmp.op
                cmps[i].datum_a = cmp.datum_a
                cmps[i].datum_b = cmp.datum_b
            rc = lib.seccomp_rule_add_array(ctx, rule.action, number, len(rule.args), cmps)  # type: ignore[attr-defined]
            _check(rc, f"rule for {rule.syscall}")
        _check(lib.seccomp_load(ctx), "load")  # type: ignore[attr-defined]
    finally:
        lib.seccomp_release(ctx)  # type: ignore[attr-defined]


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise SeccompError(f"libseccomp {what}: {os.strerror(-rc)}")
