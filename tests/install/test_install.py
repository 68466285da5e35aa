"""`make install` into the real locations of this host, used as an ordinary user would, then
`make uninstall`, which must leave the host as it was (issue 16 items 1, 4, 6).

Root only, and only where no ext4box install exists yet (a host that has one
is left alone). The server image comes from the session's build (the
appliance suites share it); install finds it in root's storage and does not
build again, so uninstall keeps it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.helper_support import as_user, fuse_access, public_dir, rootless_user
from docs.snippets import FAILED, run_snippet, snippet
from support.server_image import default_server_image

pytestmark = [
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0, reason="installs under /opt, /usr and /etc: root only"),
]

REPO = Path(__file__).resolve().parents[2]
BIN = Path("/usr/local/bin/ext4box")
SHARE = Path("/usr/share/ext4box")
# Everything install may create, and the directories it may have to create.
WATCHED = [
    Path("/opt/ext4box"),
    BIN,
    SHARE,
    Path("/etc/ext4box"),
    Path("/etc/ext4box/policy.d"),
    Path("/usr/local/lib/systemd/system/ext4box-server.socket"),
    Path("/usr/local/lib/systemd/system/ext4box-server@.service"),
    Path("/usr/local/lib/systemd/system/ext4box-broker.socket"),
    Path("/usr/local/lib/systemd/system/ext4box-broker.service"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/local/lib/systemd"),
    Path("/usr/local/share/man/man1/ext4box.1"),
    Path("/usr/local/share/man/man1"),
    Path("/usr/share/bash-completion/completions/ext4box"),
    Path("/usr/share/doc/ext4box"),
]
# What a login shell gives an ordinary user: no checkout, no venv, no PYTHONPATH.
USER_PATH = "/usr/local/bin:/usr/bin:/bin"


def _state() -> dict[str, bool]:
    return {str(path): path.exists() or path.is_symlink() for path in WATCHED}


def _make(target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(REPO), target], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "TMPDIR": "/tmp"})  # fmt: skip


@pytest.fixture(scope="module")
def installed() -> Iterator[str]:
    """make install; make uninstall afterwards, checking the host is as before."""
    if any(Path(p).exists() for p in ("/opt/ext4box", "/usr/share/ext4box")) or BIN.exists():
        reason = "an ext4box install is already on this host; the test does not touch it"
        print(reason)
        pytest.skip(reason)
    image = default_server_image()
    before = _state()
    done = _make("install")
    try:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        print(f"\n{done.stderr.strip()}")
        yield image
    finally:
        removed = _make("uninstall")
        assert removed.returncode == 0, removed.stderr[-3000:]
        assert _state() == before, "make uninstall left something behind"
        kept = subprocess.run(["podman", "image", "exists", image], capture_output=True)
        assert kept.returncode == 0, "uninstall removed an image that was there before install"


@pytest.fixture(scope="module")
def user():
    return rootless_user()


def _as_user(user, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": USER_PATH, "HOME": user.pw_dir, "USER": user.pw_name, "LANG": "C.UTF-8"}
    return subprocess.run([*as_user(user), *argv], capture_output=True, text=True, cwd="/",
                          timeout=300, env={**base, **env})  # fmt: skip


@pytest.fixture(scope="module")
def scene() -> Iterator[Path]:
    """An image made by mkfs.ext4 -d, a mountpoint, readable by everyone."""
    with public_dir() as root:
        tree = root / "tree"
        tree.mkdir()
        (tree / "hello.txt").write_text("hello from an installed ext4box\n")
        image = root / "disk.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "8M"], check=True)
        image.chmod(0o644)
        (root / "mnt").mkdir()
        yield root


def _doctor(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    lines = {}
    for line in proc.stdout.splitlines():
        status, _, rest = line.partition(" ")
        lines[rest.strip().split(":", 1)[0]] = f"{status}:{rest.strip().split(':', 1)[-1]}"
    return lines


def test_an_ordinary_user_runs_the_installed_command(installed, user, scene):
    assert BIN.resolve() == Path("/opt/ext4box/bin/ext4box")
    version = _as_user(user, "ext4box", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("ext4box ")
    inspect = _as_user(user, "ext4box", "inspect", str(scene / "disk.img"))
    assert inspect.returncode == 0, inspect.stderr
    listing = _as_user(user, "ext4box", "ls", str(scene / "disk.img"))
    assert "hello.txt" in listing.stdout.split()
    # The installed policy directory exists and holds no rule: denied, not "does not exist".
    check = _as_user(user, "ext4box", "policy", "check", str(scene / "disk.img"))
    assert check.returncode == 1, check.stdout + check.stderr
    assert "deny by default" in check.stdout + check.stderr
    examples = _as_user(user, "ext4box", "policy", "check", str(scene / "disk.img"),
                        "--policy", str(SHARE / "policy-examples"))  # fmt: skip
    assert "no-untrusted-images" in examples.stdout + examples.stderr  # the examples load


def test_installed_configs_are_found_outside_the_checkout(installed, user):
    """Issue 16 item 6: outside the checkout the profile and configs were not found."""
    report = _doctor(_as_user(user, "ext4box", "doctor"))
    assert report["seccomp profile"] == f"ok: {SHARE}/seccomp/ext4box.json"
    assert report["podman config"] == (
        f"ok: {SHARE}/containers.conf, {SHARE}/storage-rootless.conf"
    )
    assert report["policy"].startswith("missing:") and "no rules" in report["policy"]


def test_a_user_loads_the_image_as_documented_and_doctor_is_satisfied(installed, user, scene):
    archives = sorted(SHARE.glob("ext4box-*.oci.tar"))
    assert archives, "install saved no image archive for users"
    # The README's commands for users, word for word: the load works, doctor says what is
    # missing for this user (no rule names them yet, and /dev/fuse if it is 0600).
    code = snippet("The appliance: `ext4box mount`", "source /usr/share/ext4box/podman-env.sh")
    assert str(archives[-1]) in code, "the README names another archive than install made"
    first = _as_user(user, "bash", "-c", f"trap 'echo {FAILED} $? $BASH_COMMAND >&2' ERR\n{code}")
    failed = [line.split()[2:4] for line in first.stderr.splitlines() if line.startswith(FAILED)]
    assert failed == [["ext4box", "doctor"]], first.stderr  # doctor exits 1: not ready yet
    assert "missing policy:" in first.stdout
    policy = scene / "policy"
    policy.mkdir(exist_ok=True, mode=0o755)
    (policy / "10-user.toml").write_text(textwrap.dedent(f"""
        [[rule]]
        name = "user"
        images = ["{scene}/*.img"]
        users = ["{user.pw_name}"]
        """))  # fmt: skip
    with fuse_access(user):
        proc = _as_user(user, "ext4box", "doctor", "--policy", str(policy))
    report = _doctor(proc)
    assert report["server image"].startswith("ok:"), proc.stdout
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.splitlines()[-1] == "ready to mount"


def test_root_mounts_with_the_installed_configs(installed, scene):
    """The rlimit failure and the missing allowlist (item 6): a real mount, from /."""
    policy = scene / "root-policy"
    policy.mkdir(exist_ok=True, mode=0o755)
    (policy / "10-root.toml").write_text(textwrap.dedent(f"""
        [[rule]]
        name = "root"
        images = ["{scene}/*.img"]
        users = ["root"]
        """))  # fmt: skip
    env = {"PATH": f"{USER_PATH}:/usr/sbin:/sbin", "HOME": "/root", "LANG": "C.UTF-8",
           "EXT4BOX_SERVER_IMAGE": installed}  # fmt: skip
    mnt = scene / "mnt"
    run = subprocess.run([str(BIN), "mount", str(scene / "disk.img"), str(mnt), "--policy",
                          str(policy)], capture_output=True, text=True, cwd="/", env=env,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    try:
        assert (mnt / "hello.txt").read_text() == "hello from an installed ext4box\n"
        rows = json.loads(subprocess.run([str(BIN), "list", "--json"], capture_output=True,
                                         text=True, env=env, cwd="/").stdout)  # fmt: skip
        name = next(r["container"] for r in rows if r["mountpoint"] == str(mnt))
        inspect = subprocess.run(
            ["podman", "container", "inspect", "--format", "{{json .HostConfig.SecurityOpt}}",
             name], capture_output=True, text=True,
            env={**env, "CONTAINERS_CONF": f"{SHARE}/containers.conf"},
        )  # fmt: skip
        assert f"seccomp={SHARE}/seccomp/ext4box.json" in inspect.stdout, inspect.stdout
    finally:
        done = subprocess.run([str(BIN), "umount", str(mnt)], capture_output=True, text=True,
                              env=env, cwd="/")  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_man_page_and_completion_are_installed(installed, user):
    if not shutil.which("man"):
        pytest.skip("man is not installed")
    page = _as_user(user, "man", "-P", "cat", "ext4box")
    assert page.returncode == 0, page.stderr
    assert "ext4box doctor" in page.stdout.replace("\u2010", "-")
    script = "/usr/share/bash-completion/completions/ext4box"
    completed = _as_user(user, "bash", "-c",
                         f"source {script}; COMP_WORDS=(ext4box do); COMP_CWORD=1; _ext4box;"
                         ' echo "${COMPREPLY[@]}"')  # fmt: skip
    assert completed.stdout.split() == ["doctor"]


def test_units_name_the_installed_command(installed):
    units = Path("/usr/local/lib/systemd/system")
    for name in ("ext4box-server@.service", "ext4box-broker.service"):
        execs = [line for line in (units / name).read_text().splitlines()
                 if line.startswith("ExecStart=")]  # fmt: skip
        assert execs and all(line.startswith(f"ExecStart={BIN} ") for line in execs), (name, execs)
    for name in ("ext4box-server.socket", "ext4box-broker.socket"):
        assert (units / name).read_text() == (REPO / "compose" / "systemd" / name).read_text()


def test_readme_appliance_snippet_runs_as_written(installed):
    """The README's appliance sequence, copy-pasted as root on a fresh /srv, /mnt and
    /etc/ext4box (tmpfs in a private mount namespace); `make install` in it reinstalls."""
    code = snippet("The appliance: `ext4box mount`", "make install")
    outcome = run_snippet(code, fresh=("/srv", "/mnt", "/etc/ext4box"), timeout=1200)
    assert outcome.failed == [], outcome.stderr[-3000:]
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    assert "Hello from inside an ext4 image" in outcome.stdout
    assert "ready to mount" in outcome.stdout  # doctor, before the mount
    assert "decision: ALLOWED" in outcome.stdout
