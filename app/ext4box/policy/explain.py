"""`ext4box policy check`: explain what the policy decides for an image, and why."""

from __future__ import annotations

import io
import os
import stat
import sys
from collections.abc import Callable
from typing import TextIO

from ext4box.policy.digest import sha256_of_fd
from ext4box.policy.engine import Policy, format_size
from ext4box.policy.errors import PolicyLoadError
from ext4box.policy.identity import Identity, identity_of_user
from ext4box.policy.loader import load_policy
from ext4box.policy.model import MODES, Decision, Request
from ext4box.policy.text import printable

EXIT_ALLOWED = 0
EXIT_DENIED = 1
EXIT_BAD_INPUT = 2


class _BadInput(Exception):
    """A bad argument or image; the message is the one line the user sees."""


def explain_cli(
    image: str,
    *,
    user: str | None,
    mode: str,
    mountpoint: str | None,
    policy_dir: str | None,
) -> int:
    """Print the decision for `image` with the reasons of every rule.

    Returns 0 if allowed, 1 if denied, 2 on a bad policy or argument (after
    printing one line per problem on stderr).
    """
    try:
        if mode not in MODES:
            raise _BadInput(f"mode must be ro or rw, not {mode!r}")
        try:
            identity = identity_of_user(user)
        except LookupError as error:
            raise _BadInput(str(error)) from None
        policy = load_policy(policy_dir)
        request = _request(image, identity, mode, mountpoint)
    except PolicyLoadError as error:
        for line in error.lines():
            print(f"ext4box: policy error: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _BadInput as error:
        print(f"ext4box: error: {printable(str(error))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    decision = policy.evaluate(request)
    # Rule names, descriptions, globs and paths are shown, never their control characters.
    report = io.StringIO()
    _render(report, image, request, policy, decision)
    for line in report.getvalue().splitlines():
        print(printable(line))
    return EXIT_ALLOWED if decision.allowed else EXIT_DENIED


def _request(image: str, identity: Identity, mode: str, mountpoint: str | None) -> Request:
    resolved = os.path.realpath(image)
    try:
        info = os.stat(resolved)
    except OSError as error:
        raise _BadInput(f"image {image}: {error.strerror}") from None
    is_block_device = stat.S_ISBLK(info.st_mode)
    if not (stat.S_ISREG(info.st_mode) or is_block_device):
        raise _BadInput(f"image {image}: not a regular file or block device")
    size = _block_device_size(resolved) if is_block_device else info.st_size
    return Request(
        image=resolved,
        image_size=size,
        uid=identity.uid,
        user=identity.user,
        gids=identity.gids,
        groups=identity.groups,
        mode=mode,
        mountpoint=os.path.realpath(mountpoint) if mountpoint is not None else None,
        is_block_device=is_block_device,
        sha256=_path_digest(resolved),
    )


def _block_device_size(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise _BadInput(f"image {path}: cannot open to read its size: {error.strerror}") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _path_digest(path: str) -> Callable[[], str]:
    def compute() -> str:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            return sha256_of_fd(fd)
        finally:
            os.close(fd)

    return compute


def _render(out: TextIO, given: str, request: Request, policy: Policy, decision: Decision) -> None:
    verdict = "ALLOWED" if decision.allowed else "DENIED"
    print(f"decision: {verdict}", file=out)
    print(f"reason:   {decision.reason}", file=out)
    kind = "block device" if request.is_block_device else "regular file"
    image_line = f"{request.image} ({kind}, {format_size(request.image_size)})"
    if request.image != given:
        image_line += f", given as {given}"
    groups = ", ".join(request.groups) or "-"
    print("request:", file=out)
    print(f"  image:       {image_line}", file=out)
    print(f"  user:        {request.who}, groups: {groups}", file=out)
    print(f"  mode:        {request.mode}", file=out)
    shown_mountpoint = request.mountpoint or "(not given: mountpoint rules not checked)"
    print(f"  mountpoint:  {shown_mountpoint}", file=out)
    if decision.sha256 is not None:
        print(f"  sha256:      {decision.sha256}", file=out)
    if decision.allowed:
        print("grants:", file=out)
        print(f"  mode:        {decision.mode}", file=out)
        print(f"  mount flags: {','.join(decision.mount_flags)}", file=out)
        features = ", ".join(decision.refused_features) or "(none)"
        print(f"  refuses ext4 features: {features}", file=out)
        limit = format_size(decision.max_size) if decision.max_size is not None else "(none)"
        print(f"  max size:    {limit}", file=out)
        devices = "allowed" if decision.block_devices else "refused"
        if decision.grant_access:
            devices += " (the broker opens them for the user: grant_access)"
        print(f"  block devices: {devices}", file=out)
        winner = next((v.rule for v in decision.verdicts if v.matched), None)
        if winner is not None:
            allowed = ", ".join(winner.server_options) or "(only the always allowed)"
            print(f"  server options a caller may ask for: {allowed}", file=out)
            enforced = ", ".join(winner.enforce_quota) or "(none)"
            print(f"  quota enforced: {enforced}", file=out)
    files = len(policy.files)
    print(
        f"policy directory {policy.directory}: {files} file(s), {len(policy.rules)} rule(s), "
        "tried in this order (first match wins):",
        file=out,
    )
    if not policy.rules:
        print("  (no rules: everything is denied)", file=out)
    for number, verdict_of_rule in enumerate(decision.verdicts, start=1):
        rule = verdict_of_rule.rule
        if not verdict_of_rule.reached:
            outcome = "not reached (an earlier rule decided)"
        elif verdict_of_rule.matched:
            outcome = "MATCHED: " + ("allows" if rule.action == "allow" else "denies")
        else:
            outcome = "no match: " + "; ".join(verdict_of_rule.reasons)
        print(f"  {number}. {rule.action:5} {rule.name} ({rule.location}): {outcome}", file=out)
