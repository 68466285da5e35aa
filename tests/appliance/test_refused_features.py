"""Issue 14, finding 4: refuse_features and sha256 pins judge bytes that may change.

- The server refuses a superblock with a refused feature itself (MOUNT carries
  them from hand-off protocol 2): the issue's reproduction, with the bit set
  after the helper's decision, and the real service as the server's uid.
- A rule that judges the image's bytes admits only an image no one but root
  can change: not owned by another user, not open for writing elsewhere, not
  on a FUSE filesystem. Real users, real mounts.
- The protocol stays compatible with version-1 peers.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from appliance.fdmount import SERVICE_MODULE, served_by_handoff
from appliance.helper_support import USER_PYTHON, as_user, user_env
from appliance.security_support import (
    ALICE,
    SERVER,
    ext4box_root,
    local_user,
    make_image,
    scratch_root,
    write_policy,
)
from support.serve import why_no_fuse

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts and creates users: root only"),
    pytest.mark.timeout(300),
]


def _policy(root: Path, images: str, *, pin: str = 'refuse_features = ["casefold"]') -> Path:
    (root / "mnt").mkdir(exist_ok=True)
    return write_policy(
        root / "policy",
        f"""
        [[rule]]
        name = "judged"
        images = ["{images}"]
        users = ["root"]
        mountpoints = ["{root}/mnt"]
        {pin}
        """,
    )


def _handoff_dir(root: Path) -> Path:
    handoff = root / "h"
    handoff.mkdir(mode=0o711)
    handoff.chmod(0o711)
    return handoff / "h.sock"


def _refused_before_listening(image: Path, root: Path, policy: Path) -> str:
    """Run the helper; it must give up before it listens (no server is needed)."""
    sock = _handoff_dir(root)
    helper = ext4box_root("mount", str(image), str(root / "mnt"), "--policy", str(policy),
                          "--handoff-listen", str(sock), "--server-uid", "0",
                          "--timeout", "10")  # fmt: skip
    try:
        while helper.poll() is None:
            assert not sock.exists(), "the helper accepted the image and waits for a server"
            time.sleep(0.02)
    finally:
        if helper.poll() is None:
            helper.kill()
        out, err = helper.communicate(timeout=30)
    assert helper.returncode == 1 and "mounted" not in out
    line = err.strip().splitlines()[-1]
    print(f"\n{line}")
    return line


# -- the server refuses what the policy refused --------------------------------


@pytest.mark.skipif(why_no_fuse() is not None, reason=str(why_no_fuse()))
def test_feature_set_after_the_decision_is_refused_by_the_server():
    """The issue's reproduction: a rule refuses casefold; the bit is set after
    the helper's check; the server must not serve it."""
    server = local_user(SERVER)
    with scratch_root() as root:
        image = make_image(root / "a.img", {"hello.txt": "hi\n"})
        policy = _policy(root, str(image))
        sock = _handoff_dir(root)
        helper = ext4box_root("mount", str(image), str(root / "mnt"), "--policy", str(policy),
                              "--handoff-listen", str(sock), "--server-uid",
                              str(server.pw_uid), "--timeout", "60")  # fmt: skip
        service = None
        try:
            while not sock.exists():  # decided, superblock checked: waiting for a server
                assert helper.poll() is None, helper.communicate()
                time.sleep(0.02)
            tune = subprocess.run(["tune2fs", "-O", "casefold", str(image)],
                                  capture_output=True, text=True)  # fmt: skip
            assert tune.returncode == 0, tune.stderr
            service = subprocess.Popen(
                [*as_user(server), USER_PYTHON, "-m", "ext4box", "service", "--handoff-socket",
                 str(sock), "--allow-privileged", "--timeout", "30"],
                env=user_env(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                cwd="/",
            )  # fmt: skip
            out, err = helper.communicate(timeout=120)
            if helper.returncode == 0:  # it was served: unmount so the server ends
                subprocess.run(["umount", str(root / "mnt")], capture_output=True, check=False)
            _, service_err = service.communicate(timeout=60)
        finally:
            for proc in (helper, service):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
        print(f"\n{err.strip().splitlines()[-1]}")
        assert helper.returncode == 1 and "mounted" not in out, out
        assert err.strip().splitlines()[-1] == (
            f"ext4box: error: the server at {sock} refused: the image has ext4 feature(s)"
            " casefold, which the helper's policy refuses"
        )
        assert service.returncode == 5, service_err
        assert not (root / "mnt/hello.txt").exists()


# -- only images nobody but root can change ------------------------------------


def test_an_image_another_user_owns_is_refused_for_a_judging_rule():
    alice = local_user(ALICE)
    with scratch_root() as root:
        image = make_image(root / "a.img", {"hello.txt": "hi\n"})
        os.chown(image, alice.pw_uid, alice.pw_gid)  # she could set casefold at any time
        line = _refused_before_listening(image, root, _policy(root, str(image)))
    assert line == (
        f'ext4box: error: refusing image {image}: rule "judged" judges its bytes (sha256 or'
        f" refuse_features), but it belongs to uid {alice.pw_uid}; only images no one but root"
        " can write qualify"
    )


def test_an_image_open_for_writing_elsewhere_is_refused_for_a_judging_rule():
    """alice opened it read-write while she could; root then took her rights away."""
    alice = local_user(ALICE)
    with scratch_root() as root:
        image = make_image(root / "a.img", {"hello.txt": "hi\n"})
        image.chmod(0o666)
        holder = subprocess.Popen(
            [*as_user(alice), USER_PYTHON, "-c",
             "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); print('open', flush=True);"
             " sys.stdin.read()", str(image)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
            env={"PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "open\n"
            image.chmod(0o644)
            policy = _policy(root, str(image), pin=f'sha256 = ["{"0" * 64}", "{_sha256(image)}"]')
            line = _refused_before_listening(image, root, policy)
        finally:
            holder.communicate("", timeout=30)
    assert line == (
        f'ext4box: error: refusing image {image}: rule "judged" judges its bytes (sha256 or'
        " refuse_features), but another process has it open for writing"
    )


@pytest.mark.skipif(why_no_fuse() is not None, reason=str(why_no_fuse()))
def test_an_image_on_a_fuse_filesystem_is_refused_for_a_judging_rule():
    service = [*SERVICE_MODULE, "--handoff-fd", "3", "--allow-privileged", "--timeout", "30"]
    with scratch_root() as root:
        inner = make_image(root / "inner.img", {"hello.txt": "hi\n"}, size="2M")
        carrier_tree = root / "carrier"
        carrier_tree.mkdir()
        os.replace(inner, carrier_tree / "inner.img")
        carrier = root / "carrier.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(carrier_tree), str(carrier), "16M"],
                       check=True)  # fmt: skip
        with served_by_handoff(carrier, root / "outer", service) as served:
            image = served.mountpoint / "inner.img"
            assert os.stat(image).st_uid == 0 and os.stat(image).st_mode & 0o022 == 0
            line = _refused_before_listening(image, root, _policy(root, str(image)))
    assert line == (
        f'ext4box: error: refusing image {image}: rule "judged" judges its bytes (sha256 or'
        " refuse_features), but it is on a FUSE filesystem, whose server can change its bytes"
        " at any time"
    )


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the wire format: version 2, and version-1 peers ---------------------------


def _request(**kw):
    from ext4box.handoff_protocol import ImageKind, Mode, MountRequest

    return MountRequest(Mode.RO, ImageKind.REGULAR, 4 << 20, ("noexec",), **kw)


def test_mount_carries_refused_features_from_version_2():
    from ext4box import handoff_protocol as protocol

    request = _request(refused_features=("casefold", "64bit", "read-only"))
    packet = protocol.encode_mount(request, 2)
    assert protocol.decode_mount(packet, 2) == request
    # Version 1 has no room for them: the helper refuses rather than drop them.
    with pytest.raises(protocol.HandoffError, match="cannot carry the refused ext4 features"):
        protocol.encode_mount(request, 1)
    plain = _request()
    assert protocol.decode_mount(protocol.encode_mount(plain, 1), 1) == plain


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        (b"", "too short for its refused-features section"),
        (b"\x00\x08\x00\x01casefold", "nonzero padding"),
        (b"\x02\x01\x00\x00", "refused features length 513 over 512"),
        (b"\x00\x08\x00\x00casefol", "header says"),
        (b"\x00\x08\x00\x00casefoldX", "header says"),
        (b"\x00\x08\x00\x00Casefold", "malformed ext4 feature name 'Casefold'"),
        (b"\x00\x01\x00\x00,", "malformed ext4 feature name ''"),
    ],
)
def test_malformed_refused_features_are_refused(tail: bytes, why: str):
    from ext4box import handoff_protocol as protocol

    head = protocol.encode_mount(_request(), 1)
    with pytest.raises(protocol.HandoffError, match=why):
        protocol.decode_mount(head + tail, 2)


def test_a_version_1_server_is_not_handed_a_refusal_it_cannot_enforce(fuse_fd, image_ro_fd):
    from ext4box import handoff_protocol as protocol
    from ext4box.helper import handoff

    helper_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    told: list[protocol.PeerRefused] = []

    def old_server() -> None:
        protocol.recv_packet(server_end)
        protocol.send_packet(server_end, protocol.encode_hello_reply(1))
        packet, fds = protocol.recv_packet(server_end, max_fds=2)
        told.append(protocol.decode_error(packet))
        assert fds == []

    thread = threading.Thread(target=old_server)
    thread.start()
    with helper_end, server_end:
        request = _request(refused_features=("casefold",))
        request = type(request)(request.mode, request.image_kind, os.fstat(image_ro_fd).st_size,
                                request.options, request.refused_features)  # fmt: skip
        with pytest.raises(protocol.HandoffError) as failed:
            handoff.hand_off(helper_end, fuse_fd, image_ro_fd, request, timeout=10)
        thread.join(10)
    assert failed.value.errno == errno.EPROTONOSUPPORT
    assert told and "cannot carry the refused ext4 features (casefold)" in told[0].reason


def test_a_loop_device_of_a_users_file_is_refused_for_a_judging_rule():
    alice = local_user(ALICE)
    with scratch_root() as root:
        backing = make_image(root / "a.img", {"hello.txt": "hi\n"})
        os.chown(backing, alice.pw_uid, alice.pw_gid)  # she writes the bytes under the device
        setup = subprocess.run(["losetup", "--find", "--show", "--read-only", str(backing)],
                               capture_output=True, text=True)  # fmt: skip
        if setup.returncode != 0:
            pytest.skip(f"no loop device: {setup.stderr.strip()}")
        device = setup.stdout.strip()
        try:
            policy = _policy(
                root, device, pin='refuse_features = ["casefold"]\nblock_devices = true'
            )
            line = _refused_before_listening(Path(device), root, policy)
        finally:
            subprocess.run(["losetup", "--detach", device], check=False)
    assert line == (
        f'ext4box: error: refusing image {device}: rule "judged" judges its bytes (sha256 or'
        f" refuse_features), but it is a loop device of {backing}, and it belongs to uid"
        f" {alice.pw_uid}; only images no one but root can write qualify"
    )


# -- the check is on the superblock the server parses --------------------------


def test_serve_fds_refuses_a_refused_feature_of_the_superblock_it_parsed(tmp_path: Path):
    """serve_fds itself, not only the service around it, refuses the image; the
    session never starts (no READY) and both descriptors are closed."""
    from ext4box.handoff_protocol import ImageKind, Mode, MountRequest, ReceivedMount
    from ext4box.service.serve import ServeRefused, serve_fds

    image = tmp_path / "casefold.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "casefold", str(image), "8M"], check=True,
                   capture_output=True)  # fmt: skip
    kernel_end, fuse_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    image_fd = os.open(image, os.O_RDONLY)
    request = MountRequest(Mode.RO, ImageKind.REGULAR, image.stat().st_size,
                           refused_features=("metadata_csum", "casefold"))  # fmt: skip
    received = ReceivedMount(2, request, fuse_end.detach(), image_fd)
    kernel_end.shutdown(socket.SHUT_WR)  # a session that did start would end at once
    started = []
    try:
        with pytest.raises(ServeRefused) as refused:
            serve_fds(received, lambda: started.append(True))
    finally:
        kernel_end.close()
    assert refused.value.reason == (
        "the image has ext4 feature(s) metadata_csum, casefold, which the helper's policy"
        " refuses"
    )
    assert refused.value.errno == errno.EPERM and not started
    for fd in (received.fuse_fd, received.image_fd):
        with pytest.raises(OSError) as closed:
            os.fstat(fd)
        assert closed.value.errno == errno.EBADF
