"""Server options in the policy: `server_options` and `enforce_quota` keys, and
how a caller's asked-for options are judged (policy/server_options.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_load_errors import line_of, only_error

from ext4box.fuse.atime import ATIME_OPTIONS, RELATIME, take_atime_options
from ext4box.fuse.fs_options import QUOTA_OPTIONS, WRITEBACK_CACHE
from ext4box.policy import Request, load_policy
from ext4box.policy.server_options import (
    NEUTRAL_OPTIONS,
    SERVER_OPTIONS,
    ServerOptionError,
    parse_server_options,
)

WritePolicy = Callable[[str, str], Path]

RULE = """
[[rule]]
name = "users"
images = ["/srv/images/*.img"]
users = ["alice"]
mode = "rw"
"""


def test_the_policy_knows_exactly_the_names_the_server_reads() -> None:
    # The policy may not import fuse/; its list must not drift from the readers'.
    assert frozenset(QUOTA_OPTIONS) | ATIME_OPTIONS | {WRITEBACK_CACHE} == SERVER_OPTIONS


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("server_options", '["noatime", "nosuid"]', "unknown server option 'nosuid' (known: "),
        ("server_options", '"noatime"', "expected an array of server options, got a string"),
        ("server_options", "[1]", "expected a string, got an integer"),
        ("enforce_quota", '["noquota"]', "unknown quota type 'noquota' (known: usrquota, "),
        ("enforce_quota", "[]", "empty array"),
        ("enforce_quota", "true", "expected an array of quota types, got a boolean"),
    ],
)
def test_bad_values_are_one_clear_error_at_load(
    policy_dir: Path, write_policy: WritePolicy, key: str, value: str, says: str
) -> None:
    path = write_policy("10-x.toml", RULE + f"{key} = {value}\n")
    error = only_error(policy_dir)
    assert (error.line, error.key) == (line_of(path, f"{key} ="), key)
    assert says in error.one_line()


def test_a_deny_rule_may_not_carry_them(policy_dir: Path, write_policy: WritePolicy) -> None:
    write_policy("10-x.toml", RULE.replace('mode = "rw"', 'action = "deny"')
                 + 'server_options = ["noatime"]\n')  # fmt: skip
    error = only_error(policy_dir)
    assert error.key == "server_options" and "only allowed in an allow rule" in error.message


def _decide(policy_dir: Path, write_policy: WritePolicy, extra: str, options: tuple[str, ...],
            request_for: Callable[..., Request]):  # fmt: skip
    write_policy("10-x.toml", RULE + extra)
    policy = load_policy(str(policy_dir))
    return policy.evaluate(request_for(mode="rw", server_options=options))


def test_an_option_the_rule_does_not_list_is_refused_with_its_name(
    policy_dir: Path, write_policy: WritePolicy, request_for: Callable[..., Request]
) -> None:
    decision = _decide(policy_dir, write_policy, 'server_options = ["noatime"]\n',
                       ("noatime", "strictatime"), request_for)  # fmt: skip
    assert not decision.allowed
    assert ("server option(s) strictatime requested but the rule's server_options allow only"
            " [noatime]") in decision.reason  # fmt: skip
    # Without the key, no option but quota enforcement and the neutral ones.
    decision = _decide(policy_dir, write_policy, "", ("nodiratime",), request_for)
    assert not decision.allowed and "allow only []" in decision.reason


def test_neutral_options_are_always_allowed(
    policy_dir: Path, write_policy: WritePolicy, request_for: Callable[..., Request]
) -> None:
    """Each leaves the default on its own (relatime, atime on directories): the
    server's rule for them is the one it applies with no option at all."""
    neutral = ("relatime", "norelatime", "nostrictatime", "atime", "diratime", "lazytime",
               "nolazytime")  # fmt: skip
    assert frozenset(neutral) == NEUTRAL_OPTIONS
    for option in neutral:
        assert take_atime_options([option])[0] == RELATIME, option
    decision = _decide(policy_dir, write_policy, "", neutral, request_for)
    assert decision.allowed and decision.server_options == neutral
    # Neutral after an allowed option still needs that option allowed.
    decision = _decide(policy_dir, write_policy, "", ("noatime", "atime"), request_for)
    assert not decision.allowed and "server option(s) noatime requested" in decision.reason


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_writeback_cache_needs_the_rule_to_list_it(
    policy_dir: Path, write_policy: WritePolicy, request_for: Callable[..., Request], mode: str
) -> None:
    """It changes durability (errors at fsync/close, those bytes lost): never
    always allowed, on ro too (where the server ignores it, as `serve` does)."""
    write_policy("10-x.toml", RULE + 'server_options = ["noatime"]\n')
    refused = load_policy(str(policy_dir)).evaluate(
        request_for(mode=mode, server_options=("usrquota", "writeback_cache")))
    assert not refused.allowed
    assert ("server option(s) writeback_cache requested but the rule's server_options allow"
            " only [noatime]") in refused.reason  # fmt: skip
    write_policy("10-x.toml", RULE + 'server_options = ["writeback_cache"]\n')
    granted = load_policy(str(policy_dir)).evaluate(
        request_for(mode=mode, server_options=("writeback_cache",)))
    assert granted.allowed and granted.server_options == ("writeback_cache",)


def test_quota_enforcement_is_always_allowed_and_the_rule_can_force_it(
    policy_dir: Path, write_policy: WritePolicy, request_for: Callable[..., Request]
) -> None:
    decision = _decide(policy_dir, write_policy, "", ("grpquota",), request_for)
    assert decision.allowed and decision.server_options == ("grpquota",)
    decision = _decide(policy_dir, write_policy,
                       'server_options = ["noatime"]\nenforce_quota = ["quota", "prjquota"]\n',
                       ("noatime", "usrquota"), request_for)  # fmt: skip
    assert decision.allowed
    assert decision.server_options == ("noatime", "usrquota", "prjquota")
    assert "server options noatime,usrquota,prjquota" in decision.reason


def test_unknown_option_strings_never_reach_a_decision(
    request_for: Callable[..., Request],
) -> None:
    with pytest.raises(ValueError, match="unknown server option 'noquota'"):
        request_for(server_options=("noquota",))
    with pytest.raises(ServerOptionError, match="unknown server option 'writeback'"):
        parse_server_options("usrquota,writeback")
    assert parse_server_options("usrquota, noatime,") == ("usrquota", "noatime")


def test_the_readme_example_loads_and_decides(
    policy_dir: Path, request_for: Callable[..., Request]
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "policy/README.md").read_text()
    block = next(part for part in readme.split("```toml")[1:] if 'name = "students"' in part)
    (policy_dir / "10-readme.toml").write_text(block.split("```")[0])
    policy = load_policy(str(policy_dir))
    student = {"image": "/srv/students/a.img", "groups": ("students",), "mode": "rw"}
    decision = policy.evaluate(request_for(**student, server_options=("noatime",)))
    assert decision.server_options == ("noatime", "usrquota", "grpquota")
    refused = policy.evaluate(request_for(**student, server_options=("strictatime",)))
    assert not refused.allowed and "strictatime" in refused.reason
