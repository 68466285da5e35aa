"""`grant_access`: a rule under which the broker opens a block device for a user
who cannot open it (udisks' model), and device links the broker resolves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ext4box.policy import PolicyLoadError, Request, load_policy

WritePolicy = Callable[[str, str], Path]
RequestFor = Callable[..., Request]

USB = """
[[rule]]
name = "usb-sticks"
images = ["/dev/disk/by-id/usb-*"]
groups = ["plugdev"]
block_devices = true
grant_access = true
flags = ["noexec"]
"""


def only_error(directory: Path) -> str:
    with pytest.raises(PolicyLoadError) as caught:
        load_policy(str(directory))
    errors = [error.one_line() for error in caught.value.errors]
    assert len(errors) == 1, errors
    return errors[0]


def test_grant_is_carried_by_the_decision(policy_dir, write_policy, request_for) -> None:
    write_policy("10-usb.toml", USB)
    policy = load_policy(str(policy_dir))
    request = request_for(image="/dev/sdb1", image_links=("/dev/disk/by-id/usb-Stick_1-part1",),
                          is_block_device=True, groups=("alice", "plugdev"))  # fmt: skip
    decision = policy.decide(request)
    assert decision.allowed and decision.rule == "usb-sticks"
    assert decision.grant_access and decision.block_devices
    assert decision.mount_flags == ("nosuid", "nodev", "noexec")


def test_the_device_link_is_what_the_glob_matches(policy_dir, write_policy, request_for) -> None:
    write_policy("10-usb.toml", USB)
    policy = load_policy(str(policy_dir))
    common = {"is_block_device": True, "groups": ("alice", "plugdev")}
    # Without the link the resolved node alone does not match.
    bare = policy.evaluate(request_for(image="/dev/sdb1", **common))
    assert not bare.allowed
    assert bare.reason == "denied: no allow rule covers image /dev/sdb1 (deny by default)"
    # A link of another kind does not either, and the reason names both paths.
    other = policy.evaluate(
        request_for(image="/dev/sdb1", image_links=("/dev/disk/by-id/ata-Disk-part1",), **common)
    )
    (verdict,) = other.verdicts
    assert verdict.reasons == (
        "image /dev/sdb1 or /dev/disk/by-id/ata-Disk-part1 matches none of images"
        " [/dev/disk/by-id/usb-*]",
    )


def test_grant_never_applies_outside_its_group(policy_dir, write_policy, request_for) -> None:
    write_policy("10-usb.toml", USB)
    decision = load_policy(str(policy_dir)).evaluate(
        request_for(
            image="/dev/sdb1",
            image_links=("/dev/disk/by-id/usb-S-part1",),
            is_block_device=True,
            groups=("bob",),
            gids=(1001,),
            user="bob",
        )
    )
    assert not decision.allowed and not decision.grant_access


def test_image_links_must_be_resolved_paths(request_for) -> None:
    with pytest.raises(ValueError, match="image link"):
        request_for(image="/dev/sdb1", image_links=("/dev/disk/../disk/by-id/usb-x",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("block_devices = true\ngrant_access = \"yes\"\n",
         'rule #1 "g" key "grant_access": expected true or false, got a string'),
        ("grant_access = true\n",
         'rule #1 "g" key "grant_access": grant_access = true needs block_devices = true'
         " (only devices are granted)"),
    ],
)  # fmt: skip
def test_grant_access_errors(policy_dir, write_policy, text: str, message: str) -> None:
    write_policy("10-g.toml", f'[[rule]]\nname = "g"\nimages = ["/dev/sd*"]\nusers = ["*"]\n{text}')
    assert only_error(policy_dir).endswith(message)


def test_grant_access_is_allow_only(policy_dir, write_policy) -> None:
    write_policy(
        "10-g.toml",
        '[[rule]]\nname = "g"\naction = "deny"\nimages = ["/dev/sd*"]\ngrant_access = false\n',
    )
    assert only_error(policy_dir).endswith(
        'rule #1 "g" key "grant_access": only allowed in an allow rule'
        ' (this rule has action = "deny")'
    )
