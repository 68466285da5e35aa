"""Can this user run `ext4box mount` here, and if not, what is missing?

Each check looks at one thing a mount needs (podman, runc, podman's
configuration, the runtime directory, the seccomp profile, /dev/fuse,
fusermount3, the server image, the policy, the mountpoint) and says ok or
what is missing and how to fix it. `ext4box doctor` prints them all;
`ext4box mount` runs the same checks (preflight) before it starts a
container, so a missing piece is reported in a second, not after the
container's setup.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ext4box.helper import container, fusemount, state
from ext4box.helper.errors import HelperError

FUSE_DEVICE = "/dev/fuse"
INSTALL_HINT = "run `make install` as root in an ext4box checkout"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, or what is wrong
    fix: str = ""  # how to fix it, when not ok
    needed: bool = True  # False: worth knowing, a mount works without it

    def line(self) -> str:
        status = "ok" if self.ok else ("missing" if self.needed else "warning")
        text = f"{status:<8}{self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text}; fix: {self.fix}"

    def error_line(self) -> str:
        # A failing check's detail is a whole sentence: it is also mount's error.
        return self.detail + (f"; fix: {self.fix}" if self.fix else "")


# -- the checks -------------------------------------------------------------------


def check_podman() -> Check:
    try:
        podman = container.find_podman()
    except HelperError as err:
        return Check("podman", False, err.line, "apt-get install podman")
    return Check("podman", True, podman.executable)


def check_runc() -> Check:
    # ext4box's containers.conf chooses runc (crun fails on these hosts' cgroups).
    found = shutil.which("runc") or _first_file("/usr/sbin/runc", "/usr/bin/runc")
    if not found:
        return Check("runc", False, "runc is not installed", "apt-get install runc")
    return Check("runc", True, found)


def check_podman_config() -> Check:
    env = container.podman_environment()
    conf = env.get("CONTAINERS_CONF")
    if not conf:
        # Without it podman's default ulimits fail under --cap-drop=all
        # ("error setting rlimit type 7") and crun is chosen.
        return Check("podman config", False, "no ext4box containers.conf found", INSTALL_HINT)
    if os.geteuid() != 0 and not env.get("CONTAINERS_STORAGE_CONF"):
        return Check(
            "podman config", False,
            "no storage-rootless.conf found (podman would fall back to slow vfs storage)",
            INSTALL_HINT,
        )  # fmt: skip
    storage = env.get("CONTAINERS_STORAGE_CONF")
    return Check("podman config", True, conf + (f", {storage}" if storage else ""))


def check_runtime_dir() -> Check:
    try:
        directory = state.ensure_state_dir()
    except HelperError as err:
        return Check("runtime dir", False, err.line, "set XDG_RUNTIME_DIR to a directory of yours")
    return Check("runtime dir", True, str(directory))


def check_seccomp() -> Check:
    profile = container.find_seccomp_profile()
    if profile is None:
        return Check("seccomp profile", False, container.missing_seccomp_line(), INSTALL_HINT)
    return Check("seccomp profile", True, profile)


def check_fuse_device() -> Check:
    if os.geteuid() == 0:
        return Check("/dev/fuse", True, "root")
    if os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        return Check("/dev/fuse", True, "read-write")
    try:
        mode = f"mode {stat.S_IMODE(os.stat(FUSE_DEVICE).st_mode):04o}"
    except OSError as err:
        return Check("/dev/fuse", False, f"{FUSE_DEVICE}: {err.strerror}", "modprobe fuse")
    return Check(
        "/dev/fuse", False, f"{FUSE_DEVICE} is {mode}, not read-write for uid {os.getuid()}",
        f"as root: chmod 0666 {FUSE_DEVICE} (Debian's default), or"
        f" setfacl -m u:{_user_name()}:rw {FUSE_DEVICE}",
    )  # fmt: skip


def check_fusermount() -> Check:
    if os.geteuid() == 0:
        return Check("fusermount3", True, "not needed as root (mount(2))")
    try:
        path = fusemount.fusermount_path()
    except HelperError as err:
        return Check("fusermount3", False, err.line, "apt-get install fuse3")
    st = os.stat(path)
    if not st.st_mode & stat.S_ISUID or st.st_uid != 0:
        return Check("fusermount3", False, f"{path} is not setuid root", f"chmod u+s {path}")
    return Check("fusermount3", True, path)


def check_server_image(podman: container.Podman | None = None) -> Check:
    try:
        podman = podman or container.find_podman()
        container.check_image(podman)
    except HelperError as err:
        # check_image's own hint names the build script; ours says what to run here.
        return Check("server image", False, err.line.split(" (build it with")[0], _image_fix())
    return Check("server image", True, f"{podman.image} for uid {os.getuid()}")


def check_policy(policy_dir: str | None) -> Check:
    from ext4box.policy import PolicyLoadError, load_policy

    try:
        policy = load_policy(policy_dir, check_ownership=True)
    except PolicyLoadError as err:
        first = err.lines()[0] if err.lines() else str(err)
        return Check("policy", False, first)
    if not policy.rules:
        return Check(
            "policy", False, f"{policy.directory} has no rules: every mount is denied",
            "add a rule (see /usr/share/ext4box/policy-examples or policy/README.md)",
        )  # fmt: skip
    return Check("policy", True, f"{policy.directory}: {len(policy.rules)} rule(s)")


def check_mountpoint(path: str) -> Check:
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        return Check("mountpoint", False, f"{path} is not a directory", f"mkdir -p {path}")
    if fusemount.mounted_fstype(real) == fusemount.FSTYPE:
        return Check("mountpoint", False, f"{real} is already an ext4box mount",
                     f"ext4box umount {real}")  # fmt: skip
    if os.geteuid() != 0 and not os.access(real, os.W_OK):
        return Check(
            "mountpoint", False, f"{real} is not writable by you (fusermount3 needs that)",
            f"use a directory you own, or as root: chown {_user_name()} {real}",
        )  # fmt: skip
    return Check("mountpoint", True, real)


def check_propagation(path: str) -> Check:
    """Which mount holds `path`, and does a mount made there propagate?

    Informational: the host helper works on any mount; a helper inside a
    container (compose) needs a shared mount for its mount to reach the host.
    """
    real = os.path.realpath(path)
    holder = _holding_mount(real)
    if holder is None:
        return Check("propagation", False, f"no mount holds {real}", needed=False)
    where, propagation = holder
    if propagation == "shared":
        return Check("propagation", True, f"{where} is shared")
    return Check(
        "propagation", False,
        f"{where} is {propagation}: fine for `ext4box mount` on the host; a helper in a"
        " container (compose) cannot make its mount visible here",
        f"mount --bind {real} {real} && mount --make-shared {real}", needed=False,
    )  # fmt: skip


# -- running them -----------------------------------------------------------------


def all_checks(mountpoint: str | None, policy_dir: str | None) -> Iterator[Check]:
    """Every check, in the order a mount meets them (a generator: print as you go)."""
    podman = check_podman()
    yield podman
    yield check_runc()
    yield check_podman_config()
    yield check_runtime_dir()
    yield check_seccomp()
    yield check_fuse_device()
    yield check_fusermount()
    if podman.ok:
        yield check_server_image()
    yield check_policy(policy_dir)
    if mountpoint:
        yield check_mountpoint(mountpoint)
        yield check_propagation(mountpoint)


def run_cli(mountpoint: str | None, policy_dir: str | None) -> int:
    """`ext4box doctor`: one line per check; exit 1 if something a mount needs is missing."""
    missing = 0
    for check in all_checks(mountpoint, policy_dir):
        print(check.line(), flush=True)
        missing += not check.ok and check.needed
    print("ready to mount" if not missing else f"{missing} problem(s) found", flush=True)
    return 1 if missing else 0


def preflight(mountpoint: str) -> container.Podman:
    """What `ext4box mount` runs before it starts a container: the first missing
    piece is the error. Returns the podman to use."""
    checks: tuple[Callable[[], Check], ...] = (
        check_podman, check_runc, check_podman_config, check_runtime_dir, check_seccomp,
        check_fuse_device, check_fusermount, lambda: check_mountpoint(mountpoint),
    )  # fmt: skip
    for run in checks:
        check = run()
        if not check.ok and check.needed:
            raise HelperError(check.error_line())
    podman = container.find_podman()
    image = check_server_image(podman)
    if not image.ok:
        raise HelperError(image.error_line())
    return podman


# -- details ------------------------------------------------------------------------


def _holding_mount(path: str) -> tuple[str, str] | None:
    """(mountpoint, propagation) of the mount `path` is on, from mountinfo."""
    best: tuple[str, str] | None = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as table:
        for line in table:
            left, _, _ = line.partition(" - ")
            fields = left.split()
            if len(fields) < 6:
                continue
            where = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            inside = path == where or path.startswith(where.rstrip("/") + "/")
            if inside and (best is None or len(where) >= len(best[0])):
                tags = fields[6:]
                if any(tag.startswith("shared:") for tag in tags):
                    propagation = "shared"
                elif any(tag.startswith("master:") for tag in tags):
                    propagation = "slave"
                else:
                    propagation = "private"
                best = (where, propagation)
    return best


def _image_fix() -> str:
    archive = _first_file(*sorted(_share_archives(), reverse=True))
    if os.geteuid() == 0:
        return "scripts/build-image.sh in a checkout (make install does it)"
    if archive:
        return f"source /usr/share/ext4box/podman-env.sh && podman load -i {archive}"
    return "ask root to run `make install`, then podman load its image archive"


def _share_archives() -> list[str]:
    share = "/usr/share/ext4box"
    try:
        return [f"{share}/{n}" for n in os.listdir(share) if n.endswith(".oci.tar")]
    except OSError:
        return []


def _first_file(*paths: str) -> str | None:
    return next((p for p in paths if os.path.isfile(p)), None)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
