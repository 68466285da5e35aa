"""Load a policy directory: every ``*.toml`` file, in file name order.

Loading is all or nothing: if any file has any problem, `PolicyLoadError`
lists them all and no policy is returned, so a typo can never silently
drop a deny rule. An empty directory is a valid policy that denies
everything.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from ext4box.policy.engine import Policy
from ext4box.policy.errors import PolicyError, PolicyLoadError
from ext4box.policy.model import Rule
from ext4box.policy.schema import RuleReader
from ext4box.policy.toml_layout import RULE_TABLE, TOMLDecodeError, TomlLayout, loads, scan_layout

DEFAULT_POLICY_DIR = "/etc/ext4box/policy.d"

_TOML_POSITION = re.compile(r"\(at line (\d+), column (\d+)\)")


# A fresh install has examples but no rules: say how to get some (issue 16 item 2).
MISSING_DIRECTORY = (
    "policy directory does not exist (create it with `install -d -m 0755 DIR` and add"
    " rules: see policy/README.md and /usr/share/ext4box/policy-examples; or name another"
    " with --policy DIR)"
)


def policy_files(directory: str) -> list[str]:
    """The policy files of `directory` in matching order (byte order of names).

    Hidden files (editor backups such as ``.10-x.toml.swp`` or ``.#x.toml``)
    are skipped.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        raise PolicyLoadError([PolicyError(directory, MISSING_DIRECTORY)]) from None
    except NotADirectoryError:
        raise PolicyLoadError([PolicyError(directory, "policy path is not a directory")]) from None
    except OSError as error:
        message = f"cannot read policy directory: {error.strerror}"
        raise PolicyLoadError([PolicyError(directory, message)]) from None
    chosen = [n for n in names if n.endswith(".toml") and not n.startswith(".")]
    return [os.path.join(directory, name) for name in sorted(chosen, key=os.fsencode)]


def load_policy(directory: str | None = None, *, check_ownership: bool = False) -> Policy:
    """Load and validate every policy file of `directory`.

    With `check_ownership` (the helper sets it when it acts for another
    user), the directory and each file must be owned by root or by us and
    not be writable by group or others: whoever can write the policy can
    grant any mount.
    """
    directory = directory or DEFAULT_POLICY_DIR
    paths = policy_files(directory)
    errors: list[PolicyError] = []
    if check_ownership:
        _check_owner(directory, errors)
    rules: list[Rule] = []
    seen: dict[str, Rule] = {}
    for path in paths:
        if check_ownership:
            _check_owner(path, errors)
        rules.extend(_load_file(path, seen, errors))
    if errors:
        # Report in reading order: by file, then by line (stable within a line).
        file_order = {path: index for index, path in enumerate([directory, *paths])}
        errors.sort(key=lambda e: (file_order.get(e.path, len(file_order)), e.line or 0))
        raise PolicyLoadError(errors)
    return Policy(directory=directory, files=tuple(paths), rules=tuple(rules))


def _check_owner(path: str, errors: list[PolicyError]) -> None:
    try:
        info = os.stat(path)
    except OSError as error:
        errors.append(PolicyError(path, f"cannot stat: {error.strerror}"))
        return
    if info.st_uid not in (0, os.geteuid()):
        errors.append(PolicyError(path, f"owned by uid {info.st_uid}, must be owned by root"))
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(info.st_mode)
        errors.append(
            PolicyError(path, f"writable by group or others (mode {mode:04o}); chmod go-w it")
        )


def _load_file(path: str, seen: dict[str, Rule], errors: list[PolicyError]) -> list[Rule]:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        errors.append(PolicyError(path, f"cannot read: {error.strerror}"))
        return []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        errors.append(PolicyError(path, "not valid UTF-8 text", line=line))
        return []
    try:
        document = loads(text)
    except TOMLDecodeError as error:
        position = _TOML_POSITION.search(str(error))
        line = int(position.group(1)) if position else None
        errors.append(PolicyError(path, f"TOML syntax error: {error}", line=line))
        return []
    layout = scan_layout(text)
    return _read_rules(path, document, layout, seen, errors)


def _read_rules(
    path: str,
    document: dict[str, Any],
    layout: TomlLayout,
    seen: dict[str, Rule],
    errors: list[PolicyError],
) -> list[Rule]:
    for key in document:
        if key != RULE_TABLE:
            message = "unknown top-level key (a policy file holds only [[rule]] tables)"
            errors.append(PolicyError(path, message, line=layout.top_key_lines.get(key), key=key))
    tables = document.get(RULE_TABLE, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        line = layout.top_key_lines.get(RULE_TABLE)
        message = "expected an array of tables: write each rule under a [[rule]] header"
        errors.append(PolicyError(path, message, line=line, key=RULE_TABLE))
        return []
    rules: list[Rule] = []
    for index, table in enumerate(tables):
        reader = RuleReader(path, index, table, layout, errors)
        rule = reader.read()
        if rule is None:
            continue
        first = seen.get(rule.name)
        if first is not None:
            reader.fail("name", f"duplicate rule name (first defined at {first.file}:{first.line})")
            continue
        seen[rule.name] = rule
        rules.append(rule)
    return rules
