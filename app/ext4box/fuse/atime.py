"""When does a read, a directory listing or a readlink move an inode's atime?

The kernel never updates atime on a FUSE inode by itself: every FUSE inode is
S_NOATIME, which stops touch_atime() before it looks at the mount's
noatime/relatime flags. Instead, after each READ, READDIR and READLINK that
reached the server, FUSE forgets its cached atime, so the next stat asks the
server. The server therefore applies the rule ext4 gets from the VFS
(atime_needs_update and relatime_need_update in fs/inode.c) itself, to the
requests it sees:

- noatime: never; nodiratime: never for a directory; an inode with the
  NOATIME flag (chattr +A): never. An immutable inode is updated, as ext4 does.
- strictatime: whenever the time stored would change.
- relatime (the default): only when atime <= mtime, atime <= ctime, or atime
  is a day or more old.

A read served from the page cache never reaches the server, so it cannot move
atime: an open for reading drops the cache (no FOPEN_KEEP_CACHE) when the
next read must move atime (Operations.open), so that read reaches us.

The mount options are ext4's and mount(8)'s, with the kernel's precedence
(checked against a loop mount): each option sets or clears its flag, the
last one winning; strictatime beats noatime, noatime beats relatime;
norelatime and nostrictatime without the others leave relatime (the
kernel's default). lazytime is accepted: our time updates wait for the next
commit either way (see docs/status.md).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from ext4box.ext4.format.inode import Inode
from ext4box.ext4.write.inode_flags import NOATIME as NOATIME_FL

_NS = 1_000_000_000
RELATIME_MAX_AGE_S = 24 * 60 * 60
# The atime's nanoseconds live in i_atime_extra: 4 bytes at 12 past the 128.
_ATIME_EXTRA_END = 16


class AtimeMode(enum.Enum):
    RELATIME = "relatime"
    STRICTATIME = "strictatime"
    NOATIME = "noatime"


# option -> (the mount flag it sets or clears, set?), as mount(8) reads them.
_FLAG_OPTIONS = {
    "noatime": ("noatime", True), "atime": ("noatime", False),
    "relatime": ("relatime", True), "norelatime": ("relatime", False),
    "strictatime": ("strictatime", True), "nostrictatime": ("strictatime", False),
    "nodiratime": ("nodiratime", True), "diratime": ("nodiratime", False),
    "lazytime": ("lazytime", True), "nolazytime": ("lazytime", False),
}  # fmt: skip
ATIME_OPTIONS = frozenset(_FLAG_OPTIONS)


@dataclass(frozen=True, slots=True)
class AtimePolicy:
    """The access-time rule of one mount."""

    mode: AtimeMode = AtimeMode.RELATIME
    nodiratime: bool = False

    @property
    def mount_flags(self) -> tuple[str, ...]:
        """The FUSE mount's own flags that say the same (they change nothing
        there: the inodes are S_NOATIME; they keep /proc/mounts truthful)."""
        flags = ("noatime",) if self.mode is AtimeMode.NOATIME else ()
        return (*flags, "nodiratime") if self.nodiratime else flags

    def always_moves(self, inode: Inode) -> bool:
        """Whether every read of `inode`, however soon, moves its atime."""
        return self.mode is AtimeMode.STRICTATIME and not self._excluded(inode)

    def _excluded(self, inode: Inode) -> bool:
        return bool(inode.flags & NOATIME_FL) or (self.nodiratime and inode.is_dir)

    def needs_update(self, inode: Inode, now_ns: int) -> bool:
        """Whether a read of `inode` at `now_ns` (already at the inode's time
        granularity, see `stored_time`) must move its atime."""
        if self.mode is AtimeMode.NOATIME or self._excluded(inode):
            return False
        if inode.atime_ns == now_ns:
            return False
        if self.mode is AtimeMode.STRICTATIME:
            return True
        atime = inode.atime_ns
        return (inode.mtime_ns >= atime or inode.ctime_ns >= atime
                or now_ns // _NS - atime // _NS >= RELATIME_MAX_AGE_S)  # fmt: skip


RELATIME = AtimePolicy()  # the default, as the kernel's


def stored_time(inode: Inode, now_ns: int) -> int:
    """`now_ns` as the inode can store it: whole seconds without i_atime_extra
    (128-byte inodes), where the kernel's ext4 has a granularity of 1 s."""
    if inode.extra_isize >= _ATIME_EXTRA_END:
        return now_ns
    return now_ns - now_ns % _NS


def take_atime_options(options: Iterable[str]) -> tuple[AtimePolicy, list[str]]:
    """Split the access-time options (as one policy) from the other mount options."""
    flags: dict[str, bool] = {}
    rest: list[str] = []
    for opt in options:
        known = _FLAG_OPTIONS.get(opt)
        if known is None:
            rest.append(opt)
        else:
            flags[known[0]] = known[1]
    if flags.get("strictatime"):
        mode = AtimeMode.STRICTATIME
    elif flags.get("noatime"):
        mode = AtimeMode.NOATIME
    else:
        mode = AtimeMode.RELATIME
    return AtimePolicy(mode, nodiratime=flags.get("nodiratime", False)), rest
