"""Deciding a request: first matching rule wins, deny by default.

Rules are tried in a fixed order: policy files by name (byte order), then
rules in the order they appear in their file. The first rule whose every
condition holds decides: an allow rule allows (with its flags, features and
size limit), a deny rule denies. If none matches, the request is denied and
the reason lists why each rule did not match.

Conditions are checked cheapest first; the image's SHA-256 is computed only
when a rule pins digests and everything else about that rule already holds,
and at most once per request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ext4box.policy.globs import PathGlob
from ext4box.policy.model import (
    ALWAYS_ON_FLAGS,
    ANYONE,
    Decision,
    Principal,
    Request,
    Rule,
    RuleVerdict,
)
from ext4box.policy.server_options import always_allowed
from ext4box.policy.text import printable

_log = structlog.get_logger("ext4box.policy")


@dataclass(frozen=True, slots=True)
class Policy:
    directory: str
    files: tuple[str, ...]
    rules: tuple[Rule, ...]

    @property
    def pins_digest(self) -> bool:
        """True if some rule pins a digest (the helper may then need to hash)."""
        return any(rule.sha256 for rule in self.rules)

    def evaluate(self, request: Request) -> Decision:
        """Decide without logging (for explanations and dry runs)."""
        digest = _LazyDigest(request.sha256)
        verdicts: list[RuleVerdict] = []
        winner: Rule | None = None
        for rule in self.rules:
            if winner is not None:
                verdicts.append(RuleVerdict(rule, matched=False, reached=False))
                continue
            reasons = _mismatches(rule, request, digest)
            covers = not rule.images or _image_matches(rule.images, request)
            verdicts.append(
                RuleVerdict(rule, not reasons, tuple(reasons), reached=True, covers_image=covers)
            )
            if not reasons:
                winner = rule
        return _decision(self, request, winner, tuple(verdicts), digest.value)

    def decide(self, request: Request) -> Decision:
        """Decide and log the decision as one structured event."""
        decision = self.evaluate(request)
        _log_decision(request, decision)
        return decision


class _LazyDigest:
    """The image digest, computed on first use only."""

    __slots__ = ("_compute", "error", "value")

    def __init__(self, compute: Callable[[], str] | None) -> None:
        self._compute = compute
        self.value: str | None = None
        self.error: str | None = None

    def get(self) -> str | None:
        if self.value is None and self.error is None:
            if self._compute is None:
                self.error = "no SHA-256 of the image is available"
            else:
                try:
                    self.value = self._compute().lower()
                except OSError as error:
                    self.error = f"could not compute the image's SHA-256: {error.strerror or error}"
        return self.value


def _mismatches(rule: Rule, request: Request, digest: _LazyDigest) -> list[str]:
    """Every reason `rule` does not apply to `request`; empty when it matches."""
    allow = rule.action == "allow"
    reasons: list[str] = []
    if rule.images and not _image_matches(rule.images, request):
        named = " or ".join((request.image, *request.image_links))
        reasons.append(f"image {named} matches none of images {_globs(rule.images)}")
    if allow and request.is_block_device and not rule.block_devices:
        reasons.append("the image is a block device and the rule does not set block_devices = true")
    if not rule.applies_to_everyone and not _is_member(rule, request):
        reasons.append(_not_member_reason(rule, request))
    if allow and request.mode == "rw" and rule.mode == "ro":
        reasons.append("rw was requested but the rule allows only ro")
    if not allow and rule.mode == "rw" and request.mode == "ro":
        reasons.append("the rule denies only rw and ro was requested")
    if allow:
        refused = _options_not_allowed(rule, request)
        if refused:
            allowed = "[" + ", ".join(rule.server_options) + "]"
            reasons.append(
                f"server option(s) {','.join(refused)} requested but the rule's"
                f" server_options allow only {allowed}"
            )
    if allow and rule.max_size is not None and request.image_size > rule.max_size:
        reasons.append(
            f"image size {format_size(request.image_size)} exceeds max_size "
            f"{format_size(rule.max_size)}"
        )
    if rule.mountpoints:
        if request.mountpoint is None:
            if not allow:
                reasons.append(
                    f"no mountpoint given (the rule denies only mountpoints "
                    f"{_globs(rule.mountpoints)})"
                )
        elif not _any_match(rule.mountpoints, request.mountpoint):
            reasons.append(
                f"mountpoint {request.mountpoint} matches none of mountpoints "
                f"{_globs(rule.mountpoints)}"
            )
    if rule.sha256 and not reasons:
        # Hash only when the digest is the last thing standing between this
        # rule and a match: hashing a large image is the slowest check.
        value = digest.get()
        if value is None:
            reasons.append(digest.error or "no SHA-256 of the image is available")
        elif value not in rule.sha256:
            reasons.append(f"image sha256 {value} is not one of the rule's pinned digests")
    return reasons


def _options_not_allowed(rule: Rule, request: Request) -> list[str]:
    """The caller's server options this rule does not let them have (quota
    enforcement and the neutral options are always allowed)."""
    return [option for option in dict.fromkeys(request.server_options)
            if not always_allowed(option) and option not in rule.server_options]  # fmt: skip


def _effective_options(rule: Rule, request: Request) -> tuple[str, ...]:
    """The caller's options, then the quota types the rule enforces."""
    forced = [qtype for qtype in rule.enforce_quota if qtype not in request.server_options]
    return (*request.server_options, *forced)


def _image_matches(globs: tuple[PathGlob, ...], request: Request) -> bool:
    return any(_any_match(globs, path) for path in (request.image, *request.image_links))


def _any_match(globs: tuple[PathGlob, ...], path: str) -> bool:
    return any(glob.matches(path) for glob in globs)


def _is_member(rule: Rule, request: Request) -> bool:
    user_names = (request.user,) if request.user else ()
    return _principal_in(rule.users, user_names, (request.uid,)) or _principal_in(
        rule.groups, request.groups, request.gids
    )


def _principal_in(
    listed: tuple[Principal, ...], names: tuple[str, ...], ids: tuple[int, ...]
) -> bool:
    if ANYONE in listed:
        return True
    return any(name in listed for name in names) or any(number in listed for number in ids)


def _not_member_reason(rule: Rule, request: Request) -> str:
    parts = []
    if rule.users:
        parts.append(f"is not in users {_principals(rule.users)}")
    if rule.groups:
        parts.append(f"is in none of groups {_principals(rule.groups)}")
    return f"user {request.who} " + " and ".join(parts)


def _decision(
    policy: Policy,
    request: Request,
    winner: Rule | None,
    verdicts: tuple[RuleVerdict, ...],
    digest: str | None,
) -> Decision:
    mountpoint_checked = request.mountpoint is not None
    if winner is None:
        reason = printable(_denied_by_default(policy, request, verdicts))
        return Decision(
            allowed=False,
            reason=reason,
            sha256=digest,
            mountpoint_checked=mountpoint_checked,
            verdicts=verdicts,
        )
    where = f'rule "{winner.name}" ({winner.location})'
    if winner.action == "deny":
        reason = f"denied by {where}"
        if winner.description:
            reason += f": {winner.description}"
        return Decision(
            allowed=False,
            reason=printable(reason),
            rule=winner.name,
            file=winner.file,
            line=winner.line,
            sha256=digest,
            mountpoint_checked=mountpoint_checked,
            verdicts=verdicts,
        )
    flags = ALWAYS_ON_FLAGS + winner.flags
    reason = f"allowed by {where}: {request.mode} mount of {request.image} by {request.who}"
    if request.mountpoint is not None:
        reason += f" at {request.mountpoint}"
    elif winner.mountpoints:
        reason += f", only at mountpoints {_globs(winner.mountpoints)}"
    reason += f" with {','.join(flags)}"
    server_options = _effective_options(winner, request)
    if server_options:
        reason += f", server options {','.join(server_options)}"
    return Decision(
        allowed=True,
        reason=printable(reason),
        rule=winner.name,
        file=winner.file,
        line=winner.line,
        mode=request.mode,
        mount_flags=flags,
        refused_features=winner.refuse_features,
        max_size=winner.max_size,
        block_devices=winner.block_devices,
        grant_access=winner.grant_access,
        sha256=digest,
        server_options=server_options,
        mountpoint_checked=mountpoint_checked,
        verdicts=verdicts,
    )


def _denied_by_default(policy: Policy, request: Request, verdicts: tuple[RuleVerdict, ...]) -> str:
    """One sentence: why each rule that covers the image did not allow it."""
    if not policy.rules:
        return f"denied: the policy in {policy.directory} has no rules (deny by default)"
    # Deny rules that did not match and allow rules for other images are
    # noise here; `ext4box policy check` shows every rule.
    allow_verdicts = [v for v in verdicts if v.rule.action == "allow"]
    candidates = [v for v in allow_verdicts if v.covers_image]
    others = len(allow_verdicts) - len(candidates)
    if not candidates:
        return f"denied: no allow rule covers image {request.image} (deny by default)"
    why = "; ".join(
        f'rule "{v.rule.name}" ({v.rule.location}) did not match: {", ".join(v.reasons)}'
        for v in candidates
    )
    tail = f"; {others} other allow rule(s) do not cover this image" if others else ""
    return f"denied: no rule allows this (deny by default): {why}{tail}"


def _log_decision(request: Request, decision: Decision) -> None:
    fields = {
        "allowed": decision.allowed,
        "user": request.user,
        "uid": request.uid,
        "gids": list(request.gids),
        "image": request.image,
        "image_size": request.image_size,
        "mode": request.mode,
        "mountpoint": request.mountpoint,
        "mount_flags": list(decision.mount_flags) if decision.allowed else [],
        "rule": decision.rule,
        "rule_file": decision.file,
        "reason": decision.reason,
    }
    if decision.sha256 is not None:
        fields["sha256"] = decision.sha256
    if decision.allowed:
        fields["refused_features"] = list(decision.refused_features)
        fields["max_size"] = decision.max_size
        fields["grant_access"] = decision.grant_access
    if request.image_links:
        fields["image_links"] = list(request.image_links)
    if request.server_options:
        fields["requested_server_options"] = list(request.server_options)
    if decision.server_options:
        fields["server_options"] = list(decision.server_options)
    _log.info("policy_decision", **fields)


def _globs(globs: tuple[PathGlob, ...]) -> str:
    return "[" + ", ".join(glob.pattern for glob in globs) + "]"


def _principals(listed: tuple[Principal, ...]) -> str:
    return "[" + ", ".join(str(item) for item in listed) + "]"


def format_size(size: int) -> str:
    """Bytes as a short human size: 4 GiB, 1.5 MiB, 512 B."""
    for unit, shift in (("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            value = size / (1 << shift)
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit} ({size} bytes)"
    return f"{size} bytes"
