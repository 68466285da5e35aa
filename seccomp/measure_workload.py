#!/usr/bin/env python3
"""One measured run of the appliance path: mount a small image on a /dev/fuse
fd, hand both fds to `ext4box service` (on the host, or in the container),
read everything through the mount (walk, stat, readdir, read, readlink,
listxattr/getxattr, statfs), unmount. seccomp/measure.sh runs this under
strace through EXT4BOX_SERVICE_WRAPPER.

    measure_workload.py host WORKDIR
    measure_workload.py container WORKDIR IMAGE PROFILE.json
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "app")]

from appliance.fdmount import SERVICE_MODULE, served_by_handoff  # noqa: E402

CONTAINER_ENTRYPOINT = '["/opt/ext4box/bin/python","-m","ext4box.service.main"]'


def container_argv(image: str, profile: Path) -> list[str]:
    return [
        "podman", "run", "--rm", "--init", "--network=none", "--cap-drop=all",
        "--security-opt", "no-new-privileges", "--security-opt", f"seccomp={profile}",
        "--read-only", "--uidmap=0:200000:65536", "--gidmap=0:200000:65536",
        "--preserve-fds=1", "--entrypoint", CONTAINER_ENTRYPOINT, image,
        "--handoff-fd", "3",
    ]  # fmt: skip


def make_image(work: Path) -> Path:
    tree = work / "tree"
    (tree / "dir" / "sub").mkdir(parents=True, exist_ok=True)
    (tree / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (tree / "dir" / "small.txt").write_bytes(b"hello\n")
    (tree / "dir" / "sub" / "empty").write_bytes(b"")
    for i in range(200):
        (tree / "dir" / f"f{i:03d}").write_bytes(os.urandom(i * 37))
    link = tree / "link"
    if not link.is_symlink():
        link.symlink_to("dir/small.txt")
    os.setxattr(tree / "dir" / "small.txt", "user.note", b"x" * 100)
    image = work / "image.ext4"
    image.unlink(missing_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "24M"], check=True)
    return image


def workload(mountpoint: Path, tree: Path) -> None:
    for root, dirs, files in os.walk(mountpoint):
        for name in dirs + files:
            path = Path(root, name)
            os.lstat(path)
            os.listxattr(path, follow_symlinks=False)
            if path.is_symlink():
                os.readlink(path)
            elif path.is_file():
                want = hashlib.sha256((tree / path.relative_to(mountpoint)).read_bytes())
                got = hashlib.sha256(path.read_bytes())
                assert want.digest() == got.digest(), path
    os.getxattr(mountpoint / "dir" / "small.txt", "user.note")
    os.statvfs(mountpoint)
    with contextlib.suppress(FileNotFoundError):
        (mountpoint / "missing").stat()


def main() -> int:
    mode, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    image = make_image(work)
    if mode == "host":
        argv = [*SERVICE_MODULE, "--handoff-fd", "3", "--allow-privileged"]
        env = None
    else:
        argv = container_argv(sys.argv[3], Path(sys.argv[4]).resolve())
        env = {**os.environ, "CONTAINERS_CONF": str(REPO / "compose/containers.conf")}
    with served_by_handoff(image, work / "mnt", argv, env=env, timeout=120) as served:
        workload(served.mountpoint, work / "tree")
    err = served.proc.stderr.read() if served.proc.stderr else ""
    print(err[-2000:], file=sys.stderr)
    return served.proc.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
