"""htree name hashes against debugfs's dx_hash (e2fsprogs' own implementation)."""

from __future__ import annotations

import random
import re
import uuid
from pathlib import Path

import pytest
from dirs_support import debugfs_script, mkfs, need_tools

from ext4box.ext4.format.dir_hash import DX_HASH_SIPHASH, dx_hash, hash_seed_words
from ext4box.ext4.format.errors import Corrupt, Unsupported

# Bytes debugfs's request parser passes through unchanged (no blanks, quotes, '#').
_SAFE = bytes(range(0x21, 0x7F)).translate(None, b"\"'#\\") + bytes(range(0x80, 0x100))
_RESULT = re.compile(rb"Hash of (.*) is 0x([0-9a-f]+) \(minor 0x([0-9a-f]+)\)")


def _names(count: int, rng: random.Random) -> list[bytes]:
    lengths = [1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 254, 255]
    names = [b"hello", b"x", b".", b"..", b"\xff" * 7, b"caf\xc3\xa9"]
    for i in range(count):
        length = lengths[i] if i < len(lengths) else rng.randint(1, 255)
        name = bytes(rng.choice(_SAFE) for _ in range(length))
        # A leading '-' would be read as an option by dx_hash's getopt.
        names.append(name.replace(b"-", b"_", 1) if name.startswith(b"-") else name)
    return names


@pytest.fixture(scope="module")
def scratch_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_tools()
    return mkfs(tmp_path_factory.mktemp("hash") / "scratch.img", 4)


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("seed_text", ["random", "zero"])
def test_dx_hash_matches_debugfs(
    scratch_image: Path, tmp_path: Path, version: int, seed_text: str
) -> None:
    rng = random.Random(version * 7 + len(seed_text))
    seed_uuid = (
        str(uuid.UUID(bytes=rng.randbytes(16)))
        if seed_text == "random"
        else "00000000-0000-0000-0000-000000000000"
    )
    names = _names(120, rng)
    requests = [f"dx_hash -h {version} -s {seed_uuid} ".encode() + name for name in names]
    out = debugfs_script(scratch_image, requests, tmp_path / "script")
    results = _RESULT.findall(out)
    assert len(results) == len(names)
    seed = hash_seed_words(uuid.UUID(seed_uuid).bytes)
    for name, (echoed, major, minor) in zip(names, results, strict=True):
        assert echoed == name
        assert dx_hash(name, version, seed) == (int(major, 16), int(minor, 16)), name


def test_zero_seed_means_default_seed() -> None:
    for version in range(6):
        assert dx_hash(b"some-name", version, (0, 0, 0, 0)) == dx_hash(b"some-name", version, None)


def test_unsigned_flag_maps_to_unsigned_versions() -> None:
    seed = (1, 2, 3, 4)
    name = b"\xe9t\xe9-\xfc"
    for signed in range(3):
        assert dx_hash(name, signed, seed, unsigned=True) == dx_hash(name, signed + 3, seed)
        assert dx_hash(name, signed, seed) != dx_hash(name, signed + 3, seed)
        # Pure ASCII hashes the same either way.
        assert dx_hash(b"ascii", signed, seed) == dx_hash(b"ascii", signed + 3, seed)


def test_siphash_and_unknown_versions_are_refused() -> None:
    with pytest.raises(Unsupported):
        dx_hash(b"name", DX_HASH_SIPHASH, None)
    with pytest.raises(Corrupt):
        dx_hash(b"name", 9, None)
