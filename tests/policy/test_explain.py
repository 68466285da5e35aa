"""`ext4box policy check` (explain_cli): output and exit codes, with real files."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ext4box.policy.explain import explain_cli

WritePolicy = Callable[[str, str], Path]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A real 4 MiB ext4 image made by mkfs.ext4."""
    path = tmp_path / "images" / "disk.img"
    path.parent.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path), "4M"], check=True)
    return path


@pytest.fixture
def me() -> pwd.struct_passwd:
    return pwd.getpwuid(os.getuid())


def allow_rule(image: Path, user: str, *, extra: str = "") -> str:
    return (
        f'[[rule]]\nname = "mine"\nimages = ["{image.parent}/*.img"]\nusers = ["{user}"]\n'
        f'mode = "ro"\nflags = ["noexec"]\nrefuse_features = ["needs_recovery"]\n{extra}'
    )


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from ext4box.policy.explain import explain_cli; "
        "a = sys.argv[1:]; "
        "sys.exit(explain_cli(a[0], user=a[1] or None, mode=a[2], "
        "mountpoint=a[3] or None, policy_dir=a[4] or None))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )


def test_allowed_exit_0(image: Path, policy_dir: Path, write_policy: WritePolicy, me) -> None:
    write_policy("10-mine.toml", allow_rule(image, me.pw_name))
    result = run_check(str(image), me.pw_name, "ro", "/mnt/x", str(policy_dir))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("decision: ALLOWED\n")
    assert f'reason:   allowed by rule "mine" (10-mine.toml:1): ro mount of {image}' in out
    assert f"  image:       {image} (regular file, 4 MiB (4194304 bytes))" in out
    assert "  mount flags: nosuid,nodev,noexec" in out
    assert "  refuses ext4 features: needs_recovery" in out
    assert "  1. allow mine (10-mine.toml:1): MATCHED: allows" in out
    assert result.stderr == ""


def test_denied_exit_1_explains_each_rule(
    image: Path, policy_dir: Path, write_policy: WritePolicy, me, capsys
) -> None:
    write_policy("10-mine.toml", allow_rule(image, me.pw_name))
    write_policy(
        "20-other.toml",
        '[[rule]]\nname = "other"\nimages = ["/srv/*.img"]\nusers = ["*"]\n',
    )
    code = explain_cli(
        str(image), user=me.pw_name, mode="rw", mountpoint=None, policy_dir=str(policy_dir)
    )
    assert code == 1
    out = capsys.readouterr().out
    assert out.startswith("decision: DENIED\n")
    assert "rw was requested but the rule allows only ro" in out
    assert "  1. allow mine (10-mine.toml:1): no match: rw was requested" in out
    assert f"  2. allow other (20-other.toml:1): no match: image {image} matches none" in out
    assert "mountpoint:  (not given: mountpoint rules not checked)" in out


def test_symlinked_image_is_resolved(
    image: Path, tmp_path: Path, policy_dir: Path, write_policy: WritePolicy, me, capsys
) -> None:
    write_policy("10-mine.toml", allow_rule(image, me.pw_name))
    link = tmp_path / "link.img"
    link.symlink_to(image)
    assert (
        explain_cli(str(link), user=None, mode="ro", mountpoint=None, policy_dir=str(policy_dir))
        == 0
    )
    assert f"{image} (regular file, 4 MiB (4194304 bytes)), given as {link}" in (
        capsys.readouterr().out
    )


def test_pinned_digest_is_shown(
    image: Path, policy_dir: Path, write_policy: WritePolicy, me, capsys
) -> None:
    digest = subprocess.run(
        ["sha256sum", str(image)], check=True, capture_output=True, text=True
    ).stdout.split()[0]
    write_policy("10-mine.toml", allow_rule(image, me.pw_name, extra=f'sha256 = ["{digest}"]\n'))
    assert (
        explain_cli(str(image), user=None, mode="ro", mountpoint=None, policy_dir=str(policy_dir))
        == 0
    )
    assert f"  sha256:      {digest}" in capsys.readouterr().out


def test_bad_policy_exit_2_one_line(
    image: Path, policy_dir: Path, write_policy: WritePolicy
) -> None:
    path = write_policy(
        "10-bad.toml", '[[rule]]\nname = "x"\nimages = ["/a"]\nusers = ["*"]\nmode = "rwx"\n'
    )
    result = run_check(str(image), "", "ro", "", str(policy_dir))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f'ext4box: policy error: {path}:5: rule #1 "x" key "mode": '
        'unknown mode \'rwx\' (expected "ro" or "rw")\n'
    )


@pytest.mark.parametrize(
    ("user", "mode", "policy", "expected"),
    [
        ("no-such-user-xyz", "ro", "ok", "ext4box: error: unknown user 'no-such-user-xyz'\n"),
        ("", "rwx", "ok", "ext4box: error: mode must be ro or rw, not 'rwx'\n"),
        ("", "ro", "missing", "or name another with --policy DIR)\n"),
    ],
)
def test_bad_arguments_exit_2(
    image: Path, policy_dir: Path, user: str, mode: str, policy: str, expected: str
) -> None:
    directory = policy_dir if policy == "ok" else policy_dir / "missing"
    result = run_check(str(image), user, mode, "", str(directory))
    assert result.returncode == 2
    assert result.stderr.endswith(expected)
    assert result.stderr.count("\n") == 1


def test_missing_image_exit_2(tmp_path: Path, policy_dir: Path) -> None:
    result = run_check(str(tmp_path / "nope.img"), "", "ro", "", str(policy_dir))
    assert result.returncode == 2
    missing = tmp_path / "nope.img"
    assert result.stderr == f"ext4box: error: image {missing}: No such file or directory\n"


def test_directory_is_not_an_image(tmp_path: Path, policy_dir: Path) -> None:
    result = run_check(str(tmp_path), "", "ro", "", str(policy_dir))
    assert result.returncode == 2
    assert "not a regular file or block device" in result.stderr


@pytest.fixture
def loop_device(image: Path) -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    attached = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image)],
        capture_output=True,
        text=True,
    )
    if attached.returncode != 0:
        pytest.skip(f"losetup failed: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.mark.kernel
def test_block_device_needs_block_devices_true(
    loop_device: str, policy_dir: Path, write_policy: WritePolicy, capsys
) -> None:
    write_policy(
        "10-dev.toml",
        '[[rule]]\nname = "loops"\nimages = ["/dev/loop*"]\nusers = ["*"]\n',
    )
    assert (
        explain_cli(loop_device, user=None, mode="ro", mountpoint=None, policy_dir=str(policy_dir))
        == 1
    )
    out = capsys.readouterr().out
    assert f"  image:       {loop_device} (block device, 4 MiB (4194304 bytes))" in out
    assert "block_devices = true" in out
    write_policy(
        "10-dev.toml",
        '[[rule]]\nname = "loops"\nimages = ["/dev/loop*"]\nusers = ["*"]\nblock_devices = true\n',
    )
    assert (
        explain_cli(loop_device, user=None, mode="ro", mountpoint=None, policy_dir=str(policy_dir))
        == 0
    )


def test_allowed_shows_the_server_options_a_caller_may_ask_for(
    image: Path, policy_dir: Path, write_policy: WritePolicy, me
) -> None:
    extra = 'server_options = ["noatime"]\nenforce_quota = ["grpquota"]\n'
    write_policy("10-mine.toml", allow_rule(image, me.pw_name, extra=extra))
    result = run_check(str(image), me.pw_name, "ro", "/mnt/x", str(policy_dir))
    assert result.returncode == 0, result.stderr
    assert "  server options a caller may ask for: noatime\n" in result.stdout
    assert "  quota enforced: grpquota\n" in result.stdout
    assert "server options grpquota" in result.stdout  # in the reason: what the server applies
