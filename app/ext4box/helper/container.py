"""Start the server container and hand it the two fds.

The container is started detached with one end of a SOCK_SEQPACKET pair as
its fd 3 (`--preserve-fds=1`): no host path is bind-mounted into it at all.
The run-time sandbox is fixed here, not configurable by the caller:
--network=none, --cap-drop=all, no-new-privileges, the repository's seccomp
profile, a read-only root without podman's writable tmpfs mounts, no IPC
(/dev/shm, /dev/mqueue), memory and pids limits (cgroup v1 rootless podman
ignores those, with a warning), a user namespace in which the invoking
user's own uid does not exist (rootless: --userns=nomap), --init so the
server is not PID 1. The container's log goes to a file in the helper's
state directory, so its tail can be shown even after --rm removed the
container.

Podman is configured the way scripts/podman-env.sh does it (CONTAINERS_CONF,
a private XDG_RUNTIME_DIR, native overlay storage for rootless), without
touching anything under /etc.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ext4box import __version__
from ext4box.helper.errors import HelperError

DEFAULT_IMAGE = f"localhost/ext4box:{__version__}"
HANDOFF_FD = 3  # where --preserve-fds=1 puts our socket inside the container
PODMAN_RUN_TIMEOUT = 60.0
MEMORY_LIMIT = "512m"  # the README states both limits
PIDS_LIMIT = 64
LABEL = "org.ext4box.mount"
# Rootful fallback when /etc/subuid has no "containers" range for --userns=auto:
# a range far above the ones useradd hands out (100000 + n * 65536).
ROOT_USERNS_BASE = 3_000_000_000
ROOT_USERNS_SIZE = 65536

# Source checkout layout: app/ext4box/helper/container.py -> repository root.
_REPO = Path(__file__).resolve().parents[3]
_SHARE = Path("/usr/share/ext4box")


@dataclass(frozen=True, slots=True)
class Podman:
    """How to run podman for the invoking user."""

    executable: str
    env: dict[str, str]
    image: str
    seccomp_profile: str | None
    userns_args: tuple[str, ...]

    def run(
        self, *args: str, timeout: float = PODMAN_RUN_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [self.executable, *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd="/",
            )
        except subprocess.TimeoutExpired:
            raise HelperError(f"podman {args[0]} did not finish within {timeout:.0f} s") from None


def find_podman() -> Podman:
    """Locate podman and its configuration; one-line errors if unusable."""
    executable = os.environ.get("EXT4BOX_PODMAN") or shutil.which("podman")
    if not executable or not os.access(executable, os.X_OK):
        raise HelperError("podman is not installed (the ext4box server runs in a podman container)")
    return Podman(
        executable=executable,
        env=podman_environment(),
        image=os.environ.get("EXT4BOX_SERVER_IMAGE") or DEFAULT_IMAGE,
        seccomp_profile=find_seccomp_profile(),
        userns_args=_userns_args(),
    )


def podman_environment() -> dict[str, str]:
    """The environment of scripts/podman-env.sh, built in Python."""
    env = dict(os.environ)
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    conf = _first_existing(
        env.get("CONTAINERS_CONF"), _REPO / "compose/containers.conf", _SHARE / "containers.conf"
    )
    if conf:
        env["CONTAINERS_CONF"] = conf
    if os.geteuid() != 0:
        env["XDG_RUNTIME_DIR"] = str(runtime_dir())
        storage = _first_existing(
            env.get("CONTAINERS_STORAGE_CONF"),
            _REPO / "compose/storage-rootless.conf",
            _SHARE / "storage-rootless.conf",
        )
        if storage:
            env["CONTAINERS_STORAGE_CONF"] = storage
    return env


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR if it is ours, else a private one under /tmp.

    Without a systemd session (`su -`, ssh without pam_systemd) there is no
    XDG_RUNTIME_DIR, and after a plain `su` it is still the previous user's.
    """
    given = os.environ.get("XDG_RUNTIME_DIR")
    if given and _is_private_dir(Path(given)):
        return Path(given)
    path = Path(tempfile.gettempdir()) / f"ext4box-run-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    # Someone else's directory (or a link) under /tmp would let them see or
    # swap our sockets and state: refuse it.
    if not _is_private_dir(path):
        raise HelperError(
            f"{path} is not a private directory of uid {os.getuid()} (it must be owned by"
            " you, mode 0700 or 0711); remove it or set XDG_RUNTIME_DIR"
        )
    return path


def _is_private_dir(path: Path) -> bool:
    """Owned by us, not a link, nobody else may list or create in it.

    Search permission for others is accepted: podman itself sets its runtime
    directory to 0711, and names in it are protected by their own modes.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o066


def _first_existing(*candidates: str | Path | None) -> str | None:
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return str(candidate)
    return None


def seccomp_candidates() -> list[str]:
    """Where the server's seccomp allowlist is looked for, in order."""
    given = os.environ.get("EXT4BOX_SECCOMP_PROFILE")
    candidates = [given] if given else []
    if (_REPO / "pyproject.toml").is_file():  # running from a checkout
        candidates.append(str(_REPO / "seccomp/ext4box.json"))
    return [*candidates, str(_SHARE / "seccomp/ext4box.json")]


def find_seccomp_profile() -> str | None:
    return _first_existing(*seccomp_candidates())


def missing_seccomp_line() -> str:
    looked = ", ".join(seccomp_candidates())
    return (
        f"no seccomp profile for the server container (looked in {looked});"
        " install it with `make install` or set EXT4BOX_SECCOMP_PROFILE"
    )


def _userns_args() -> tuple[str, ...]:
    override = os.environ.get("EXT4BOX_USERNS")
    if override:
        return (f"--userns={override}",)
    if os.geteuid() != 0:
        # Container root is the first subordinate uid; the user's own uid is
        # not mapped at all, so the server can never act as them.
        return ("--userns=nomap",)
    if _has_subid_range("containers"):
        return ("--userns=auto",)
    mapping = f"0:{ROOT_USERNS_BASE}:{ROOT_USERNS_SIZE}"
    return (f"--uidmap={mapping}", f"--gidmap={mapping}")


def _has_subid_range(user: str) -> bool:
    try:
        with open("/etc/subuid", encoding="utf-8") as f:
            return any(line.split(":", 1)[0] == user for line in f)
    except OSError:
        return False


# -- starting -------------------------------------------------------------------


def check_image(podman: Podman) -> None:
    """The server image must already be in this user's storage (never pulled)."""
    proc = podman.run("image", "exists", podman.image)
    if proc.returncode == 1:
        raise HelperError(
            f"podman has no image {podman.image} for uid {os.getuid()}"
            " (build it with scripts/build-image.sh, or podman load it)"
        )
    if proc.returncode != 0:
        raise HelperError(f"podman is misconfigured: {_last_line(proc.stderr)}")


def run_command(podman: Podman, name: str, log_path: Path, labels: dict[str, str],
                handoff_timeout: float) -> list[str]:  # fmt: skip
    """The exact `podman run` argv (a function so tests can inspect it)."""
    argv = [
        podman.executable, "run", "--detach", "--rm", "--init", "--pull=never",
        "--name", name,
        "--network=none", "--cap-drop=all",
        "--security-opt", "no-new-privileges",
        # Nothing writable at all: no tmpfs on /tmp, /var/tmp, /run (podman's
        # default with --read-only), no /dev/shm, and /dev/mqueue masked.
        "--read-only", "--read-only-tmpfs=false", "--ipc=none",
        "--security-opt", "mask=/dev/mqueue",
        # One image's caches, and the FUSE worker threads (trio's default pool
        # of 40) with room to spare; the systemd unit has the same limits.
        f"--memory={MEMORY_LIMIT}", f"--pids-limit={PIDS_LIMIT}",
        *podman.userns_args,
        "--log-driver", "k8s-file", "--log-opt", f"path={log_path}",
        "--preserve-fds=1",
    ]  # fmt: skip
    if not podman.seccomp_profile:
        # Never run the parser with podman's default filter instead of ours.
        raise HelperError(missing_seccomp_line())
    argv += ["--security-opt", f"seccomp={podman.seccomp_profile}"]
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    argv += [podman.image, "--handoff-fd", str(HANDOFF_FD), "--timeout", f"{handoff_timeout:g}"]
    return argv


def start(podman: Podman, name: str, log_path: Path, labels: dict[str, str],
          handoff_timeout: float) -> tuple[str, socket.socket]:  # fmt: skip
    """Start the container detached; returns (container id, our socket end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        argv = run_command(podman, name, log_path, labels, handoff_timeout)
        returncode, out, err = _spawn_with_fd3(argv, podman.env, theirs.fileno())
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()  # the container holds its copy; EOF on ours means it exited
    if returncode != 0:
        ours.close()
        raise HelperError(f"podman could not start the server container: {_last_line(err)}")
    container_id = out.strip().splitlines()[-1] if out.strip() else name
    return container_id, ours


def _spawn_with_fd3(argv: list[str], env: dict[str, str], fd: int) -> tuple[int, str, str]:
    """Run argv with `fd` as its fd 3, stdio captured; posix_spawn, no preexec code.

    subprocess can only keep an fd at its own number; the container expects
    the socket at exactly 3, so spawn with explicit dup2 file actions.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                    (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
                    (os.POSIX_SPAWN_DUP2, fd, HANDOFF_FD),
                ],
            )
        finally:
            os.close(devnull)
        returncode = _wait(pid, PODMAN_RUN_TIMEOUT)
        out.seek(0)
        err.seek(0)
        return returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise HelperError(f"podman run did not finish within {timeout:.0f} s")
        time.sleep(0.01)


# -- inspecting and stopping ------------------------------------------------------


def container_pid(podman: Podman, name: str) -> int | None:
    proc = podman.run("container", "inspect", "--format", "{{.State.Pid}}", name)
    try:
        return int(proc.stdout.strip()) or None
    except ValueError:
        return None


def running_containers(podman: Podman) -> dict[str, str]:
    """name -> status of every ext4box server container of this user."""
    proc = podman.run("ps", "--all", "--filter", f"label={LABEL}=1", "--format", "json")
    if proc.returncode != 0:
        return {}
    try:
        rows = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        return {}
    out = {}
    for row in rows:
        names = row.get("Names") or []
        if names:
            out[names[0]] = str(row.get("State", "unknown"))
    return out


def wait_gone(podman: Podman, name: str, timeout: float) -> bool:
    """Wait for a container (--rm) to exit and remove itself."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if podman.run("container", "exists", name).returncode == 1:
            return True
        time.sleep(0.1)
    return False


def remove(podman: Podman, name: str) -> None:
    """Stop (SIGTERM, then SIGKILL after 3 s) and remove; missing is fine."""
    proc = podman.run("rm", "--force", "--ignore", "--time", "3", name)
    if proc.returncode != 0:
        raise HelperError(f"cannot remove container {name}: {_last_line(proc.stderr)}")


def log_tail(log_path: Path, lines: int = 3) -> str:
    """The last lines the server wrote, from the k8s-file log, joined on one line."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    texts = []
    for raw in data.splitlines():
        # k8s-file: "<timestamp> <stream> <F|P> <text>"
        parts = raw.split(" ", 3)
        text = parts[3] if len(parts) == 4 else raw
        if text.strip():
            texts.append(_summarise(text.strip()))
    return " | ".join(texts[-lines:])


def _summarise(text: str) -> str:
    # The service logs JSON events; show the event and its reason, not the blob.
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return text[:300]
    if not isinstance(event, dict):
        return text[:300]
    reason = event.get("reason") or event.get("reasons") or ""
    return f"{event.get('event', '?')}: {reason}"[:300] if reason else str(event.get("event"))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:400] if lines else "no error message"


def discard(podman: Podman, name: str, log_file: Path) -> None:
    """Remove a container that will not serve, and its log: a failed mount leaves nothing."""
    with contextlib.suppress(HelperError):
        remove(podman, name)
    with contextlib.suppress(FileNotFoundError):
        log_file.unlink()


def log_tail_after_exit(log_file: Path) -> str:
    """The end of a container's log once it has stopped writing it."""
    # conmon writes the log as the server runs; give it a moment to flush the last lines.
    deadline = time.monotonic() + 2.0
    tail = log_tail(log_file)
    while not tail and time.monotonic() < deadline:
        time.sleep(0.1)
        tail = log_tail(log_file)
    return tail
