"""POSIX ACL conversion against the kernel.

The stored (ext4 disk format) value comes from e2fsprogs (`debugfs ea_get -r`,
raw, untranslated); the user-space form is what the kernel's getxattr returns
on a loop mount. Validity of values to store is compared with what the
kernel's setxattr accepts.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ext4box.ext4.format.acl import InvalidAcl, acl_disk_to_xattr, acl_xattr_to_disk
from ext4box.ext4.format.errors import Corrupt, NoData
from support.kernel import kernel_mount, why_no_kernel_mounts

_missing = [tool for tool in ("mkfs.ext4", "debugfs", "setfacl") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing) or why_no_kernel_mounts() is not None,
    reason=f"missing {_missing}" if _missing else str(why_no_kernel_mounts()),
)

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"

# (path, setfacl arguments) applied in order; -d sets the default ACL of a directory.
ACL_TREE = [
    ("named_users", ["-m", "u:1000:rw,u:1001:r,u:65534:x"]),
    ("named_groups", ["-m", "g:100:r,g:101:w,g:4294967294:rwx"]),
    ("mixed", ["-m", "u:1000:rwx,g:100:rx,m::r,o::-"]),
    ("mask_only", ["-m", "m::rx"]),  # owner, group, mask, other: a short-only ACL on disk
    ("dir", ["-m", "u:1002:r"]),
    ("dir", ["-d", "-m", "u:1001:rwx,g:102:rx"]),
    ("dir_default_only", ["-d", "-m", "g:103:r"]),
]
DIRS = {"dir", "dir_default_only"}


def run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{argv!r} failed: {result.stderr.strip()}")
    return result.stdout


def populate(root: Path) -> None:
    for name in {path for path, _ in ACL_TREE}:
        if name in DIRS:
            (root / name).mkdir()
        else:
            (root / name).write_text(name)
    for name, args in ACL_TREE:
        run(["setfacl", *args, str(root / name)])


def make_image(path: Path, *args: str, root: Path | None = None) -> Path:
    with path.open("wb") as image:
        image.truncate(8 << 20)
    extra = ["-d", str(root)] if root is not None else []
    run(["mkfs.ext4", "-q", "-F", "-b", "1024", *args, *extra, str(path)])
    return path


def stored_value(image: Path, path: str, name: str, tmp: Path) -> bytes | None:
    """The attribute as stored on disk, through e2fsprogs (-r: no ACL translation)."""
    out = tmp / "ea_get.out"
    out.unlink(missing_ok=True)
    result = subprocess.run(["debugfs", "-R", f"ea_get -r -f {out} {path} {name}", str(image)],
                            capture_output=True, text=True, check=False)
    if "key not found" in result.stderr:
        return None
    assert "ea_get:" not in result.stderr, result.stderr
    return out.read_bytes()


def store_raw(image: Path, path: str, name: str, value: bytes, tmp: Path) -> None:
    source = tmp / "ea_set.in"
    source.write_bytes(value)
    run(["debugfs", "-w", "-R", f"ea_set -r -f {source} {path} {name}", str(image)])


@pytest.fixture(scope="module")
def acl_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same ACLs copied by mkfs.ext4 -d, and set through the kernel (256 and 128-byte
    inodes, so values sit in the inode and in the xattr block)."""
    base = tmp_path_factory.mktemp("acl")
    tree = base / "tree"
    tree.mkdir()
    populate(tree)
    images = {"mkfs": make_image(base / "mkfs.img", root=tree)}
    for variant, args in {"kernel256": ["-I", "256"], "kernel128": ["-I", "128"]}.items():
        image = make_image(base / f"{variant}.img", *args)
        with kernel_mount(image, base / f"mnt-{variant}", readonly=False) as mnt:
            populate(mnt)
        images[variant] = image
    return images


def acl_cases() -> list[tuple[str, str]]:
    cases = []
    for name in sorted({path for path, _ in ACL_TREE}):
        cases.append((name, ACCESS))
        if name in DIRS:
            cases.append((name, DEFAULT))
    return cases


@pytest.mark.parametrize("variant", ["mkfs", "kernel256", "kernel128"])
def test_conversions_match_kernel_getxattr(acl_images, variant, tmp_path):
    image = acl_images[variant]
    checked = 0
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        for name, attr in acl_cases():
            try:
                kernel_value = os.getxattr(mnt / name, attr)
            except OSError as exc:
                assert exc.errno == errno.ENODATA
                assert stored_value(image, f"/{name}", attr, tmp_path) is None
                continue
            disk = stored_value(image, f"/{name}", attr, tmp_path)
            assert disk is not None, (name, attr)
            assert acl_disk_to_xattr(disk, where=f"/{name}") == kernel_value, (name, attr)
            assert acl_xattr_to_disk(kernel_value) == disk, (name, attr)
            checked += 1
    assert checked >= 6  # every ACL_TREE entry but mode-equivalent ones is really stored


def xattr_acl(*entries: tuple[int, int, int], version: int = 2) -> bytes:
    return struct.pack("<I", version) + b"".join(struct.pack("<HHI", *e) for e in entries)


U = 0xFFFFFFFF  # the id of entries that carry none
VALIDITY_CASES = {
    "named": xattr_acl((1, 6, U), (2, 4, 1000), (4, 4, U), (16, 6, U), (32, 4, U)),
    "unsorted_ids": xattr_acl((1, 6, U), (2, 4, 1001), (2, 4, 1000), (4, 4, U), (16, 6, U),
                              (32, 4, U)),
    "duplicate_ids": xattr_acl((1, 6, U), (2, 4, 1000), (2, 2, 1000), (4, 4, U), (16, 6, U),
                               (32, 4, U)),
    "groups": xattr_acl((1, 7, U), (4, 5, U), (8, 1, 100), (8, 2, 101), (16, 7, U), (32, 0, U)),
    "no_mask": xattr_acl((1, 6, U), (2, 4, 1000), (4, 4, U), (32, 4, U)),
    "no_other": xattr_acl((1, 6, U), (4, 4, U), (16, 6, U)),
    "order": xattr_acl((1, 6, U), (4, 4, U), (2, 4, 1000), (16, 6, U), (32, 4, U)),
    "two_owners": xattr_acl((1, 6, U), (1, 6, U), (4, 4, U), (32, 4, U)),
    "perm_bits": xattr_acl((1, 0o17, U), (4, 4, U), (32, 4, U)),
    "unknown_tag": xattr_acl((1, 6, U), (4, 4, U), (0x40, 4, U), (32, 4, U)),
    "named_no_id": xattr_acl((1, 6, U), (2, 4, U), (4, 4, U), (16, 6, U), (32, 4, U)),
    "after_other": xattr_acl((1, 6, U), (4, 4, U), (32, 4, U), (16, 4, U)),
    "version_1": xattr_acl((1, 6, U), (4, 4, U), (32, 4, U), version=1),
    "ragged": xattr_acl((1, 6, U), (4, 4, U), (32, 4, U)) + b"\0\0",
    "short": b"\x02\0",
}


def test_validity_matches_kernel_setxattr(tmp_path):
    """Whatever the kernel refuses to store we refuse, with the same errno; whatever it
    stores we convert to exactly the bytes it wrote."""
    image = make_image(tmp_path / "set.img", "-I", "256")
    outcome: dict[str, int] = {}
    with kernel_mount(image, tmp_path / "mnt", readonly=False) as mnt:
        for case, value in VALIDITY_CASES.items():
            (mnt / case).write_text(case)
            try:
                os.setxattr(mnt / case, ACCESS, value)
                outcome[case] = 0
            except OSError as exc:
                outcome[case] = exc.errno
    assert outcome["named"] == 0 and outcome["ragged"] == errno.EINVAL
    for case, value in VALIDITY_CASES.items():
        if outcome[case]:
            with pytest.raises(InvalidAcl) as info:
                acl_xattr_to_disk(value)
            assert info.value.errno == outcome[case], case
        else:
            assert acl_xattr_to_disk(value) == stored_value(image, f"/{case}", ACCESS, tmp_path)


def test_empty_acl_is_a_removal_not_a_value(tmp_path):
    """The kernel takes a header without entries as "remove the ACL"; we refuse to encode
    it (the caller removes the attribute instead)."""
    image = make_image(tmp_path / "empty.img", "-I", "256")
    with kernel_mount(image, tmp_path / "mnt", readonly=False) as mnt:
        (mnt / "f").write_text("f")
        run(["setfacl", "-m", "u:1000:r", str(mnt / "f")])
        os.setxattr(mnt / "f", ACCESS, xattr_acl())
        assert ACCESS not in os.listxattr(mnt / "f")
    with pytest.raises(InvalidAcl):
        acl_xattr_to_disk(xattr_acl())


def corruptions(disk: bytes) -> dict[str, bytes]:
    """Damaged copies of a real stored ACL (owner, user 1000, group, group 100, mask, other)."""
    return {
        "truncated": disk[:-2],
        "extra_bytes": disk + b"\0\0",
        "version": b"\x02" + disk[1:],
        "unknown_tag": disk[:4] + b"\x40\x00" + disk[6:],
        "header_cut": disk[:3],
        "long_cut": disk[:8] + disk[8:10],  # owner, then a named user with no room for its id
    }


def test_corrupt_stored_acls(acl_images, tmp_path):
    """Each damaged value is refused by us (Corrupt) and by the kernel (getxattr fails)."""
    source = acl_images["kernel256"]
    disk = stored_value(source, "/named_users", ACCESS, tmp_path)
    assert disk is not None
    image = tmp_path / "corrupt.img"
    shutil.copyfile(source, image)
    cases = corruptions(disk)
    for case in cases:
        with pytest.raises(Corrupt) as info:
            acl_disk_to_xattr(cases[case], where="inode 12")
        assert info.value.where == "inode 12"
    # Put the damaged values on disk (debugfs also fixes the checksums) and ask the kernel.
    targets = sorted({path for path, _ in ACL_TREE} - DIRS)
    placed = dict(zip(targets, cases, strict=False))
    for target, case in placed.items():
        store_raw(image, f"/{target}", ACCESS, cases[case], tmp_path)
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        for target, case in placed.items():
            with pytest.raises(OSError) as kernel_error:
                os.getxattr(mnt / target, ACCESS)
            assert kernel_error.value.errno != errno.ENODATA, case


def test_header_only_stored_acl_reads_as_no_acl(acl_images, tmp_path):
    image = tmp_path / "header.img"
    shutil.copyfile(acl_images["kernel256"], image)
    store_raw(image, "/named_users", ACCESS, struct.pack("<I", 1), tmp_path)
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        with pytest.raises(OSError) as kernel_error:
            os.getxattr(mnt / "named_users", ACCESS)
        assert kernel_error.value.errno == errno.ENODATA
    with pytest.raises(NoData):
        acl_disk_to_xattr(struct.pack("<I", 1), where="inode 12")


_TAGS = st.sampled_from([0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40])
_ENTRIES = st.lists(st.tuples(_TAGS, st.integers(0, 0o17), st.sampled_from([0, 1000, U])),
                    max_size=8)


@settings(max_examples=400, deadline=None)
@given(entries=_ENTRIES)
def test_accepted_acls_convert_back_unchanged(entries):
    """Anything we agree to store reads back as the same value, the ids of the entries
    that carry none becoming 0xFFFFFFFF (the kernel never looks at them)."""
    value = xattr_acl(*entries)
    try:
        disk = acl_xattr_to_disk(value)
    except InvalidAcl:
        return
    expected = xattr_acl(*((tag, perm, id_ if tag in (0x02, 0x08) else U)
                           for tag, perm, id_ in entries))
    assert acl_disk_to_xattr(disk, where="inode 12") == expected


@settings(max_examples=400, deadline=None)
@given(value=st.binary(max_size=64))
def test_stored_garbage_fails_only_as_corrupt_or_no_acl(value):
    try:
        converted = acl_disk_to_xattr(struct.pack("<I", 1) + value, where="inode 12")
    except (Corrupt, NoData):
        return
    assert (len(converted) - 4) % 8 == 0
