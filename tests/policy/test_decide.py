"""Decisions: first matching rule wins, deny by default, reasons say why."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ext4box.policy import Policy, Request, load_policy, sha256_of_fd

WritePolicy = Callable[[str, str], Path]
RequestFor = Callable[..., Request]

READONLY = """
[[rule]]
name = "readonly-images"
images = ["/srv/images/*.img"]
groups = ["disk-images"]
mode = "ro"
flags = ["noexec"]
max_size = "64M"
refuse_features = ["needs_recovery", "extents", "casefold"]
mountpoints = ["/mnt/images/*"]
"""


def load(directory: Path) -> Policy:
    return load_policy(str(directory))


def verdict_reasons(decision, name: str) -> tuple[str, ...]:
    (verdict,) = [v for v in decision.verdicts if v.rule.name == name]
    return verdict.reasons


def test_allowed_decision_carries_everything(
    policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    path = write_policy("10-ro.toml", READONLY)
    decision = load(policy_dir).decide(request_for())
    assert decision.allowed
    assert (decision.rule, decision.file, decision.line) == ("readonly-images", str(path), 1)
    assert decision.mode == "ro"
    assert decision.mount_flags == ("nosuid", "nodev", "noexec")
    assert decision.refused_features == ("needs_recovery", "extent", "casefold")
    assert decision.max_size == 64 << 20
    assert decision.block_devices is False
    assert decision.reason.startswith('allowed by rule "readonly-images" (10-ro.toml:1): ro mount')


def test_nosuid_nodev_always_on(
    policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    write_policy("10-a.toml", '[[rule]]\nname = "a"\nimages = ["/**"]\nusers = ["*"]\n')
    decision = load(policy_dir).decide(request_for())
    assert decision.allowed
    assert decision.mount_flags == ("nosuid", "nodev")


def test_empty_policy_denies(policy_dir: Path, request_for: RequestFor) -> None:
    decision = load(policy_dir).decide(request_for())
    assert not decision.allowed
    assert decision.rule is None
    assert "has no rules (deny by default)" in decision.reason


def test_no_matching_rule(policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor):
    write_policy("10-ro.toml", READONLY)
    decision = load(policy_dir).decide(request_for(image="/home/alice/disk.img"))
    assert not decision.allowed
    assert decision.rule is None
    assert decision.reason == (
        "denied: no allow rule covers image /home/alice/disk.img (deny by default)"
    )
    assert verdict_reasons(decision, "readonly-images") == (
        "image /home/alice/disk.img matches none of images [/srv/images/*.img]",
    )


def test_star_does_not_cross_directories(
    policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    write_policy("10-ro.toml", READONLY)
    policy = load(policy_dir)
    assert not policy.decide(request_for(image="/srv/images/sub/a.img")).allowed
    assert policy.decide(request_for(image="/srv/images/.hidden.img")).allowed


def test_wrong_user(policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor):
    write_policy(
        "10-u.toml",
        '[[rule]]\nname = "u"\nimages = ["/srv/images/*.img"]\nusers = ["alice", 1234]\n',
    )
    policy = load(policy_dir)
    assert policy.decide(request_for()).allowed  # alice by name
    assert policy.decide(request_for(user=None, uid=1234)).allowed  # by uid
    decision = policy.decide(request_for(user="bob", uid=1001, groups=(), gids=()))
    assert not decision.allowed
    assert 'rule "u" (10-u.toml:1) did not match: user bob (uid 1001) is not in users' in (
        decision.reason
    )
    assert "[alice, 1234]" in decision.reason


def test_wrong_group(policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor):
    write_policy("10-ro.toml", READONLY)
    policy = load(policy_dir)
    decision = policy.decide(request_for(user="bob", uid=1001, groups=("bob",), gids=(1001,)))
    assert not decision.allowed
    assert verdict_reasons(decision, "readonly-images") == (
        "user bob (uid 1001) is in none of groups [disk-images]",
    )


def test_group_by_gid(policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor):
    write_policy("10-g.toml", '[[rule]]\nname = "g"\nimages = ["/srv/**"]\ngroups = [990]\n')
    policy = load(policy_dir)
    assert policy.decide(request_for(groups=())).allowed
    assert not policy.decide(request_for(gids=(1000,), groups=("disk-images",))).allowed


def test_digest_pin(
    tmp_path: Path, policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    image = tmp_path / "pinned.img"
    image.write_bytes(os.urandom(3 << 20))
    expected = subprocess.run(
        ["sha256sum", str(image)], check=True, capture_output=True, text=True
    ).stdout.split()[0]
    other = "f" * 64
    write_policy(
        "20-pin.toml",
        f'[[rule]]\nname = "pin"\nsha256 = ["{other}", "{expected.upper()}"]\nusers = ["*"]\n'
        'mode = "rw"\n',
    )
    policy = load(policy_dir)
    fd = os.open(image, os.O_RDONLY)
    try:
        decision = policy.decide(
            request_for(image=str(image), mode="rw", sha256=lambda: sha256_of_fd(fd))
        )
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # hashing left the offset alone
    finally:
        os.close(fd)
    assert decision.allowed
    assert decision.mode == "rw"
    assert decision.sha256 == expected

    image.write_bytes(b"changed")
    changed = subprocess.run(
        ["sha256sum", str(image)], check=True, capture_output=True, text=True
    ).stdout.split()[0]
    fd = os.open(image, os.O_RDONLY)
    try:
        decision = policy.decide(request_for(image=str(image), sha256=lambda: sha256_of_fd(fd)))
    finally:
        os.close(fd)
    assert not decision.allowed
    assert decision.sha256 == changed
    assert f"image sha256 {changed} is not one of the rule's pinned digests" in decision.reason


def test_digest_only_computed_when_needed(
    policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    write_policy("10-ro.toml", READONLY)
    write_policy(
        "20-pin.toml",
        f'[[rule]]\nname = "pin"\nimages = ["/srv/images/*.img"]\nsha256 = ["{"a" * 64}"]\n'
        'users = ["alice"]\nmode = "rw"\n',
    )
    calls: list[int] = []

    def digest() -> str:
        calls.append(1)
        return "b" * 64

    policy = load(policy_dir)
    assert policy.decide(request_for(sha256=digest)).allowed  # ro: the first rule decides
    assert calls == []
    # Another user: the pinned rule fails on who, so hashing would be wasted.
    policy.decide(request_for(mode="rw", user="bob", uid=7, groups=(), gids=(), sha256=digest))
    assert calls == []
    decision = policy.decide(request_for(mode="rw", sha256=digest))
    assert not decision.allowed
    assert calls == [1]  # computed once, for the one rule that needed it
    missing = policy.decide(request_for(mode="rw", sha256=None))
    assert "no SHA-256 of the image is available" in missing.reason


def test_rw_requested_where_only_ro(
    policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    write_policy("10-ro.toml", READONLY)
    decision = load(policy_dir).decide(request_for(mode="rw"))
    assert not decision.allowed
    assert verdict_reasons(decision, "readonly-images") == (
        "rw was requested but the rule allows only ro",
    )


def test_rw_rule_also_allows_ro(
    policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    write_policy("10-rw.toml", READONLY.replace('mode = "ro"', 'mode = "rw"'))
    policy = load(policy_dir)
    assert policy.decide(request_for(mode="rw")).mode == "rw"
    assert policy.decide(request_for(mode="ro")).mode == "ro"


def test_oversized_image(policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor):
    write_policy("10-ro.toml", READONLY)
    policy = load(policy_dir)
    assert policy.decide(request_for(image_size=64 << 20)).allowed  # the limit itself is fine
    decision = policy.decide(request_for(image_size=(64 << 20) + 1))
    assert not decision.allowed
    assert verdict_reasons(decision, "readonly-images") == (
        "image size 64 MiB (67108865 bytes) exceeds max_size 64 MiB (67108864 bytes)",
    )


def test_mountpoint_not_allowed(
    policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    write_policy("10-ro.toml", READONLY)
    policy = load(policy_dir)
    decision = policy.decide(request_for(mountpoint="/home/alice/mnt"))
    assert not decision.allowed
    assert verdict_reasons(decision, "readonly-images") == (
        "mountpoint /home/alice/mnt matches none of mountpoints [/mnt/images/*]",
    )
    unchecked = policy.evaluate(request_for(mountpoint=None))
    assert unchecked.allowed and not unchecked.mountpoint_checked
    assert "only at mountpoints [/mnt/images/*]" in unchecked.reason


def test_block_device_not_allowed_by_default(
    policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    write_policy("10-ro.toml", READONLY)
    write_policy(
        "20-dev.toml",
        '[[rule]]\nname = "dev"\nimages = ["/dev/loop*"]\nusers = ["alice"]\n'
        "block_devices = true\n",
    )
    policy = load(policy_dir)
    decision = policy.decide(request_for(is_block_device=True))
    assert not decision.allowed
    assert verdict_reasons(decision, "readonly-images") == (
        "the image is a block device and the rule does not set block_devices = true",
    )
    allowed = policy.decide(request_for(image="/dev/loop7", is_block_device=True))
    assert allowed.allowed and allowed.rule == "dev" and allowed.block_devices


def test_deny_rule_before_allow_rule(
    policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    write_policy(
        "10-ro.toml",
        """
        [[rule]]
        name = "quarantine"
        action = "deny"
        description = "bad.img is quarantined"
        images = ["/srv/images/bad.img"]
        """
        + READONLY,
    )
    policy = load(policy_dir)
    decision = policy.decide(request_for(image="/srv/images/bad.img"))
    assert not decision.allowed
    assert decision.rule == "quarantine"
    assert decision.reason == ('denied by rule "quarantine" (10-ro.toml:1): bad.img is quarantined')
    # The later allow rule was never consulted.
    assert [v.reached for v in decision.verdicts] == [True, False]
    assert policy.decide(request_for(image="/srv/images/good.img")).allowed


def test_order_is_file_name_then_position(
    policy_dir: Path, write_policy: WritePolicy, request_for: RequestFor
) -> None:
    # Byte order of names: "10-" sorts before "9-" (so use two-digit prefixes).
    write_policy("9-deny.toml", '[[rule]]\nname = "late"\naction = "deny"\nimages = ["/**"]\n')
    write_policy("10-ro.toml", READONLY)
    policy = load(policy_dir)
    assert [r.name for r in policy.rules] == ["readonly-images", "late"]
    assert policy.decide(request_for()).allowed
    assert policy.decide(request_for(image="/x.img")).rule == "late"


def test_deny_rule_for_rw_only(policy_dir: Path, write_policy: WritePolicy, request_for):
    write_policy(
        "10-a.toml",
        '[[rule]]\nname = "no-rw"\naction = "deny"\nimages = ["/srv/**"]\nmode = "rw"\n'
        + READONLY.replace('mode = "ro"', 'mode = "rw"'),
    )
    policy = load(policy_dir)
    assert policy.decide(request_for(mode="ro")).allowed
    assert policy.decide(request_for(mode="rw")).rule == "no-rw"


def test_unresolved_paths_are_refused(request_for: RequestFor) -> None:
    for image in ("srv/a.img", "/srv/../etc/a.img", "/srv//a.img", "/srv/a.img/"):
        with pytest.raises(ValueError, match="not a resolved absolute path"):
            request_for(image=image)
    with pytest.raises(ValueError, match="mode"):
        request_for(mode="wr")


def test_decision_is_logged(policy_dir: Path, write_policy: WritePolicy, request_for):
    write_policy("10-ro.toml", READONLY)
    policy = load(policy_dir)
    with capture_logs() as logs:
        policy.decide(request_for())
        policy.decide(request_for(mode="rw"))
        policy.evaluate(request_for())  # a dry run is not logged
    assert len(logs) == 2
    allowed, denied = logs
    assert allowed["event"] == "policy_decision"
    assert allowed["allowed"] is True
    assert allowed["user"] == "alice" and allowed["uid"] == 1000
    assert allowed["image"] == "/srv/images/a.img"
    assert allowed["mode"] == "ro"
    assert allowed["mount_flags"] == ["nosuid", "nodev", "noexec"]
    assert allowed["rule"] == "readonly-images"
    assert "sha256" not in allowed  # nothing pinned, nothing hashed
    assert denied["allowed"] is False and denied["rule"] is None
    assert denied["reason"].startswith("denied: no rule allows this")


def test_shipped_examples_decide_as_documented(request_for: RequestFor) -> None:
    policy = load(Path(__file__).resolve().parents[2] / "policy")
    member = request_for(mountpoint="/mnt/images/a")
    assert policy.decide(member).rule == "readonly-images"
    assert policy.decide(request_for(image="/srv/images/untrusted-1.img")).rule == (
        "no-untrusted-images"
    )
    over_etc = policy.decide(request_for(mountpoint="/etc/ssl"))
    assert over_etc.rule == "protect-system-mountpoints" and not over_etc.allowed
    assert not policy.decide(request_for(mode="rw")).allowed
