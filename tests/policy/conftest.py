"""Shared fixtures of the policy tests: policy directories with real files."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from ext4box.policy import Request


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy.d"
    directory.mkdir()
    return directory


@pytest.fixture
def write_policy(policy_dir: Path) -> Callable[[str, str], Path]:
    def write(name: str, text: str) -> Path:
        path = policy_dir / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write


def make_request(**fields: object) -> Request:
    values: dict[str, object] = {
        "image": "/srv/images/a.img",
        "image_size": 1 << 20,
        "uid": 1000,
        "user": "alice",
        "gids": (1000, 990),
        "groups": ("alice", "disk-images"),
        "mode": "ro",
        "mountpoint": "/mnt/images/a",
    }
    values.update(fields)
    return Request(**values)  # type: ignore[arg-type]


@pytest.fixture
def request_for() -> Callable[..., Request]:
    return make_request
