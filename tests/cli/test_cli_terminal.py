"""What a person at a terminal sees (issue 16 item 9): human lines only, help that explains.

Commands run under a real pseudo-terminal, so the program's own isatty()
decides, as it does for a user; JSON logs must appear only when asked for
(or when stderr is not a terminal).
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import pwd
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ext4box.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXT4BOX_LOG")}
    env["PYTHONPATH"] = str(REPO / "app")
    return {**env, **extra}


def run_on_tty(*args: str, prefix: tuple[str, ...] = (), **env: str) -> tuple[int, str]:
    """Run ext4box with stdout and stderr on one pty; returns (status, what the terminal got)."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            # Another user may not reach a venv's interpreter: Debian's has the same ABI.
            [*prefix, "/usr/bin/python3" if prefix else sys.executable, "-m", "ext4box", *args],
            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=_env(**env),
        )  # fmt: skip
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        status = proc.wait(timeout=60)
    finally:
        os.close(leader)
    return status, b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.fixture
def denied(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An image, a mountpoint and a policy that allows nothing for them."""
    image = tmp_path / "a.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    policy = tmp_path / "policy"
    policy.mkdir(mode=0o755)
    (policy / "10-other.toml").write_text(
        textwrap.dedent("""
        [[rule]]
        name = "elsewhere"
        images = ["/nowhere/*.img"]
        users = ["*"]
        """)
    )  # fmt: skip
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return image, mnt, policy


def test_denial_on_a_terminal_is_one_human_line(denied):
    image, mnt, policy = denied
    status, seen = run_on_tty("mount", str(image), str(mnt), "--policy", str(policy))
    assert status == 1
    assert seen.splitlines() == [
        f"ext4box: error: denied: no allow rule covers image {image} (deny by default)"
    ]


def test_log_format_json_on_a_terminal_shows_the_decision(denied):
    image, mnt, policy = denied
    args = ("mount", str(image), str(mnt), "--policy", str(policy))
    status, seen = run_on_tty("--log-format", "json", *args)
    assert status == 1
    *logs, error = seen.splitlines()
    assert error.startswith("ext4box: error: denied:")
    events = [json.loads(line)["event"] for line in logs]
    assert "mount_decision" in events
    # The environment variable does the same; and off a terminal JSON is the default.
    via_env = run_on_tty(*args, EXT4BOX_LOG_FORMAT="json")[1].splitlines()
    assert [json.loads(line)["event"] for line in via_env[:-1]] == events
    piped = subprocess.run([sys.executable, "-m", "ext4box", *args], capture_output=True,
                           text=True, env=_env(), timeout=60)  # fmt: skip
    assert [json.loads(line)["event"] for line in piped.stderr.splitlines()[:-1]] == events


def test_list_says_no_mounts_on_a_terminal(tmp_path):
    """As an ordinary user (nobody: make test-quick creates no user) with a runtime dir of
    their own; root's list shows every mount on this host, and other tests make some."""
    if os.geteuid() != 0:
        status, seen = run_on_tty("list", XDG_RUNTIME_DIR=str(tmp_path))
        assert (status, seen) == (0, "no mounts\n")
        return
    nobody = pwd.getpwnam("nobody")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, nobody.pw_uid, nobody.pw_gid)
    tmp_path.chmod(0o755)
    site = next((REPO / ".venv/lib").glob("python3*/site-packages"))
    prefix = ("setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups")
    status, seen = run_on_tty("list", prefix=prefix, XDG_RUNTIME_DIR=str(runtime),
                              PYTHONPATH=f"{REPO / 'app'}:{site}")  # fmt: skip
    assert (status, seen) == (0, "no mounts\n")


def _subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name != "service":
                    yield f"{prefix}{name}", sub
                    yield from _subcommands(sub, f"{prefix}{name} ")


def test_every_argument_has_help_and_every_command_examples():
    commands = dict(_subcommands(build_parser()))
    assert {"serve", "mount", "umount", "list", "doctor", "policy check", "inspect"} <= set(
        commands
    )
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            has_value = action.nargs != 0 and not action.required and action.option_strings
            if has_value and action.dest != "help":
                # Options that take a value say what happens without them.
                assert "default" in action.help, (name, action.dest, action.help)
        examples = (sub.epilog or "").split("examples:\n", 1)[-1].splitlines()
        assert examples and all(
            line.strip().startswith(f"ext4box {name.split()[0]}")
            for line in examples
            if line.strip()
        ), (name, sub.epilog)


def test_service_is_hidden_but_still_runs():
    top = subprocess.run([sys.executable, "-m", "ext4box", "--help"], capture_output=True,
                         text=True, env=_env(), timeout=60)  # fmt: skip
    assert top.returncode == 0 and "doctor" in top.stdout
    assert "service" not in top.stdout
    version = subprocess.run([sys.executable, "-m", "ext4box", "service", "--version"],
                             capture_output=True, text=True, env=_env(), timeout=60)  # fmt: skip
    assert version.stdout.startswith("ext4box ")
