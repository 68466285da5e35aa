"""Validation of one ``[[rule]]`` table: every key, its type and its value.

Each check that fails adds one `PolicyError` naming the file, the line of the
key and the key; a rule with any error is dropped (the whole load fails).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ext4box.policy.errors import PolicyError
from ext4box.policy.features import canonical_feature
from ext4box.policy.globs import GlobError, PathGlob, compile_path_glob
from ext4box.policy.model import ALWAYS_ON_FLAGS, ANYONE, MODES, OPTIONAL_FLAGS, Principal, Rule
from ext4box.policy.server_options import QUOTA_TYPES, SERVER_OPTIONS
from ext4box.policy.toml_layout import TomlLayout

ACTIONS = ("allow", "deny")
ALLOW_ONLY_KEYS = ("flags", "max_size", "refuse_features", "block_devices", "grant_access",
                   "server_options", "enforce_quota")
RULE_KEYS = (
    "name",
    "action",
    "description",
    "images",
    "sha256",
    "users",
    "groups",
    "mode",
    "mountpoints",
    *ALLOW_ONLY_KEYS,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.@-]*\$?")
_DIGEST = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
_SIZE = re.compile(r"([0-9]+)\s*([KMGTP]?)(iB)?")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "no id" to the kernel


class _Invalid(Exception):
    """One key's value is wrong; carries the message for that key."""


@dataclass(slots=True)
class RuleReader:
    """Reads one rule table, collecting errors with file, line and key."""

    path: str
    index: int  # position of the rule in its file, from 0
    table: dict[str, Any]
    layout: TomlLayout
    errors: list[PolicyError]

    @property
    def label(self) -> str:
        name = self.table.get("name")
        shown = f' "{name}"' if isinstance(name, str) and name else ""
        return f"#{self.index + 1}{shown}"

    def fail(self, key: str | None, message: str) -> None:
        line = self.layout.key_line(self.index, key) if key else self.layout.rule_line(self.index)
        self.errors.append(PolicyError(self.path, message, line=line, key=key, rule=self.label))

    def get(self, key: str, convert: Callable[[Any], Any], default: Any) -> Any:
        if key not in self.table:
            return default
        try:
            return convert(self.table[key])
        except _Invalid as invalid:
            self.fail(key, str(invalid))
            return default

    def read(self) -> Rule | None:
        before = len(self.errors)
        for key in self.table:
            if key not in RULE_KEYS:
                self.fail(key, f"unknown key (known keys: {', '.join(RULE_KEYS)})")
        name = self.get("name", _name, None)
        if "name" not in self.table:
            self.fail(None, 'missing required key "name"')
        action = self.get("action", _choice("action", ACTIONS), "allow")
        images = self.get("images", _list_of(_glob, "path globs"), ())
        sha256 = self.get("sha256", _list_of(_digest, "SHA-256 digests"), ())
        if "images" not in self.table and "sha256" not in self.table:
            self.fail(None, 'a rule must match images by "images" (path globs) and/or "sha256"')
        users = self.get("users", _list_of(_principal, "user names or uids"), ())
        groups = self.get("groups", _list_of(_principal, "group names or gids"), ())
        if action == "allow" and "users" not in self.table and "groups" not in self.table:
            self.fail(
                None,
                'an allow rule must say who may mount: "users" and/or "groups" '
                '(use users = ["*"] for everyone)',
            )
        mode = self.get("mode", _choice("mode", MODES), "ro")
        mountpoints = self.get("mountpoints", _list_of(_glob, "path globs"), ())
        if action == "deny":
            for key in ALLOW_ONLY_KEYS:
                if key in self.table:
                    self.fail(key, 'only allowed in an allow rule (this rule has action = "deny")')
        flags = self.get("flags", _list_of(_flag, "mount flags", allow_empty=True), ())
        max_size = self.get("max_size", _size, None)
        features = self.get(
            "refuse_features", _list_of(_feature, "ext4 feature names", allow_empty=True), ()
        )
        block_devices = self.get("block_devices", _boolean, False)
        grant_access = self.get("grant_access", _boolean, False)
        if grant_access and not block_devices:
            self.fail(
                "grant_access",
                "grant_access = true needs block_devices = true (only devices are granted)",
            )
        server_options = self.get(
            "server_options", _list_of(_server_option, "server options", allow_empty=True), ()
        )
        enforce_quota = self.get("enforce_quota", _list_of(_quota_type, "quota types"), ())
        description = self.get("description", _text, "")
        if len(self.errors) > before:
            return None
        return Rule(
            name=name,
            action=action,
            file=self.path,
            line=self.layout.rule_line(self.index),
            images=tuple(images),
            sha256=frozenset(sha256),
            users=tuple(users),
            groups=tuple(groups),
            mode=mode,
            mountpoints=tuple(mountpoints),
            description=description,
            flags=tuple(flag for flag in dict.fromkeys(flags) if flag not in ALWAYS_ON_FLAGS),
            max_size=max_size,
            refuse_features=tuple(dict.fromkeys(features)),
            block_devices=block_devices,
            grant_access=grant_access,
            server_options=tuple(dict.fromkeys(server_options)),
            enforce_quota=tuple(dict.fromkeys(enforce_quota)),
        )


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_type_name(value)}")
    return value


def _name(value: Any) -> str:
    text = _text(value)
    if not _NAME.fullmatch(text):
        raise _Invalid(
            f"bad rule name {text!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return text


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_type_name(value)}")
    return value


def _choice(key: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _text(value)
        if text not in choices:
            expected = " or ".join(f'"{choice}"' for choice in choices)
            raise _Invalid(f"unknown {key} {text!r} (expected {expected})")
        return text

    return convert


def _list_of(
    convert: Callable[[Any], Any], what: str, *, allow_empty: bool = False
) -> Callable[[Any], list[Any]]:
    def convert_list(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _Invalid(f"expected an array of {what}, got {_type_name(value)}")
        if not value and not allow_empty:
            raise _Invalid(f"empty array: list at least one of the {what} or remove the key")
        return [convert(item) for item in value]

    return convert_list


def _glob(value: Any) -> PathGlob:
    try:
        return compile_path_glob(_text(value))
    except GlobError as error:
        raise _Invalid(f"bad glob: {error}") from None


def _digest(value: Any) -> str:
    text = _text(value)
    match = _DIGEST.fullmatch(text)
    if match is None:
        raise _Invalid(f"bad SHA-256 digest {text!r}: expected 64 hexadecimal characters")
    return match.group(1).lower()


def _principal(value: Any) -> Principal:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Invalid(f"expected a name (string) or numeric id (integer), got {_type_name(value)}")
    if isinstance(value, int):
        if not 0 <= value <= _MAX_ID:
            raise _Invalid(f"numeric id {value} is out of range 0..{_MAX_ID}")
        return value
    if value == ANYONE:
        return value
    if value.isdigit():
        raise _Invalid(f"numeric id {value!r} must be an integer ({value}), not a string")
    if not _PRINCIPAL_NAME.fullmatch(value):
        raise _Invalid(f"bad user or group name {value!r}")
    return value


def _flag(value: Any) -> str:
    text = _text(value)
    if text in OPTIONAL_FLAGS or text in ALWAYS_ON_FLAGS:
        return text
    if text in ("suid", "dev"):
        raise _Invalid(f"flag {text!r} is not allowed: mounts are always nosuid,nodev")
    known = ", ".join(OPTIONAL_FLAGS)
    raise _Invalid(f"unknown mount flag {text!r} (known: {known}; nosuid,nodev are always on)")


def _server_option(value: Any) -> str:
    text = _text(value)
    if text not in SERVER_OPTIONS:
        known = ", ".join(sorted(SERVER_OPTIONS))
        raise _Invalid(f"unknown server option {text!r} (known: {known})")
    return text


def _quota_type(value: Any) -> str:
    text = _text(value)
    if text == "quota":
        return "usrquota"  # its older name, as for mount(8)
    if text not in QUOTA_TYPES:
        raise _Invalid(f"unknown quota type {text!r} (known: {', '.join(QUOTA_TYPES)})")
    return text


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Invalid(f'expected a size in bytes or a string like "4G", got {_type_name(value)}')
    if isinstance(value, int):
        if value < 0:
            raise _Invalid(f"size {value} is negative")
        return value
    match = _SIZE.fullmatch(value.strip())
    if match is None or (match.group(3) and not match.group(2)):
        raise _Invalid(
            f"bad size {value!r}: use bytes or a number with K, M, G, T or P "
            '(binary units, e.g. "512M" or "4GiB")'
        )
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _feature(value: Any) -> str:
    text = _text(value)
    canonical = canonical_feature(text)
    if canonical is None:
        raise _Invalid(f"unknown ext4 feature {text!r} (names as printed by dumpe2fs)")
    return canonical
