"""The generated man page renders cleanly and the bash completion completes (real groff, bash)."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ext4box import clidoc
from ext4box.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def test_man_page_renders_without_warnings_and_covers_every_option(tmp_path):
    if not shutil.which("groff"):
        pytest.skip("groff is not installed")
    page = tmp_path / "ext4box.1"
    page.write_text(clidoc.manpage())
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(page)], capture_output=True,
                          text=True, env={"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    # groff draws hyphens as U+2010 and may hyphenate words at line ends: compare loosely.
    plain = re.sub(".\b", "", proc.stdout)  # grotty's overstrike bold and underline
    text = " ".join(plain.replace("\u2010", "-").replace("\u2212", "-").split())
    for path, sub, _summary in clidoc.commands(build_parser()):
        assert " ".join(path) in text
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # every command has -h; the page does not list it each time
            for option in action.option_strings:
                assert option in text, (path, option)
    assert "service" not in text.split("COMMANDS", 1)[1].split("FILES")[0]


def _complete(script: Path, *words: str) -> list[str]:
    driver = (
        f"source {script}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); _ext4box\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(["bash", "-c", driver, "bash", "ext4box", *words],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completion_completes_commands_options_and_values(tmp_path):
    script = tmp_path / "ext4box.bash"
    generated = subprocess.run([sys.executable, "-m", "ext4box.clidoc", "bash"],
                               capture_output=True, text=True, check=True)  # fmt: skip
    script.write_text(generated.stdout)
    assert _complete(script, "mo") == ["mount"]
    assert "service" not in _complete(script, "")
    assert _complete(script, "policy", "c") == ["check"]  # a subcommand, not files
    assert _complete(script, "policy", "check", "--mode", "") == ["ro", "rw"]
    assert _complete(script, "--log-level", "debug", "mount", "--r") == ["--ro", "--rw"]
    assert _complete(script, "--log-format", "") == ["auto", "json", "human"]
    assert "Makefile" in _complete(script, "inspect", "Makef")  # arguments: files
