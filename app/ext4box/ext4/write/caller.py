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

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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


@contextmanager
def acting_as(caller: Caller) -> Iterator[None]:
    """Make `caller` the one allocating until the block ends."""
    token = _current.set(caller)
    try:
        yield
    finally:
        _current.reset(token)
