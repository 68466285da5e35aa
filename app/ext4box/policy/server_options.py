"""Which server options may a mount ask for, and which does a rule let it have?

Server options change what the server does, not what mount(2) is told:
quota enforcement (usrquota, quota, grpquota, prjquota), the access-time
rule (noatime, strictatime, ...) and writeback_cache (the kernel's page cache
holds writes). `ext4box serve -o` reads them in fuse/fs_options.py and
fuse/atime.py; through the appliance they travel in
the hand-off's MOUNT options (protocol version 3) and the server applies them
the same way. This module is only their names, so the policy can judge them
without knowing FUSE (tests check it against the two readers).

A caller may always ask for quota enforcement (it only limits the caller)
and for the neutral options, which on their own leave the server's default
(relatime, no lazytime) as it is. Every other option (noatime, strictatime,
nodiratime: they change when reads write the inode; writeback_cache: it
changes durability, see policy/README.md) must be listed in the rule's
`server_options`. A rule's `enforce_quota` turns enforcement on whatever the
caller asks; no option turns it off.
"""

from __future__ import annotations

from collections.abc import Iterable

QUOTA_OPTIONS = frozenset({"usrquota", "quota", "grpquota", "prjquota"})
# As mount(8) reads them (fuse/atime.py keeps their meaning).
ATIME_OPTIONS = frozenset({
    "noatime", "atime", "relatime", "norelatime", "strictatime", "nostrictatime",
    "nodiratime", "diratime", "lazytime", "nolazytime",
})  # fmt: skip
# write(2) lands in the kernel's page cache; ENOSPC/EDQUOT/EFBIG come back at
# fsync/close with those bytes lost (fuse/fs_options.py). Read-write only.
CACHE_OPTIONS = frozenset({"writeback_cache"})
SERVER_OPTIONS = QUOTA_OPTIONS | ATIME_OPTIONS | CACHE_OPTIONS
# Each one alone keeps the default: relatime, atime updates on directories too.
NEUTRAL_OPTIONS = frozenset({"relatime", "norelatime", "nostrictatime", "atime", "diratime",
                             "lazytime", "nolazytime"})  # fmt: skip
# The quota types a rule may force on (`quota` is usrquota's older name).
QUOTA_TYPES = ("usrquota", "grpquota", "prjquota")
MAX_REQUESTED = 16


class ServerOptionError(ValueError):
    """A server option string that is not one of SERVER_OPTIONS."""


def parse_server_options(text: str) -> tuple[str, ...]:
    """`-o a,b,c` as a tuple, each checked against the known names (order kept:
    for the atime options the last one wins, as for mount(8))."""
    options = tuple(part.strip() for part in text.split(",") if part.strip())
    check_server_options(options)
    return options


def check_server_options(options: Iterable[str]) -> None:
    options = list(options)
    if len(options) > MAX_REQUESTED:
        raise ServerOptionError(f"{len(options)} server options, at most {MAX_REQUESTED}")
    for option in options:
        if not isinstance(option, str) or option not in SERVER_OPTIONS:
            shown = repr(option)[:60]
            known = ", ".join(sorted(SERVER_OPTIONS))
            raise ServerOptionError(f"unknown server option {shown} (known: {known})")


def always_allowed(option: str) -> bool:
    """Whether a caller may have `option` without the rule listing it: it only
    limits the caller, or changes nothing on its own."""
    return option in QUOTA_OPTIONS or option in NEUTRAL_OPTIONS
