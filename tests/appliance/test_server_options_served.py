"""Server options through the hand-off, applied by the real service on the host.

The test is the helper (tests/appliance/fdmount.py: mount(2), MOUNT with the
fds and, from protocol 3, the server options); the service runs under its
stage-2 seccomp filter. usrquota makes a user's write stop with EDQUOT at the
byte the kernel's rule gives for the limit e2fsprogs reads from the image;
noatime keeps an atime that the default (relatime) moves; writeback_cache
makes the session negotiate FUSE_WRITEBACK_CACHE (its INIT flags, logged)
and small O_APPEND writes give the kernel's ext4 bytes, read-only it is not
asked for (as `ext4box serve -o ro,writeback_cache`); an unknown server
option is refused by name. e2fsck -fn after every write.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.fdmount import SERVICE_MODULE, served_by_handoff
from appliance.server_options_support import (
    APPENDS,
    OLD_ATIME,
    RECORD,
    allowed_bytes,
    negotiated_flags,
    public_scratch,
    quota_image,
    read_and_stat_atime,
    setpriv,
    small_appends,
    usage,
    write_as,
)
from ext4box.fuse.fs_options import WRITEBACK_NEEDS_NATIVE
from ext4box.handoff_protocol import ImageKind, Mode, MountRequest, PeerRefused, ReceivedMount
from ext4box.service.serve import ServeRefused, serve_fds
from support.kernel import kernel_mount, why_no_kernel_mounts
from support.serve import why_no_fuse

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) of a FUSE fd needs root"),
    pytest.mark.skipif(why_no_fuse() is not None, reason=str(why_no_fuse())),
    pytest.mark.timeout(180),
]

SERVICE = [*SERVICE_MODULE, "--handoff-fd", "3", "--allow-privileged", "--timeout", "30"]
USER = (4321, 4321)  # any non-root ids: setpriv needs no passwd entry


@pytest.fixture
def scratch() -> Iterator[Path]:
    with public_scratch() as path:
        yield path


def _fsck_clean(image: Path) -> None:
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_usrquota_over_the_handoff_stops_a_user_at_the_hard_limit(scratch: Path) -> None:
    image = quota_image(scratch / "q.img", *USER)
    used = usage(image, USER[0])[0]  # her directory
    with served_by_handoff(image, scratch / "mnt", SERVICE, mode=Mode.RW,
                           server_options=("usrquota",)) as served:  # fmt: skip
        got = write_as(setpriv(*USER), served.mountpoint / "u" / "big", 400_000)
    assert served.proc.returncode == 0
    assert got == ["EDQUOT", allowed_bytes(used)]
    told = [json.loads(line[line.index("{"):]) for line in served.proc.stderr.read().splitlines()
            if '"handoff"' in line]  # fmt: skip
    assert [entry["server_options"] for entry in told] == [["usrquota"]]
    _fsck_clean(image)
    assert usage(image, USER[0])[0] <= 120 * 1024


def test_without_usrquota_the_same_write_passes(scratch: Path) -> None:
    """The limit is enforced because of the option, not by default."""
    image = quota_image(scratch / "q.img", *USER)
    with served_by_handoff(image, scratch / "mnt", SERVICE, mode=Mode.RW) as served:
        got = write_as(setpriv(*USER), served.mountpoint / "u" / "big", 400_000)
    assert got == ["ok", 400_000]
    _fsck_clean(image)


@pytest.mark.parametrize(("options", "moves"), [((), True), (("noatime",), False),
                                                (("strictatime",), True)])  # fmt: skip
def test_atime_options_over_the_handoff(scratch: Path, options: tuple[str, ...],
                                        moves: bool) -> None:  # fmt: skip
    image = quota_image(scratch / "q.img", *USER)
    with served_by_handoff(image, scratch / "mnt", SERVICE, mode=Mode.RW,
                           server_options=options) as served:  # fmt: skip
        atime = read_and_stat_atime(served.mountpoint / "old.txt")
    assert (atime != OLD_ATIME) is moves
    _fsck_clean(image)


@pytest.mark.skipif(why_no_kernel_mounts() is not None, reason=str(why_no_kernel_mounts()))
def test_writeback_cache_over_the_handoff_is_negotiated_and_appends_match_the_kernel(
    scratch: Path,
) -> None:
    # No quota feature: this kernel's ext4 may be built without quota support.
    image = scratch / "plain.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image), "16M"], check=True)
    image.chmod(0o644)
    twin = scratch / "kernel.img"
    shutil.copyfile(image, twin)
    with served_by_handoff(image, scratch / "mnt", SERVICE, mode=Mode.RW,
                           server_options=("writeback_cache",)) as served:  # fmt: skip
        ours = small_appends([], served.mountpoint / "log")
    assert served.proc.returncode == 0, served.proc.stderr.read()
    assert "WRITEBACK_CACHE" in negotiated_flags(served.proc.stdout.read())
    with kernel_mount(twin, scratch / "kmnt", readonly=False) as root:
        theirs = small_appends([], root / "log")
    assert ours == theirs and ours[0] == APPENDS * len(RECORD)
    _fsck_clean(image)


def test_without_the_option_or_read_only_the_cache_is_not_asked_for(scratch: Path) -> None:
    """The option, not a default, asks for the cache; a read-only mount has
    nothing to cache and is served without it (warned), as `serve` does."""
    image = quota_image(scratch / "q.img", *USER)
    for mode, options in ((Mode.RW, ()), (Mode.RO, ("writeback_cache",))):
        with served_by_handoff(image, scratch / "mnt", SERVICE, mode=mode,
                               server_options=options) as served:  # fmt: skip
            assert (served.mountpoint / "old.txt").read_text() == "read me\n"
        assert served.proc.returncode == 0, served.proc.stderr.read()
        log = served.proc.stdout.read()
        assert "WRITEBACK_CACHE" not in negotiated_flags(log), mode
        # The first proves the parse: the flags were read, the cache not among them.
        assert "BIG_WRITES" in negotiated_flags(log), mode
        warned = "writeback_cache ignored" in log and "why='read-only mount'" in log
        assert warned is bool(options), log
    _fsck_clean(image)


def test_the_pyfuse3_backend_refuses_writeback_cache(scratch: Path) -> None:
    """As `ext4box serve -o backend=pyfuse3,writeback_cache` does: libfuse's
    session is not asked for the cache, so serving without it would be a lie.
    Refused before the image is parsed, both descriptors closed."""
    image = quota_image(scratch / "q.img", *USER)
    kernel_end, fuse_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = MountRequest(Mode.RW, ImageKind.REGULAR, image.stat().st_size,
                           server_options=("writeback_cache",))  # fmt: skip
    received = ReceivedMount(3, request, fuse_end.detach(), os.open(image, os.O_RDWR))
    started: list[bool] = []
    try:
        with pytest.raises(ServeRefused) as refused:
            serve_fds(received, lambda: started.append(True), backend="pyfuse3")
    finally:
        kernel_end.close()
    assert refused.value.reason == WRITEBACK_NEEDS_NATIVE
    assert refused.value.errno == errno.EINVAL and not started
    for fd in (received.fuse_fd, received.image_fd):
        with pytest.raises(OSError) as closed:
            os.fstat(fd)
        assert closed.value.errno == errno.EBADF


def test_an_unknown_server_option_is_refused_by_name(scratch: Path) -> None:
    image = quota_image(scratch / "q.img", *USER)
    with pytest.raises(PeerRefused) as refused, served_by_handoff(
        image, scratch / "mnt", SERVICE, mode=Mode.RW, server_options=("data_journal",)
    ):
        pass
    assert refused.value.reason == "unknown server option(s): data_journal"
