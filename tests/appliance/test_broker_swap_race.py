"""bob races the broker: 200 mount requests while a thread of his swaps his mountpoint
for a symbolic link to /etc and back (issue 14 finding 2, through the broker).

No container starts: the broker's server image is absent, so a request decided
on bob's own directory stops at the image check, just after the decision. Every
request must end in one of the lines below, each naming what the open reached,
and nothing may ever be mounted on /etc or under the scene. The mounts
themselves, with podman, are in test_broker_e2e.py (50 tries).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections import Counter

import pytest

from appliance.broker_support import (
    ABSENT_IMAGE,
    ALICE,
    BOB,
    PODMAN_GATE,
    broker_log,
    make_image,
    make_scene,
    real_user,
    remove_scene,
    running_broker,
)
from appliance.helper_support import run_as

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="creates users and runs a root broker"),
]

TRIES = 200

# Runs as bob: a swapping thread, and the requests one after another on the real socket.
RACER = textwrap.dedent(
    """
    import json, os, random, socket, struct, sys, threading, time
    sock_path, image, mnt, tries = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    away, stop, swaps, failed = mnt + "-away", threading.Event(), [0], []

    def swap():
        while not stop.is_set():
            try:
                os.rename(mnt, away)
                os.symlink("/etc", mnt)
                swaps[0] += 1
                time.sleep(random.uniform(0, 0.004))  # as long a link as a directory
                os.unlink(mnt)
                os.rename(away, mnt)
                time.sleep(random.uniform(0, 0.004))
            except OSError as err:
                failed.append(str(err))
                return

    def ask(message):
        body = json.dumps(message).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock_path)
            s.sendall(struct.pack(">I", len(body)) + body)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data[4:])

    swapper = threading.Thread(target=swap)
    swapper.start()
    replies = []
    try:
        for _ in range(tries):
            replies.append(ask({"version": 1, "op": "mount", "image": image,
                                "mountpoint": mnt, "mode": "ro"}))
            time.sleep(0.001)
    finally:
        stop.set()
        swapper.join()
    print(json.dumps({"replies": replies, "swaps": swaps[0], "swapper_failed": failed}))
    """
)


def test_two_hundred_requests_against_a_swapping_thread_never_reach_etc():
    alice, bob = real_user(ALICE), real_user(BOB)
    scene = make_scene(alice, bob)
    home = scene.home(bob)
    mnt, away = home / "race", home / "race-away"
    mnt.mkdir()
    os.chown(mnt, bob.pw_uid, bob.pw_gid)
    (scene.policy / "20-race.toml").write_text(
        f'[[rule]]\nname = "race"\nimages = ["{home}/race.img"]\nusers = ["{bob.pw_name}"]\n'
        f'mountpoints = ["{home}/race*"]\n'
    )
    image = make_image(home / "race.img", {"f": "f\n"}, bob, 0o600)
    try:
        with running_broker(scene, env={"EXT4BOX_SERVER_IMAGE": ABSENT_IMAGE}) as broker:
            proc = run_as(bob, "/usr/bin/python3", "-c", RACER, str(scene.socket), str(image),
                          str(mnt), str(TRIES), timeout=500)  # fmt: skip
            assert proc.returncode == 0, proc.stderr + broker_log(scene)
            assert broker.poll() is None, broker_log(scene)
        ran = json.loads(proc.stdout)
        outcomes = Counter(
            "ok" if reply.get("ok") else str(reply.get("error")) for reply in ran["replies"]
        )
        print(f"\n{TRIES} requests, {ran['swaps']} swaps: {dict(outcomes)}")
        assert ran["swapper_failed"] == []
        decided_on_bobs_directory = PODMAN_GATE
        expected = {
            decided_on_bobs_directory,
            "mountpoint /etc belongs to uid 0: the broker mounts only on directories you own",
            f"mountpoint {mnt}: {mnt} now goes through a symbolic link; refusing (was it swapped?)",
            f"mountpoint {mnt}: No such file or directory",
        }
        assert sum(outcomes.values()) == TRIES
        assert set(outcomes) <= expected, outcomes
        # The race was run: bob's directory was both reached and swapped away.
        assert outcomes[decided_on_bobs_directory] > 0 and ran["swaps"] > 0, outcomes
        assert not os.path.ismount("/etc")
        with open("/proc/self/mountinfo") as table:
            assert not [row for row in table if f"{scene.root}/" in row.split()[4]]
        assert mnt.is_dir() and not mnt.is_symlink() and not away.exists()
    finally:
        remove_scene(scene)
