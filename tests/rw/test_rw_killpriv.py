"""Privilege clearing the kernel leaves to the server, kernel vs ext4box.

With FUSE_HANDLE_KILLPRIV_V2 (the native backend) the kernel tells the server
when to clear set-user-ID/set-group-ID (OPEN with O_TRUNC, WRITE, SETATTR)
and leaves file capabilities to it; with FUSE_SETXATTR_EXT it says when
setting an access ACL must clear set-group-ID. Each case is compared with
the kernel's ext4 on a copy of the same image (test_rw_posix.py has chown,
plain writes and truncate).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from rw_support import (
    acl_xattr,
    assert_same_on_both,
    attempt,
    child_outcome,
    make_image,
    open_path_for_others,
    run_as,
    skip_unless_possible,
)

from support.serve import fuse_backend

pytestmark = [pytest.mark.kernel, pytest.mark.fuse]

CAPABILITY = "security.capability"
# vfs_cap_data revision 2, effective: CAP_NET_BIND_SERVICE (bit 10) permitted.
FILE_CAPS = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)
ACCESS = "system.posix_acl_access"
UNDEF = 0xFFFFFFFF


def _mode(path: Path) -> str:
    return oct(os.lstat(path).st_mode)


def _scenario(root: Path) -> list[object]:
    obs: list[object] = []
    pub = root / "pub"
    pub.mkdir()
    os.chmod(pub, 0o777)
    # O_TRUNC by a non-root owner clears suid and (group-exec) sgid.
    target = pub / "trunc"
    target.write_bytes(b"payload")
    os.chown(target, 1000, 1000)
    os.chmod(target, 0o6775)
    child = run_as(1000, 1000, f"import os; os.close(os.open({str(target)!r}, "
                               "os.O_WRONLY | os.O_TRUNC))")
    obs.append(("trunc", child_outcome(child), _mode(target), target.stat().st_size))
    # O_TRUNC by root keeps them.
    os.chmod(target, 0o6775)
    os.close(os.open(target, os.O_WRONLY | os.O_TRUNC))
    obs.append(("trunc-root", _mode(target)))
    # A write drops file capabilities, whoever writes (root here).
    capped = pub / "capped"
    capped.write_bytes(b"#!/bin/true\n")
    os.setxattr(capped, CAPABILITY, FILE_CAPS)
    obs.append(("caps-set", attempt(os.getxattr, capped, CAPABILITY)))
    with open(capped, "ab") as f:
        f.write(b"# more\n")
    obs.append(("caps-after-write", attempt(os.getxattr, capped, CAPABILITY), _mode(capped)))
    # Setting an access ACL as the owner outside the file's group clears sgid.
    shared = pub / "shared"
    shared.write_bytes(b"")
    os.chown(shared, 1000, 2000)
    os.chmod(shared, 0o2775)
    acl = acl_xattr([(0x01, 7, UNDEF), (0x02, 5, 1001), (0x04, 7, UNDEF), (0x10, 7, UNDEF),
                     (0x20, 5, UNDEF)])
    child = run_as(1000, 1000, f"import os; os.setxattr({str(shared)!r}, {ACCESS!r}, {acl!r})")
    obs.append(("acl-by-owner", child_outcome(child), _mode(shared)))
    # ... but not when the owner is in the file's group.
    os.chmod(shared, 0o2775)
    child = run_as(1000, 2000, f"import os; os.setxattr({str(shared)!r}, {ACCESS!r}, {acl!r})")
    obs.append(("acl-by-group-member", child_outcome(child), _mode(shared)))
    return obs


@pytest.mark.xfail(fuse_backend() == "pyfuse3", strict=True,
                   reason="libfuse does not negotiate FUSE_SETXATTR_EXT: the kernel's "
                          "ACL_KILL_SGID never reaches the server")
def test_privileges_cleared_as_on_the_kernel(tmp_path: Path) -> None:
    skip_unless_possible()
    image = make_image(tmp_path / "base.img", 16)
    open_path_for_others(tmp_path)
    observed = assert_same_on_both(tmp_path, image, _scenario)
    by_step = {entry[0]: entry for entry in observed}
    # The cases really happened on the kernel too (not equal by doing nothing).
    assert by_step["caps-set"][1] == FILE_CAPS
    assert by_step["caps-after-write"][1] == "ENODATA"
    assert by_step["trunc"][2] == oct(0o100775)
