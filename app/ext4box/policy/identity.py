"""Who is asking: a user's name, uid, groups and gids from the system databases."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    uid: int
    user: str | None
    gids: tuple[int, ...]
    groups: tuple[str, ...]


def identity_of_uid(uid: int, primary_gid: int | None = None) -> Identity:
    """The identity of `uid` (e.g. from SO_PEERCRED): its name and every group it is in."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        # A uid without a passwd entry is still a uid: it can match numeric ids.
        gids = () if primary_gid is None else (primary_gid,)
        return Identity(uid=uid, user=None, gids=gids, groups=_group_names(gids))
    return _identity_of_entry(entry, primary_gid)


def identity_of_user(spec: str | None) -> Identity:
    """The identity named by a user name or numeric uid; None means the caller."""
    if spec is None:
        return identity_of_uid(os.getuid(), os.getgid())
    if spec.isdigit():
        return identity_of_uid(int(spec))
    try:
        entry = pwd.getpwnam(spec)
    except KeyError:
        raise LookupError(f"unknown user {spec!r}") from None
    return _identity_of_entry(entry, None)


def _identity_of_entry(entry: pwd.struct_passwd, primary_gid: int | None) -> Identity:
    gid = entry.pw_gid if primary_gid is None else primary_gid
    gids = tuple(dict.fromkeys([gid, *os.getgrouplist(entry.pw_name, gid)]))
    return Identity(uid=entry.pw_uid, user=entry.pw_name, gids=gids, groups=_group_names(gids))


def _group_names(gids: tuple[int, ...]) -> tuple[str, ...]:
    names = []
    for gid in gids:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue  # a gid with no name still matches numeric entries
    return tuple(names)
