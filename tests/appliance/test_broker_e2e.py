"""End to end through the broker: real users, a real root broker, real podman.

alice mounts her own image read-only through the broker (with a hostile
environment that the broker never sees), lists it, reads it and unmounts it;
bob neither sees nor unmounts her mount; the server runs under a non-root
host uid; the image is e2fsck-clean afterwards. One container start: slow.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from appliance.broker_support import (
    ALICE,
    BOB,
    ask_as,
    broker_log,
    error_line,
    make_image,
    make_scene,
    mounted_at,
    real_user,
    remove_scene,
    running_broker,
)
from appliance.helper_support import as_user, podman, run_as, user_env
from support.server_image import server_image as build_server_image

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="creates users, runs a root broker and podman"),
]

GREETING = "hello alice, from inside the box\n"


def listed(proc: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else []


def test_alice_mounts_lists_reads_unmounts_and_bob_cannot_touch_it():
    server_image = build_server_image()
    alice, bob = real_user(ALICE), real_user(BOB)
    scene = make_scene(alice, bob)
    home, mnt = scene.home(alice), scene.home(alice) / "mnt"
    image = make_image(home / "notes.img", {"greeting.txt": GREETING}, alice, 0o600)
    marker = home / "fake-podman-ran"
    fake = home / "podman"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 0\n")
    fake.chmod(0o755)
    # The server image is root's setting too (the tests' content-tagged build):
    # alice's EXT4BOX_SERVER_IMAGE never reaches the broker.
    hostile = {"EXT4BOX_PODMAN": str(fake), "EXT4BOX_USERNS": "host",
               "EXT4BOX_SECCOMP_PROFILE": "/dev/null", "CONTAINERS_CONF": "/dev/null",
               "EXT4BOX_SERVER_IMAGE": "localhost/ext4box-hostile:0"}  # fmt: skip
    try:
        with running_broker(scene, env={"EXT4BOX_SERVER_IMAGE": server_image}) as broker:
            proc = scene.ext4box(alice, "mount", str(image), str(mnt), **hostile)
            assert proc.returncode == 0, proc.stderr + broker_log(scene)
            assert proc.stdout.startswith(f"mounted {image} on {mnt} (ro, container ext4box-")
            assert proc.stdout.rstrip().endswith("via the broker)")
            assert "advisory" not in proc.stderr
            try:
                rows = listed(scene.ext4box(alice, "list", "--json"))
                assert [(r["image"], r["mountpoint"], r["mode"], r["uid"], r["status"])
                        for r in rows] == [(str(image), str(mnt), "ro", alice.pw_uid,
                                            "serving")]  # fmt: skip
                read = run_as(alice, "cat", str(mnt / "greeting.txt"))
                assert read.returncode == 0 and read.stdout == GREETING, read.stderr
                # Owned by alice (user_id), ro, and the policy's noexec; nosuid,nodev always.
                with open("/proc/self/mountinfo") as table:
                    line = next(row for row in table if row.split()[4] == str(mnt))
                assert {"ro", "nosuid", "nodev", "noexec"} <= set(line.split()[5].split(","))
                assert f"user_id={alice.pw_uid}" in line.split(" - ")[1]
                # The server runs under a non-root host uid, none of alice's or root's.
                with open(f"/proc/{rows[0]['pid']}/status") as status:
                    uids = next(s for s in status if s.startswith("Uid:")).split()[1:]
                assert all(int(uid) not in (0, alice.pw_uid, bob.pw_uid) for uid in uids), uids
                # bob does not see it and cannot unmount it.
                assert listed(scene.ext4box(bob, "list", "--json")) == []
                assert error_line(scene.ext4box(bob, "umount", str(mnt))) == (
                    f"{mnt} is not your mount (it belongs to uid {alice.pw_uid});"
                    " only its owner or root can unmount it"
                )
                assert mounted_at(mnt)
                # Root, asking the broker, sees everyone's.
                everyone = ask_as(scene, real_user("root"), {"version": 1, "op": "list"})
                assert [r["uid"] for r in everyone["mounts"]] == [alice.pw_uid]
            finally:
                done = scene.ext4box(alice, "umount", str(mnt))
            assert done.returncode == 0, done.stderr + broker_log(scene)
            assert not mounted_at(mnt)
            assert listed(scene.ext4box(alice, "list", "--json")) == []
            gone = podman("container", "exists", str(rows[0]["container"]), check=False)
            assert gone.returncode == 1
            assert broker.poll() is None
        assert not marker.exists()
        check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        remove_scene(scene)


def test_a_feature_refusing_rule_admits_roots_image_and_the_server_is_told():
    """A rule with refuse_features admits an image only root can write (pinned.py),
    and the broker's MOUNT carries the refused features to the server, which
    refuses them again on the bytes it parses (its log shows what it was told)."""
    server_image = build_server_image()
    alice, bob = real_user(ALICE), real_user(BOB)
    scene = make_scene(alice, bob)
    mnt = scene.home(alice) / "mnt"
    shared = scene.root / "shared"
    shared.mkdir(mode=0o755)
    image = make_image(shared / "tools.img", {"tool": "tool\n"}, None, 0o644)
    (scene.policy / "05-pinned.toml").write_text(
        f'[[rule]]\nname = "pinned"\nimages = ["{shared}/*.img"]\nusers = ["{alice.pw_name}"]\n'
        f'refuse_features = ["casefold", "encrypt"]\nmountpoints = ["{mnt}"]\n'
    )
    try:
        with running_broker(scene, env={"EXT4BOX_SERVER_IMAGE": server_image}):
            proc = scene.ext4box(alice, "mount", str(image), str(mnt))
            assert proc.returncode == 0, proc.stderr + broker_log(scene)
            try:
                [row] = listed(scene.ext4box(alice, "list", "--json"))
                assert run_as(alice, "cat", str(mnt / "tool")).stdout == "tool\n"
                server_log = (scene.root / "state" / f"{row['container']}.log").read_text()
                told = [json.loads(line[line.index("{"):]) for line in server_log.splitlines()
                        if '"handoff"' in line]  # fmt: skip
                assert [entry["refused_features"] for entry in told] == [["casefold", "encrypt"]]
            finally:
                done = scene.ext4box(alice, "umount", str(mnt))
            assert done.returncode == 0, done.stderr + broker_log(scene)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        remove_scene(scene)


SWAPPER = """
import os, sys, time
home, uid, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
mnt, deadline, i = os.path.join(home, "mnt"), time.monotonic() + seconds, 0
print("swapping", flush=True)
while time.monotonic() < deadline:
    i += 1
    try:
        if not os.path.lexists(mnt):
            os.mkdir(mnt)
        os.rename(mnt, f"{mnt}-{i}")
        os.symlink("/etc", mnt)
        time.sleep(0.05)
        os.unlink(mnt)
        os.rename(f"{mnt}-{i}", mnt)
    except OSError:
        if os.path.islink(mnt):
            os.unlink(mnt)
    time.sleep(0.03)
"""


SWAP_TRIES = 50  # each mount starts a container; test_broker_swap_race.py runs 200 without


def test_bob_swapping_his_mountpoint_for_a_link_to_etc_never_mounts_on_etc():
    """While each request is in flight bob keeps renaming his mountpoint away and
    putting a link to /etc in its place. Each request is decided on the directory
    the open reached: refused (/etc is root's, or a link appeared after realpath),
    or mounted on bob's own directory wherever he renamed it (the mount is attached
    to the held fd, through the container start in between), and then unmounted
    through the broker at that path."""
    server_image = build_server_image()
    alice, bob = real_user(ALICE), real_user(BOB)
    scene = make_scene(alice, bob)
    home = scene.home(bob)
    (scene.policy / "20-renamed.toml").write_text(
        f'[[rule]]\nname = "renamed"\nimages = ["{home}/*.img"]\nusers = ["{bob.pw_name}"]\n'
        f'mountpoints = ["{home}/mnt*"]\n'
    )
    image = make_image(home / "mine.img", {"f": "f\n"}, bob, 0o600)
    outcomes: dict[str, int] = {}
    try:
        with running_broker(scene, env={"EXT4BOX_SERVER_IMAGE": server_image}) as broker:
            for attempt in range(SWAP_TRIES):
                swapper = subprocess.Popen(
                    [*as_user(bob), "/usr/bin/python3", "-c", SWAPPER, str(home),
                     str(bob.pw_uid), str(0.2 + 0.1 * (attempt % 5))],
                    env=user_env(bob), stdout=subprocess.PIPE, text=True, cwd="/",
                )  # fmt: skip
                assert swapper.stdout is not None and swapper.stdout.readline() == "swapping\n"
                proc = scene.ext4box(bob, "mount", str(image), str(home / "mnt"))
                swapper.wait(60)
                assert not os.path.ismount("/etc")
                if proc.returncode == 0:
                    [row] = listed(scene.ext4box(bob, "list", "--json"))
                    where = Path(str(row["mountpoint"]))
                    landed = "mounted on " + ("mnt" if where.name == "mnt" else "a renamed mnt")
                    outcomes[landed] = outcomes.get(landed, 0) + 1
                    assert where.parent == home and where.name.startswith("mnt"), where
                    assert mounted_at(where)  # root may not stat it: it is bob's FUSE mount
                    done = scene.ext4box(bob, "umount", str(where))
                    assert done.returncode == 0, done.stderr + broker_log(scene)
                    assert not mounted_at(where)
                else:
                    line = error_line(proc)
                    outcomes[line] = outcomes.get(line, 0) + 1
                    assert line in (
                        "mountpoint /etc belongs to uid 0: the broker mounts only on"
                        " directories you own",
                        f"mountpoint {home / 'mnt'}: No such file or directory",
                        f"mountpoint {home / 'mnt'}: {home / 'mnt'} now goes through a symbolic"
                        " link; refusing (was it swapped?)",
                    ), line
            assert broker.poll() is None
        print(f"\nswap outcomes: {outcomes}")
        with open("/proc/self/mountinfo") as table:
            assert not [row for row in table if f"{scene.root}/" in row.split()[4]]
    finally:
        remove_scene(scene)
