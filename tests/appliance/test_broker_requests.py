"""The broker against hostile local users, with real users and a real broker process.

No container starts here: every request below is refused before the broker
would start one (the end-to-end mount with podman is test_broker_e2e.py).
bob is the attacker: he asks for images he cannot read, through paths he
cannot search, through links, for a FIFO, onto directories that are not his,
with his own policy and a hostile environment; strangers send garbage. Each
refusal is the exact one line the user sees, and the broker keeps serving.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from appliance.broker_support import (
    ALICE,
    BOB,
    ask,
    ask_as,
    broker_log,
    error_line,
    frame,
    make_image,
    make_scene,
    mounted_at,
    read_reply,
    real_user,
    remove_scene,
    running_broker,
)
from appliance.helper_support import USER_PYTHON, as_user, fuse_access, run_as, user_env
from ext4box.helper.broker_client import ADVISORY_WARNING
from ext4box.helper.broker_protocol import MAX_MESSAGE_BYTES
from ext4box.helper.state import MountRecord

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="creates users and runs a root broker"),
]


@pytest.fixture(scope="module")
def scene():
    alice, bob = real_user(ALICE), real_user(BOB)
    scene = make_scene(alice, bob)
    try:
        yield scene
    finally:
        remove_scene(scene)


@pytest.fixture(scope="module")
def broker(scene):
    with running_broker(scene) as process:
        yield process
        assert process.poll() is None, broker_log(scene)


def still_serving(scene, broker) -> None:
    assert broker.poll() is None, broker_log(scene)
    reply = ask(scene, frame({"version": 1, "op": "list"}))
    assert reply == {"version": 1, "ok": True, "mounts": []}


# -- bob asks for what he cannot open -------------------------------------------------


def test_root_only_image_is_not_opened_for_bob(scene, broker):
    secret = make_image(scene.root / "secret.img", {"key": "root's\n"}, None, 0o600)
    proc = scene.ext4box(scene.bob, "mount", str(secret), str(scene.home(scene.bob) / "mnt"))
    assert error_line(proc) == f"cannot open image {secret} read-only: Permission denied"
    assert not mounted_at(scene.home(scene.bob) / "mnt")


def test_path_through_a_directory_bob_cannot_search(scene, broker):
    vault = scene.root / "vault"
    vault.mkdir(mode=0o700, exist_ok=True)
    image = make_image(vault / "public.img", {"a": "a\n"}, None, 0o644)
    proc = scene.ext4box(scene.bob, "mount", str(image), str(scene.home(scene.bob) / "mnt"))
    # The kernel refuses bob the search (lstat fails): to him the image is not there.
    assert error_line(proc) == f"image {image} does not exist"
    assert not mounted_at(scene.home(scene.bob) / "mnt")


def test_another_users_image_is_not_opened_for_bob(scene, broker):
    home = scene.home(scene.alice)
    image = make_image(home / "diary.img", {"diary": "dear diary\n"}, scene.alice, 0o600)
    proc = scene.ext4box(scene.bob, "mount", str(image), str(scene.home(scene.bob) / "mnt"))
    assert error_line(proc) == f"cannot open image {image} read-only: Permission denied"


def test_symlink_in_the_image_path_is_refused(scene, broker):
    home = scene.home(scene.bob)
    target = make_image(home / "own.img", {"x": "x\n"}, scene.bob, 0o600)
    link = home / "link.img"
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    os.lchown(link, scene.bob.pw_uid, scene.bob.pw_gid)
    proc = scene.ext4box(scene.bob, "mount", str(link), str(home / "mnt"))
    assert error_line(proc) == (
        f"refusing image path {link}: it goes through a symbolic link (resolves to {target});"
        " name the image by its real path"
    )


def test_fifo_as_the_image_is_refused_without_hanging(scene, broker):
    home = scene.home(scene.bob)
    fifo = home / "pipe.img"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo, 0o666)
    os.chown(fifo, scene.bob.pw_uid, scene.bob.pw_gid)
    proc = scene.ext4box(scene.bob, "mount", str(fifo), str(home / "mnt"))
    assert error_line(proc) == (
        f"refusing image {fifo}: it is a FIFO, not a regular file or block device"
    )


def test_mountpoint_that_is_not_bobs_is_refused(scene, broker):
    home = scene.home(scene.bob)
    own = make_image(home / "own.img", {"x": "x\n"}, scene.bob, 0o600)
    alice_mnt = scene.home(scene.alice) / "mnt"
    proc = scene.ext4box(scene.bob, "mount", str(own), str(alice_mnt))
    assert error_line(proc) == (
        f"mountpoint {alice_mnt} belongs to uid {scene.alice.pw_uid}: the broker mounts only"
        " on directories you own"
    )


def test_mountpoint_swapped_for_a_link_to_etc_is_refused(scene, broker):
    """bob points his mountpoint at /etc through a link: the broker decides on the
    directory the open reached (/etc, root's), not on the name bob typed."""
    home = scene.home(scene.bob)
    own = make_image(home / "own.img", {"x": "x\n"}, scene.bob, 0o600)
    trick = home / "trick"
    trick.unlink(missing_ok=True)
    trick.symlink_to("/etc")
    os.lchown(trick, scene.bob.pw_uid, scene.bob.pw_gid)
    proc = scene.ext4box(scene.bob, "mount", str(own), str(trick))
    assert error_line(proc) == (
        "mountpoint /etc belongs to uid 0: the broker mounts only on directories you own"
    )
    assert not mounted_at(trick) and os.path.ismount("/etc") is False


# -- bob tries to widen the policy ------------------------------------------------------


def test_denied_image_stays_denied_with_bobs_own_policy_and_environment(scene, broker):
    home = scene.home(scene.bob)
    image = make_image(home / "untrusted-tool.img", {"x": "x\n"}, scene.bob, 0o600)
    own_policy = home / "pol"
    own_policy.mkdir(exist_ok=True)
    (own_policy / "00-all.toml").write_text(
        '[[rule]]\nname = "everything"\nimages = ["/**"]\nusers = ["*"]\nmode = "rw"\n'
    )
    for path in (own_policy, own_policy / "00-all.toml"):
        os.chown(path, scene.bob.pw_uid, scene.bob.pw_gid)
    marker = home / "fake-podman-ran"
    fake = home / "podman"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 0\n")
    fake.chmod(0o755)
    os.chown(fake, scene.bob.pw_uid, scene.bob.pw_gid)
    hostile = {"EXT4BOX_PODMAN": str(fake), "EXT4BOX_USERNS": "host",
               "EXT4BOX_SECCOMP_PROFILE": str(home / "unconfined.json"),
               "CONTAINERS_CONF": str(home / "containers.conf"),
               "EXT4BOX_SERVER_IMAGE": "docker.io/library/busybox"}  # fmt: skip
    mnt = str(home / "mnt")
    denied = (
        'denied by rule "no-untrusted-images" (10-users.toml:2): untrusted images are quarantined'
    )
    # The environment travels nowhere: the broker decides with its own policy.
    assert error_line(scene.ext4box(scene.bob, "mount", str(image), mnt, **hostile)) == denied
    # --policy is refused outright by the client...
    with_policy = scene.ext4box(scene.bob, "mount", str(image), mnt, "--policy", str(own_policy))
    assert error_line(with_policy) == (
        f"--policy is not available through the ext4box broker ({scene.socket}):"
        " it decides with its own policy and settings"
    )
    # ...and a hand-made request that names one is refused by the broker.
    reply = ask_as(scene, scene.bob, {"version": 1, "op": "mount", "image": str(image),
                                      "mountpoint": mnt, "mode": "ro",
                                      "policy": str(own_policy)})  # fmt: skip
    assert reply == {
        "version": 1,
        "ok": False,
        "error": "bad request: unknown field(s) 'policy' in mount: the broker takes no settings"
        " from clients",
    }
    for key in ("uid", "env", "groups"):
        spoof = ask_as(scene, scene.bob, {"version": 1, "op": "list", key: 0})
        assert spoof["ok"] is False and f"'{key}'" in str(spoof["error"])
    assert not marker.exists()
    assert not mounted_at(home / "mnt")


def test_without_a_broker_the_direct_mode_says_the_policy_is_advisory(scene):
    home = scene.home(scene.bob)
    image = make_image(home / "untrusted-x.img", {"x": "x\n"}, scene.bob, 0o600)
    missing = scene.root / "no-broker.sock"
    proc = scene.ext4box(scene.bob, "mount", str(image), str(home / "mnt"), "--policy",
                         str(scene.policy), EXT4BOX_BROKER_SOCKET=str(missing))  # fmt: skip
    warning = ADVISORY_WARNING.format(socket=missing)
    assert proc.stderr.splitlines()[0] == warning
    assert proc.stderr.count("advisory") == 1
    assert error_line(proc).startswith('denied by rule "no-untrusted-images"')


# -- strangers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\x00\x00\x00\x00", "bad request: message length 0 is outside 1..65536"),
        (struct.pack(">I", MAX_MESSAGE_BYTES + 1) + b"x" * 100,
         f"bad request: message length {MAX_MESSAGE_BYTES + 1} is outside 1..65536"),
        (b"\xff\xff\xff\xff", "bad request: message length 4294967295 is outside 1..65536"),
        (struct.pack(">I", 5) + b"\xff\xfe{}]", "bad request: message is not UTF-8 JSON"),
        (frame([1, 2, 3]), "bad request: message is not a JSON object"),
        (frame("x" * 100), "bad request: message is not a JSON object"),
        (struct.pack(">I", 30000) + b"[" * 30000, "bad request: message is not UTF-8 JSON"),
        (frame({"op": "list"}),
         "bad request: unsupported broker protocol version null (this broker speaks 1)"),
        (frame({"version": 2, "op": "list"}),
         "bad request: unsupported broker protocol version 2 (this broker speaks 1)"),
        (frame({"version": 1, "op": "format\x1b[2J"}),
         "bad request: unknown operation 'format\\x1b[2J' (known: mount, umount, list)"),
        (frame({"version": 1, "op": "mount", "image": "rel.img", "mountpoint": "/m",
                "mode": "ro"}),
         "bad request: image must be an absolute path of at most 4096 bytes"),
        (frame({"version": 1, "op": "mount", "image": "/a", "mountpoint": "/m" * 3000,
                "mode": "ro"}),
         "bad request: mountpoint must be an absolute path of at most 4096 bytes"),
        (frame({"version": 1, "op": "mount", "image": "/a\x00b", "mountpoint": "/m",
                "mode": "ro"}),
         "bad request: image must be an absolute path of at most 4096 bytes"),
        (frame({"version": 1, "op": "mount", "image": "/a", "mountpoint": "/m",
                "mode": "rwx"}),
         "bad request: mode must be \"ro\" or \"rw\", not 'rwx'"),
        (frame({"version": 1, "op": "umount", "mountpoint": 7}),
         "bad request: mountpoint must be a string"),
    ],
)  # fmt: skip
def test_garbage_gets_an_error_and_the_broker_survives(scene, broker, payload, error):
    assert ask(scene, payload) == {"version": 1, "ok": False, "error": error}
    still_serving(scene, broker)


def test_truncated_and_silent_strangers_do_not_stop_the_broker(scene, broker):
    # A length that promises more than is sent, then the writer closes.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(scene.socket))
        sock.sendall(struct.pack(">I", 100) + b'{"version"')
        sock.shutdown(socket.SHUT_WR)
        assert read_reply(sock) == {
            "version": 1,
            "ok": False,
            "error": "bad request: connection closed in the middle of the message",
        }
    # Twenty strangers that connect and say nothing (more than the broker's
    # workers): the broker answers busy or times them out, and still serves.
    silent = []
    for _ in range(20):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(scene.socket))
        silent.append(sock)
    try:
        for sock in silent:
            sock.settimeout(30)
            reply = read_reply(sock)
            assert reply is not None and reply["ok"] is False
            assert reply["error"] in (
                "bad request: timed out waiting for the length",
                "the broker is busy with other requests; try again",
            )
    finally:
        for sock in silent:
            sock.close()
    deadline = time.monotonic() + 30
    while True:  # the busy answers may still be draining; wait for a free worker
        reply = ask(scene, frame({"version": 1, "op": "list"}))
        if (reply and reply.get("ok")) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    still_serving(scene, broker)


def test_a_user_policy_directory_is_refused_at_broker_start(scene):
    home = scene.home(scene.bob)
    own_policy = home / "pol2"
    own_policy.mkdir(exist_ok=True)
    os.chown(own_policy, scene.bob.pw_uid, scene.bob.pw_gid)
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "ext4box", "broker", "--foreground", "--socket",
         str(scene.root / "sock/other.sock"), "--policy", str(own_policy)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ext4box: error: policy directory {own_policy} is not safe for the broker:"
        f" {own_policy} must be owned by root and writable by root only"
    )


# -- records: owners, listing, the per-user limit ------------------------------------------


def seed_records(scene, owner, count: int, prefix: str) -> list[Path]:
    """Mount records as the broker writes them (no live mount behind them)."""
    paths = []
    for index in range(count):
        record = MountRecord(
            name=f"{prefix}-{index}",
            image=str(scene.home(owner) / f"{prefix}-{index}.img"),
            mountpoint=str(scene.home(owner) / f"{prefix}-mnt-{index}"),
            mode="ro",
            container_id=f"{prefix}-{index}",
            since=f"2026-01-01T00:00:{index:02d}+00:00",
            pid=None,
            uid=owner.pw_uid,
            flags=("nosuid", "nodev"),
            rule="users-images",
        )
        path = scene.root / "state" / f"{record.name}.json"
        path.write_text(record.to_json())
        paths.append(path)
    return paths


def test_each_user_lists_and_unmounts_only_their_own(scene, broker):
    seeded = seed_records(scene, scene.alice, 2, "alice") + seed_records(scene, scene.bob, 1, "bob")
    try:
        alice_rows = ask_as(scene, scene.alice, {"version": 1, "op": "list"})["mounts"]
        bob_rows = ask_as(scene, scene.bob, {"version": 1, "op": "list"})["mounts"]
        root_rows = ask(scene, frame({"version": 1, "op": "list"}))["mounts"]
        assert [r["container"] for r in alice_rows] == ["alice-0", "alice-1"]
        assert [r["container"] for r in bob_rows] == ["bob-0"]
        assert sorted(r["container"] for r in root_rows) == ["alice-0", "alice-1", "bob-0"]
        assert {r["status"] for r in root_rows} == {"not mounted"}
        # The CLI shows the same, as a table.
        shown = scene.ext4box(scene.bob, "list")
        table = shown.stdout
        assert "bob-0" in table and "alice" not in table, shown.stderr
        target = alice_rows[0]["mountpoint"]
        assert error_line(scene.ext4box(scene.bob, "umount", target)) == (
            f"{target} is not your mount (it belongs to uid {scene.alice.pw_uid});"
            " only its owner or root can unmount it"
        )
        assert seeded[0].exists()
        done = scene.ext4box(scene.alice, "umount", target)
        assert done.returncode == 0, done.stderr
        assert not seeded[0].exists()
        # Root may unmount anyone's.
        other = alice_rows[1]["mountpoint"]
        by_root = ask(scene, frame({"version": 1, "op": "umount", "mountpoint": other}))
        assert by_root == {"version": 1, "ok": True, "mountpoint": other}
        assert not seeded[1].exists() and seeded[2].exists()
    finally:
        for path in seeded:
            path.unlink(missing_ok=True)


def test_a_user_cannot_start_servers_without_end(scene, broker):
    seeded = seed_records(scene, scene.bob, 16, "many")
    try:
        image = make_image(scene.home(scene.bob) / "one-more.img", {"x": "x\n"}, scene.bob)
        proc = scene.ext4box(scene.bob, "mount", str(image), str(scene.home(scene.bob) / "mnt"))
        assert error_line(proc) == (
            "you have 16 ext4box mounts, the broker's limit per user; unmount one first"
            " (see ext4box list)"
        )
    finally:
        for path in seeded:
            path.unlink(missing_ok=True)


HOLDER = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    held.append(s)
print("holding", flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_one_user_cannot_take_every_worker(scene, broker):
    """bob holds 20 silent connections; alice is still served at once, not told "busy"."""
    holder = subprocess.Popen(
        [*as_user(scene.bob), "/usr/bin/python3", "-c", HOLDER, str(scene.socket), "20", "4"],
        env=user_env(scene.bob), stdout=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        # Accepting is first come, first served: alice's connection is taken after bob's.
        reply = ask_as(scene, scene.alice, {"version": 1, "op": "list"})
        assert reply == {"version": 1, "ok": True, "mounts": []}
    finally:
        holder.wait(30)
    still_serving(scene, broker)


def test_an_image_on_bobs_own_fuse_mount_gets_one_line(scene, broker):
    """bob serves an ext4 image holding inner.img on his own FUSE mount (no
    allow_other): the broker's child opens it as bob, but root may not use the
    fd (FUSE's owner check). One line, not a dead worker."""
    home = scene.home(scene.bob)
    outer_tree = home / "outer-tree"
    outer_tree.mkdir(exist_ok=True)
    make_image(outer_tree / "inner.img", {"x": "x\n"}, None, 0o644)
    outer = home / "outer.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(outer_tree), str(outer), "16M"],
                   check=True)  # fmt: skip
    os.chown(outer, scene.bob.pw_uid, scene.bob.pw_gid)
    view = home / "view"
    view.mkdir(exist_ok=True)
    os.chown(view, scene.bob.pw_uid, scene.bob.pw_gid)
    with fuse_access(scene.bob):
        server = subprocess.Popen(
            [*as_user(scene.bob), USER_PYTHON, "-m", "ext4box", "serve", "-f", str(outer),
             str(view)],
            env=user_env(scene.bob), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, cwd="/",
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not mounted_at(view):
                assert server.poll() is None and time.monotonic() < deadline, server.stderr
                time.sleep(0.1)
            inner = view / "inner.img"
            proc = scene.ext4box(scene.bob, "mount", str(inner), str(home / "mnt"))
            assert error_line(proc) == (
                f"the broker cannot use image {inner}: Permission denied"
                " (it is on a FUSE mount only you may access)"
            )
        finally:
            run_as(scene.bob, "fusermount3", "-u", "-z", str(view))
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    still_serving(scene, broker)


def test_a_rule_that_judges_the_bytes_admits_no_image_bob_can_change(scene, broker):
    """Issue 14 finding 4 through the broker: a rule refusing casefold judges bytes
    that bob could rewrite after the decision (his own image, or one his group may
    write), so the broker refuses, as the root helper does (helper/pinned.py)."""
    home, bob = scene.home(scene.bob), scene.bob
    own = make_image(home / "pinned-own.img", {"x": "x\n"}, bob, 0o600)
    shared = make_image(scene.root / "pinned-shared.img", {"x": "x\n"}, None, 0o664)
    os.chown(shared, 0, bob.pw_gid)
    rule = scene.policy / "05-pinned.toml"
    rule.write_text(
        f'[[rule]]\nname = "pinned"\nimages = ["{scene.root}/**/pinned-*.img"]\n'
        f'users = ["{bob.pw_name}"]\nrefuse_features = ["casefold"]\n'
        f'mountpoints = ["{scene.root}/home/*/mnt"]\n'
    )
    judged = 'rule "pinned" judges its bytes (sha256 or refuse_features), but'
    try:
        proc = scene.ext4box(bob, "mount", str(own), str(home / "mnt"))
        assert error_line(proc) == (
            f"refusing image {own}: {judged} it belongs to uid {bob.pw_uid};"
            " only images no one but root can write qualify"
        )
        proc = scene.ext4box(bob, "mount", str(shared), str(home / "mnt"))
        assert error_line(proc) == (
            f"refusing image {shared}: {judged} its mode 0664 lets others write it"
        )
    finally:
        rule.unlink()
    assert not mounted_at(home / "mnt")
    still_serving(scene, broker)
