"""ext4box.service.serve.serve_fds through the real service, on the host.

The test does the helper's part by hand (tests/appliance/fdmount.py): mount(2)
of fuse.ext4box on an open /dev/fuse fd, hand-off of that fd and the image fd
to `python -m ext4box.service.main --handoff-fd 3` over a SEQPACKET pair.
The oracle is the kernel's own ext4 mount of the same image.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from appliance.fdmount import (
    SERVICE_MODULE,
    force_unmount,
    fuse_mount,
    hello,
    send_mount,
    served_by_handoff,
    start_service,
)
from ext4box.handoff_protocol import ImageKind, Mode, MountRequest, PeerRefused
from ext4box.helper import handoff
from support.kernel import kernel_mount, why_no_kernel_mounts
from support.serve import why_no_fuse

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) of a FUSE fd needs root"),
    pytest.mark.skipif(why_no_fuse() is not None, reason=str(why_no_fuse())),
    pytest.mark.timeout(120),
]

SERVICE = [*SERVICE_MODULE, "--handoff-fd", "3", "--allow-privileged", "--timeout", "30"]


def make_tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "dir" / "sub").mkdir(parents=True)
    (tree / "big.bin").write_bytes(os.urandom(2 * 1024 * 1024 + 5))  # threaded reads
    (tree / "dir" / "hello.txt").write_bytes(b"hello\n")
    (tree / "dir" / "sub" / "empty").write_bytes(b"")
    for i in range(40):
        (tree / "dir" / f"f{i:02d}").write_bytes(os.urandom(i * 513))
    (tree / "link").symlink_to("dir/hello.txt")
    os.setxattr(tree / "dir" / "hello.txt", "user.note", b"n" * 50)
    return tree


def mkfs(tree: Path, image: Path) -> Path:
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "16M"], check=True)
    return image


def snapshot(root: Path) -> dict[str, tuple]:
    """name -> (mode, size, link target or content hash, xattrs) for the whole tree."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if rel.startswith("lost+found"):
                continue
            st = os.lstat(path)
            if path.is_symlink():
                what = os.readlink(path)
            elif path.is_file():
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                what = None
            xattrs = {
                key: os.getxattr(path, key, follow_symlinks=False)
                for key in os.listxattr(path, follow_symlinks=False)
                if key.startswith("user.")
            }
            out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, what, xattrs)
    return out


@pytest.mark.skipif(why_no_kernel_mounts() is not None, reason=str(why_no_kernel_mounts()))
def test_served_tree_matches_the_kernel(tmp_path: Path) -> None:
    image = mkfs(make_tree(tmp_path), tmp_path / "img.ext4")
    with kernel_mount(image, tmp_path / "kernel") as kernel_root:
        expected = snapshot(kernel_root)
    with served_by_handoff(image, tmp_path / "mnt", SERVICE) as served:
        assert snapshot(served.mountpoint) == expected
        os.statvfs(served.mountpoint)
    err = served.proc.stderr.read()
    assert served.proc.returncode == 0, err
    events = [line for line in err.splitlines() if '"event": "stage2"' in line]
    assert events and '"seccomp": 2' in events[0], err  # served under the stage-2 filter


def _refused(
    tmp_path: Path, image: Path, request: MountRequest, flags: int
) -> tuple[PeerRefused, int, str]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    helper_end, proc = start_service(SERVICE)
    try:
        hello(helper_end, 30)
        fuse_fd = fuse_mount(image, mnt)
        image_fd = os.open(image, flags | os.O_CLOEXEC)
        try:
            send_mount(helper_end, fuse_fd, image_fd, request)
        finally:
            os.close(image_fd)
            os.close(fuse_fd)
        with pytest.raises(PeerRefused) as refused:
            handoff.wait_ready(helper_end, timeout=30)
        _, err = proc.communicate(timeout=30)
    finally:
        helper_end.close()
        force_unmount(mnt)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return refused.value, proc.returncode, err


@pytest.mark.skipif(why_no_kernel_mounts() is not None, reason=str(why_no_kernel_mounts()))
def test_read_write_handoff_serves_writes_under_stage2(tmp_path: Path) -> None:
    image = mkfs(make_tree(tmp_path), tmp_path / "img.ext4")
    payload = os.urandom(300 * 1024 + 7)
    with served_by_handoff(image, tmp_path / "mnt", SERVICE, mode=Mode.RW) as served:
        root = served.mountpoint
        (root / "new").mkdir()
        (root / "new" / "data.bin").write_bytes(payload)
        (root / "dir" / "hello.txt").unlink()
        os.rename(root / "big.bin", root / "new" / "big.bin")
    err = served.proc.stderr.read()
    assert served.proc.returncode == 0, err
    events = [line for line in err.splitlines() if '"event": "stage2"' in line]
    assert events and '"seccomp": 2' in events[0], err
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with kernel_mount(image, tmp_path / "kernel") as kernel_root:
        assert (kernel_root / "new" / "data.bin").read_bytes() == payload
        assert not (kernel_root / "dir" / "hello.txt").exists()
        assert (kernel_root / "new" / "big.bin").stat().st_size == 2 * 1024 * 1024 + 5


def test_image_that_is_not_ext4_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "garbage.img"
    image.write_bytes(os.urandom(1024 * 1024))
    request = MountRequest(Mode.RO, ImageKind.REGULAR, image.stat().st_size)
    refusal, code, err = _refused(tmp_path, image, request, os.O_RDONLY)
    assert "cannot serve the image" in refusal.reason
    assert code == 5, err
    assert "Traceback" not in err


def test_unmounted_fuse_fd_is_refused_before_ready(tmp_path: Path) -> None:
    """A /dev/fuse fd that carries no mount: ERROR to the helper, never READY
    (issue 14, finding 5: READY used to come first, then exit 5). READY is
    sent only once FUSE_INIT has been answered."""
    image = mkfs(make_tree(tmp_path), tmp_path / "img.ext4")
    request = MountRequest(Mode.RO, ImageKind.REGULAR, image.stat().st_size)
    helper_end, proc = start_service(SERVICE)
    try:
        hello(helper_end, 30)
        fuse_fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)  # opened, never mounted
        image_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            send_mount(helper_end, fuse_fd, image_fd, request)
        finally:
            os.close(image_fd)
            os.close(fuse_fd)
        with pytest.raises(PeerRefused) as refused:
            handoff.wait_ready(helper_end, timeout=30)
        _, err = proc.communicate(timeout=30)
    finally:
        helper_end.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "cannot serve /dev/fuse fd" in refused.value.reason, refused.value.reason
    assert proc.returncode == 5, err
    assert "Traceback" not in err
    assert '"event": "ready"' not in err
