"""Every validation error names the file, the line and the key."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from ext4box.policy import PolicyError, PolicyLoadError, load_policy

REPO_POLICY_DIR = Path(__file__).resolve().parents[2] / "policy"

GOOD_RULE = """
[[rule]]
name = "good"
images = ["/srv/images/*.img"]
users = ["alice"]
"""


def load_errors(directory: Path) -> list[PolicyError]:
    with pytest.raises(PolicyLoadError) as caught:
        load_policy(str(directory))
    return list(caught.value.errors)


def only_error(directory: Path) -> PolicyError:
    errors = load_errors(directory)
    assert len(errors) == 1, [e.one_line() for e in errors]
    error = errors[0]
    # One clear line per problem.
    assert "\n" not in error.one_line()
    return error


def line_of(path: Path, needle: str, occurrence: int = 1) -> int:
    """1-based line of the n-th line containing `needle` (the test's own oracle)."""
    found = [n for n, text in enumerate(path.read_text().splitlines(), 1) if needle in text]
    return found[occurrence - 1]


WritePolicy = Callable[[str, str], Path]


def test_unknown_key_in_rule(policy_dir: Path, write_policy: WritePolicy) -> None:
    path = write_policy(
        "10-x.toml",
        GOOD_RULE
        + """
        [[rule]]
        name = "second"
        images = ["/srv/b.img"]
        users = ["bob"]
        moed = "ro"
        """,
    )
    error = only_error(policy_dir)
    assert (error.path, error.line, error.key) == (str(path), line_of(path, "moed"), "moed")
    assert error.rule == '#2 "second"'
    assert error.one_line().startswith(f'{path}:{error.line}: rule #2 "second" key "moed": ')
    assert "unknown key" in error.one_line()


def test_unknown_top_level_key(policy_dir: Path, write_policy: WritePolicy) -> None:
    path = write_policy("10-x.toml", "version = 2\n" + GOOD_RULE)
    error = only_error(policy_dir)
    assert (error.line, error.key) == (1, "version")
    assert "unknown top-level key" in error.message
    assert str(path) in error.one_line()


def test_top_level_table_is_unknown(policy_dir: Path, write_policy: WritePolicy) -> None:
    path = write_policy("10-x.toml", GOOD_RULE + "\n[defaults]\nmode = 'rw'\n")
    error = only_error(policy_dir)
    assert (error.line, error.key) == (line_of(path, "[defaults]"), "defaults")


@pytest.mark.parametrize(
    ("key_line", "key", "expected"),
    [
        ("mode = 1", "mode", "expected a string, got an integer"),
        ('images = "/srv/images/*.img"', "images", "expected an array of path globs, got a string"),
        ('block_devices = "yes"', "block_devices", "expected true or false, got a string"),
        ("users = [1.5]", "users", "got a float"),
        ("groups = [true]", "groups", "got a boolean"),
        ("max_size = 4.5", "max_size", "got a float"),
        ('max_size = "4GB"', "max_size", "bad size '4GB'"),
        ("flags = { noexec = true }", "flags", "got a table"),
        ('users = ["1000"]', "users", "must be an integer (1000)"),
        ("users = [-1]", "users", "out of range"),
        ('name = "has space"', "name", "bad rule name"),
    ],
)
def test_wrong_type_or_value(
    policy_dir: Path, write_policy: WritePolicy, key_line: str, key: str, expected: str
) -> None:
    lines = ['name = "r"', 'images = ["/srv/images/*.img"]', 'groups = ["disk-images"]']
    lines = [line for line in lines if not line.startswith(key + " ")]
    text = "# header comment\n\n[[rule]]\n" + "\n".join([*lines, key_line]) + "\n"
    path = write_policy("20-types.toml", text)
    error = only_error(policy_dir)
    assert (error.path, error.line, error.key) == (str(path), line_of(path, key_line), key)
    assert expected in error.message


@pytest.mark.parametrize(
    ("glob", "why"),
    [
        ("srv/images/*.img", "not an absolute path"),
        ("/srv/images/[a-", "unclosed ["),
        ("/srv/../etc/*.img", ".. path component"),
        ("/srv//x.img", "empty path component"),
        ("/srv/images/", "ends with /"),
        ("/srv/a**b", "** must be a whole path component"),
        ("/srv/[z-a].img", "bad character class"),
        ("", "empty glob"),
    ],
)
def test_bad_glob(policy_dir: Path, write_policy: WritePolicy, glob: str, why: str) -> None:
    path = write_policy(
        "30-globs.toml",
        f"""
        [[rule]]
        name = "globs"
        users = ["alice"]
        mountpoints = ["/mnt/*"]
        images = [
            "/srv/ok/*.img",
            "{glob}",
        ]
        """,
    )
    error = only_error(policy_dir)
    assert (error.line, error.key) == (line_of(path, "images ="), "images")
    assert "bad glob" in error.message
    assert why in error.message


def test_bad_mountpoint_glob(policy_dir: Path, write_policy: WritePolicy) -> None:
    path = write_policy("10-x.toml", GOOD_RULE + 'mountpoints = ["mnt/*"]\n')
    error = only_error(policy_dir)
    assert (error.line, error.key) == (line_of(path, "mountpoints"), "mountpoints")


@pytest.mark.parametrize(
    "digest",
    [
        "abc123",
        "z" * 64,
        "0" * 63,
        "0" * 65,
        "sha512:" + "0" * 64,
    ],
)
def test_bad_digest(policy_dir: Path, write_policy: WritePolicy, digest: str) -> None:
    path = write_policy(
        "10-pin.toml",
        GOOD_RULE + f'sha256 = ["{"a" * 64}", "{digest}"]\n',
    )
    error = only_error(policy_dir)
    assert (error.line, error.key) == (line_of(path, "sha256"), "sha256")
    assert "bad SHA-256 digest" in error.message
    assert "64 hexadecimal characters" in error.message


def test_good_digest_forms_are_normalised(policy_dir: Path, write_policy: WritePolicy) -> None:
    write_policy("10-pin.toml", GOOD_RULE + f'sha256 = ["{"AB" * 32}", "sha256:{"c" * 64}"]\n')
    (rule,) = load_policy(str(policy_dir)).rules
    assert rule.sha256 == {"ab" * 32, "c" * 64}


@pytest.mark.parametrize(
    ("key_line", "key", "expected"),
    [
        ('mode = "rox"', "mode", 'unknown mode \'rox\' (expected "ro" or "rw")'),
        ('action = "permit"', "action", "unknown action 'permit'"),
        ('flags = ["noexec", "sync"]', "flags", "unknown mount flag 'sync'"),
        ('flags = ["suid"]', "flags", "always nosuid,nodev"),
        ('flags = ["dev"]', "flags", "always nosuid,nodev"),
        ('refuse_features = ["encrypt", "rot13"]', "refuse_features", "unknown ext4 feature"),
    ],
)
def test_unknown_mode_flag_feature(
    policy_dir: Path, write_policy: WritePolicy, key_line: str, key: str, expected: str
) -> None:
    path = write_policy("10-x.toml", GOOD_RULE + key_line + "\n")
    error = only_error(policy_dir)
    assert (error.line, error.key) == (line_of(path, key_line), key)
    assert expected in error.message


def test_duplicate_name_in_one_file(policy_dir: Path, write_policy: WritePolicy) -> None:
    path = write_policy("10-x.toml", GOOD_RULE + GOOD_RULE)
    error = only_error(policy_dir)
    assert (error.line, error.key) == (line_of(path, 'name = "good"', 2), "name")
    assert f"first defined at {path}:{line_of(path, '[[rule]]')}" in error.message


def test_duplicate_name_across_files(policy_dir: Path, write_policy: WritePolicy) -> None:
    first = write_policy("10-a.toml", GOOD_RULE)
    second = write_policy("20-b.toml", "# another file\n" + GOOD_RULE)
    error = only_error(policy_dir)
    assert (error.path, error.line, error.key) == (str(second), line_of(second, "name"), "name")
    assert f"first defined at {first}:1" in error.message


def test_syntax_error_keeps_line_and_column(policy_dir: Path, write_policy: WritePolicy) -> None:
    path = write_policy("10-x.toml", '[[rule]]\nname = "x"\nimages = ["/a" "/b"]\n')
    error = only_error(policy_dir)
    assert error.path == str(path)
    assert error.line == 3
    assert error.key is None
    assert "TOML syntax error" in error.message
    assert re.search(r"\(at line 3, column \d+\)", error.message)
    assert error.one_line().startswith(f"{path}:3: TOML syntax error: ")


def test_not_utf8(policy_dir: Path) -> None:
    (policy_dir / "10-x.toml").write_bytes(b'# ok\n[[rule]]\nname = "\xff"\n')
    error = only_error(policy_dir)
    assert (error.line, error.message) == (3, "not valid UTF-8 text")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[rule]]\nimages = ["/a"]\nusers = ["x"]\n', 'missing required key "name"'),
        ('[[rule]]\nname = "x"\nusers = ["x"]\n', 'by "images"'),
        ('[[rule]]\nname = "x"\nimages = ["/a"]\n', 'users = ["*"] for everyone'),
    ],
)
def test_missing_required(policy_dir: Path, write_policy: WritePolicy, text: str, expected: str):
    write_policy("10-x.toml", "# comment\n" + text)
    error = only_error(policy_dir)
    assert error.line == 2  # the [[rule]] header: there is no key line to point at
    assert expected in error.message


def test_allow_only_key_in_deny_rule(policy_dir: Path, write_policy: WritePolicy) -> None:
    path = write_policy(
        "10-x.toml",
        '[[rule]]\nname = "d"\naction = "deny"\nimages = ["/a"]\nflags = ["noexec"]\n',
    )
    error = only_error(policy_dir)
    assert (error.line, error.key) == (line_of(path, "flags"), "flags")
    assert "only allowed in an allow rule" in error.message


def test_rule_must_be_array_of_tables(policy_dir: Path, write_policy: WritePolicy) -> None:
    path = write_policy("10-x.toml", '# single table\n[rule]\nname = "x"\n')
    error = only_error(policy_dir)
    assert (error.path, error.line, error.key) == (str(path), 2, "rule")


def test_lines_found_despite_lookalikes(policy_dir: Path, write_policy: WritePolicy) -> None:
    # Text that looks like headers and keys inside strings, multi-line strings,
    # arrays and comments must not shift the line we report.
    path = write_policy(
        "10-x.toml",
        '''
        # [[rule]]
        # mode = "bad"
        [[rule]]
        name = "decoy"
        description = """
        [[rule]]
        mode = "nope"
        """
        images = [
            "/srv/[[rule]].img",  # ] [ brackets
            '/srv/x = 1',
        ]
        users = ["alice"]

        [[ rule ]]  # spaced header
        "name" = "target"
        description = 'mode = "x" [[rule]]'
        images = ["/srv/t.img"]
        groups = ["g"]
        mode = "bogus"
        ''',
    )
    error = only_error(policy_dir)
    assert (error.line, error.key) == (line_of(path, 'mode = "bogus"'), "mode")
    assert error.rule == '#2 "target"'


def test_rules_as_inline_array_point_at_rule_key(policy_dir: Path, write_policy: WritePolicy):
    path = write_policy(
        "10-x.toml",
        "# inline form\nrule = [\n"
        '  { name = "a", images = ["/a"], users = ["x"], mode = "x" },\n]\n',
    )
    error = only_error(policy_dir)
    assert (error.path, error.line, error.key) == (str(path), 2, "mode")


def test_all_errors_of_all_files_are_reported(policy_dir: Path, write_policy: WritePolicy):
    write_policy("10-a.toml", GOOD_RULE + 'mode = "x"\nflags = ["y"]\n')
    write_policy("20-b.toml", "[[rule]\n")
    errors = load_errors(policy_dir)
    assert [(os.path.basename(e.path), e.key) for e in errors] == [
        ("10-a.toml", "mode"),
        ("10-a.toml", "flags"),
        ("20-b.toml", None),
    ]


def test_missing_directory(tmp_path: Path) -> None:
    error = only_error(tmp_path / "nope")
    assert error.message.startswith("policy directory does not exist")
    assert "--policy DIR" in error.message  # says what to do about it


def test_empty_directory_is_a_valid_deny_all_policy(policy_dir: Path) -> None:
    policy = load_policy(str(policy_dir))
    assert policy.rules == ()


def test_only_visible_toml_files_are_read(policy_dir: Path, write_policy: WritePolicy) -> None:
    write_policy("10-a.toml", GOOD_RULE)
    write_policy(".10-a.toml.swp.toml", "garbage [[")
    write_policy("README", "garbage [[")
    write_policy("10-a.toml~", "garbage [[")
    policy = load_policy(str(policy_dir))
    assert [os.path.basename(f) for f in policy.files] == ["10-a.toml"]


def test_ownership_check_refuses_writable_files(policy_dir: Path, write_policy: WritePolicy):
    path = write_policy("10-a.toml", GOOD_RULE)
    os.chmod(policy_dir, 0o755)
    os.chmod(path, 0o644)
    assert load_policy(str(policy_dir), check_ownership=True).rules
    os.chmod(path, 0o664)
    error = only_error_with_ownership(policy_dir)
    assert error.path == str(path)
    assert "writable by group or others (mode 0664)" in error.message
    # Without the check (a user testing a private policy) it loads.
    assert load_policy(str(policy_dir)).rules


def only_error_with_ownership(directory: Path) -> PolicyError:
    with pytest.raises(PolicyLoadError) as caught:
        load_policy(str(directory), check_ownership=True)
    (error,) = caught.value.errors
    return error


def test_shipped_example_policies_load() -> None:
    policy = load_policy(str(REPO_POLICY_DIR))
    assert [os.path.basename(f) for f in policy.files] == [
        "00-defaults.toml",
        "10-readonly-images.toml",
        "20-pinned.toml",
    ]
    names = [rule.name for rule in policy.rules]
    assert names == [
        "protect-system-mountpoints",
        "no-untrusted-images",
        "readonly-images",
        "pinned-build-image",
    ]
    by_name = {rule.name: rule for rule in policy.rules}
    assert by_name["readonly-images"].groups == ("disk-images",)
    assert by_name["readonly-images"].flags == ("noexec",)
    assert by_name["pinned-build-image"].mode == "rw"
    assert by_name["pinned-build-image"].sha256
