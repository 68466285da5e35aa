"""README snippets, run as written: find a ```sh block and run it the way a user would.

A snippet is found by the heading it sits under and its first line, so the
test breaks when the README changes shape instead of silently running
something else. It runs in bash with an ERR trap that reports every command
that failed (with its status), so a test can say exactly which commands are
expected to fail (a policy denial exits 1 by design) and nothing else may.
Run inside `fresh_namespace`, /tmp, /mnt, /srv (and whatever else is named)
are empty tmpfs mounts of a private mount namespace: the state of a fresh
machine, and nothing the snippet mounts is seen by other processes. `fresh`
directories are world-writable and sticky like /tmp; `private` ones are
root's alone (0755), as /run/ext4box must be for the broker.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAILED = "readme-snippet-failed"


def snippet(heading: str, first_line: str, document: Path = REPO / "README.md") -> str:
    """The ```sh block under `heading` (any level) whose first line starts with first_line."""
    text = document.read_text()
    sections = re.split(r"^#+ ", text, flags=re.MULTILINE)
    section = next((s for s in sections if s.startswith(heading + "\n")), None)
    assert section is not None, f"{document.name}: no heading {heading!r}"
    for block in re.findall(r"^```sh\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"{document.name}: no sh block under {heading!r} starting {first_line!r}")


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    failed: list[tuple[int, str]]  # (status, command) of every command that failed


def run_snippet(code: str, *, cwd: Path = REPO, fresh: tuple[str, ...] = ("/tmp", "/mnt", "/srv"),
                prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
                timeout: float = 900, private: tuple[str, ...] = ()) -> Outcome:  # fmt: skip
    """Run `code` in bash in a private mount namespace with `fresh` and `private`
    tmpfs directories (a missing one is created for the tmpfs to sit on, and
    removed afterwards)."""
    created = [path for path in (*fresh, *private) if not os.path.exists(path)]
    for path in created:
        os.makedirs(path)
    try:
        modes = {**dict.fromkeys(fresh, "1777"), **dict.fromkeys(private, "0755")}
        return _run_in_namespace(code, cwd, modes, prefix, env, timeout)
    finally:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                os.removedirs(path)


def _run_in_namespace(code: str, cwd: Path, modes: dict[str, str], prefix: tuple[str, ...],
                      env: dict[str, str] | None, timeout: float) -> Outcome:  # fmt: skip
    with _checkout_kept_visible(modes) as (before, after):
        tmpfs = "".join(f"mount -t tmpfs -o mode={mode} fresh {path}\n"
                        for path, mode in modes.items())  # fmt: skip
        return _run_unshared(code, cwd, before + tmpfs + after, prefix, env, timeout)


@contextlib.contextmanager
def _checkout_kept_visible(modes: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Shell lines to run before and after the tmpfs mounts so that a checkout
    that lives under one of them (a clone in /tmp) stays where it is: the
    snippets run its .venv, and its editable install names its app/ by path."""
    if not any(Path(path) == REPO or Path(path) in REPO.parents for path in modes):
        yield "", ""
        return
    hold = tempfile.mkdtemp(prefix="ext4box-checkout-", dir="/var/tmp")
    try:
        repo, held = _quote(str(REPO)), _quote(hold)
        yield (f"mount --bind {repo} {held}\n",
               f"mkdir -p {repo} && mount --bind {held} {repo}\n")  # fmt: skip
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(hold)


def _run_unshared(code: str, cwd: Path, setup: str, prefix: tuple[str, ...],
                  env: dict[str, str] | None, timeout: float) -> Outcome:  # fmt: skip
    script = f"trap 'echo \"{FAILED} $? $BASH_COMMAND\" >&2' ERR\n{code}"
    inner = ["bash", "-c", script] if not prefix else [*prefix, "bash", "-c", script]
    quoted = " ".join(_quote(arg) for arg in inner)
    argv = ["unshare", "-m", "--propagation", "private", "bash", "-c", f"{setup}exec {quoted}"]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)  # fmt: skip
    failed = []
    for line in proc.stderr.splitlines():
        if line.startswith(FAILED + " "):
            status, _, command = line[len(FAILED) + 1 :].partition(" ")
            failed.append((int(status), command))
    return Outcome(proc.returncode, proc.stdout, proc.stderr, failed)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\"'\"'") + "'"
