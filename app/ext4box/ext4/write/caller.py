"""Who is asking the filesystem for space: the identity the reserved-blocks and
quota rules depend on.

The kernel's ext4 asks the current task (its fsuid, groups and capabilities).
A userspace filesystem has no current task, so the layer that knows the
caller (the FUSE operations: each request carries uid and gid) sets it here
for the duration of one operation with `acting_as`. Everything else (mount,
journal recovery, orphan cleanup, offline tools) acts as the filesystem
itself, which the kernel treats like root.

Only uid and gid are known: FUSE carries no capabilities and no
supplementary groups, so uid 0 stands for CAP_SYS_RESOURCE, and a group
match means the request's gid (the caller's fsgid).
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    uid: int
    gid: int

    @property
    def privileged(self) -> bool:
        """Whether the kernel would find CAP_SYS_RESOURCE: root, as for a root task."""
        return self.uid == 0


FILESYSTEM = Caller(0, 0)

# A context variable, not an attribute: each thread (and each trio task of the
# pyfuse3 backend) sees the caller of its own request.
_current: ContextVar[Caller] = ContextVar("ext4box_caller", default=FILESYSTEM)


def current_caller() -> Caller:
    return _current.get()


class _ActingAs:
    """The context manager `acting_as` returns: a class, not a generator, because
    every FUSE request enters one (a third of the cost)."""

    __slots__ = ("_caller", "_token")

    def __init__(self, caller: Caller) -> None:
        self._caller = caller
        self._token: Token[Caller] | None = None

    def __enter__(self) -> None:
        self._token = _current.set(self._caller)

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None


def acting_as(caller: Caller) -> _ActingAs:
    """Make `caller` the one allocating until the block ends."""
    return _ActingAs(caller)
