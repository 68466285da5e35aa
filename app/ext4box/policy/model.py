"""The values the policy engine works with: rules, requests, decisions."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ext4box.policy.globs import PathGlob
from ext4box.policy.server_options import check_server_options

MODES = ("ro", "rw")
ALWAYS_ON_FLAGS = ("nosuid", "nodev")
OPTIONAL_FLAGS = ("noexec", "allow_other")
ANYONE = "*"

Principal = str | int  # a name, a numeric id, or "*"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: str  # "allow" | "deny"
    file: str  # path of the policy file that defines it
    line: int | None  # line of its [[rule]] header
    images: tuple[PathGlob, ...]
    sha256: frozenset[str]  # lower-case hex digests
    users: tuple[Principal, ...]
    groups: tuple[Principal, ...]
    mode: str  # allow: the most it allows; deny: the least it denies
    mountpoints: tuple[PathGlob, ...]
    description: str = ""
    flags: tuple[str, ...] = ()  # added to ALWAYS_ON_FLAGS
    max_size: int | None = None
    refuse_features: tuple[str, ...] = ()
    block_devices: bool = False
    grant_access: bool = False  # the broker opens the device even if the user cannot
    # Server options a caller may ask for beyond the always-allowed ones
    # (policy/server_options.py), and the quota types enforced whatever the caller asks.
    server_options: tuple[str, ...] = ()
    enforce_quota: tuple[str, ...] = ()

    @property
    def location(self) -> str:
        base = os.path.basename(self.file)
        return base if self.line is None else f"{base}:{self.line}"

    @property
    def applies_to_everyone(self) -> bool:
        return not self.users and not self.groups


@dataclass(frozen=True, slots=True)
class Request:
    """What the helper asks: may this user mount this image, this way, here?

    `image` must be the resolved (realpath) absolute path; `mountpoint` too,
    when given. The helper always passes a mountpoint; None means "not
    checked" and exists only for `ext4box policy check` without --mountpoint.
    `sha256` is a callable so the digest is computed only if a rule pins one.
    """

    image: str
    image_size: int
    uid: int
    user: str | None
    gids: tuple[int, ...]
    groups: tuple[str, ...]
    mode: str
    mountpoint: str | None
    is_block_device: bool = False
    sha256: Callable[[], str] | None = None
    # Root-maintained links naming the same device (e.g. /dev/disk/by-id/usb-*,
    # made by udev), given by the broker only; `images` globs may match them.
    image_links: tuple[str, ...] = ()
    # Server options the caller asks for (`ext4box mount -o`), known names only.
    server_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'ro' or 'rw', not {self.mode!r}")
        check_server_options(self.server_options)
        _require_resolved("image", self.image)
        for link in self.image_links:
            _require_resolved("image link", link)
        if self.mountpoint is not None:
            _require_resolved("mountpoint", self.mountpoint)
        if self.image_size < 0:
            raise ValueError(f"image size {self.image_size} is negative")

    @property
    def who(self) -> str:
        return f"{self.user} (uid {self.uid})" if self.user else f"uid {self.uid}"


def _require_resolved(what: str, path: str) -> None:
    # Globs are matched against exact text: an unresolved path could slip past.
    if not path.startswith("/") or os.path.normpath(path) != path or path.startswith("//"):
        raise ValueError(f"{what} {path!r} is not a resolved absolute path")


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    """How one rule judged a request: matched, or the reasons it did not."""

    rule: Rule
    matched: bool
    reasons: tuple[str, ...] = ()  # why it did not match; empty when matched
    reached: bool = True  # False when an earlier rule already decided
    covers_image: bool = True  # False when the image path matches none of its globs


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    rule: str | None = None
    file: str | None = None
    line: int | None = None
    mode: str | None = None  # effective mode when allowed
    mount_flags: tuple[str, ...] = ALWAYS_ON_FLAGS
    refused_features: tuple[str, ...] = ()
    max_size: int | None = None
    block_devices: bool = False
    grant_access: bool = False
    sha256: str | None = None  # the digest, when some rule needed it
    # What the server applies: the caller's server options the rule allows,
    # then the quota types the rule enforces.
    server_options: tuple[str, ...] = ()
    mountpoint_checked: bool = True
    verdicts: tuple[RuleVerdict, ...] = field(default=(), repr=False)
