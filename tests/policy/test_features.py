"""The ext4 feature names we accept are the ones e2fsprogs prints."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ext4box.policy.features import KNOWN_FEATURES, canonical_feature

# Feature sets that mkfs.ext4 accepts together; between them they turn on
# most features an image can carry.
FEATURE_SETS = [
    "metadata_csum,64bit,huge_file,dir_nlink,extra_isize,inline_data,large_dir,ea_inode",
    "casefold,encrypt,project,quota,verity,stable_inodes,orphan_file,fast_commit",
    "^resize_inode,sparse_super2,mmp,metadata_csum_seed,flex_bg,^has_journal",
    "bigalloc,extent,^metadata_csum,uninit_bg",
    "^64bit,^extent,^flex_bg,^metadata_csum,meta_bg,^resize_inode",
]


def features_reported(image: Path) -> list[str]:
    out = subprocess.run(
        ["dumpe2fs", "-h", str(image)], check=True, capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        if line.startswith("Filesystem features:"):
            return line.split(":", 1)[1].split()
    raise AssertionError("dumpe2fs printed no feature line")


@pytest.mark.parametrize("features", FEATURE_SETS)
def test_every_feature_dumpe2fs_prints_is_known(tmp_path: Path, features: str) -> None:
    image = tmp_path / "f.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", features, str(image), "8M"],
        check=True,
        capture_output=True,
    )
    reported = features_reported(image)
    assert reported
    for name in reported:
        assert name in KNOWN_FEATURES, name
        assert canonical_feature(name) == name


@pytest.mark.kernel
def test_needs_recovery_of_a_mounted_image_is_known(tmp_path: Path) -> None:
    # needs_recovery only appears while the kernel has the journal in use.
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop mount")
    image = tmp_path / "mounted.img"
    target = tmp_path / "mnt"
    target.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image), "8M"], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(target)], check=True)
    try:
        reported = features_reported(image)
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert "needs_recovery" in reported
    assert all(name in KNOWN_FEATURES for name in reported)


def test_aliases_map_to_printed_names() -> None:
    assert canonical_feature("extents") == "extent"
    assert canonical_feature("exclude_bitmap") == "snapshot_bitmap"
    assert canonical_feature("fname_encoding") == "casefold"
    assert canonical_feature("rot13") is None


def test_every_known_name_is_an_e2fsprogs_name(tmp_path: Path) -> None:
    # debugfs's "feature NAME" sets a feature by e2fsprogs' own name table
    # and prints the resulting feature list: a name it does not know changes
    # nothing. Start from an image with few features so most can be set.
    base = tmp_path / "base.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum,^has_journal", str(base), "8M"],
        check=True,
        capture_output=True,
    )
    before = set(features_reported(base))
    scratch = tmp_path / "scratch.img"
    unknown_to_e2fsprogs = []
    for name in sorted(KNOWN_FEATURES - before):
        scratch.write_bytes(base.read_bytes())
        printed = subprocess.run(
            ["debugfs", "-w", "-R", f"feature {name}", str(scratch)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (line,) = [x for x in printed.splitlines() if x.startswith("Filesystem features:")]
        if name not in line.split(":", 1)[1].split():
            unknown_to_e2fsprogs.append(name)
    assert unknown_to_e2fsprogs == []
