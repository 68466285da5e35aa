"""One crash-consistency iteration: write, kill -9 the server, replay three ways, check.

    plan = plan_for("4k-csum", seed)
    result = run_iteration(plan, base_image, workdir)
    result.failures  # [] when the image kept every promise

An iteration copies a freshly made base image, serves it with
`ext4box serve -o rw`, runs the seeded workload (crash_workload) and kills
the server with SIGKILL after a random delay or as a random op starts (the
op is then in flight), aborting the FUSE connection. The crashed image is
then replayed on separate copies by ext4box (a read-write open and clean
close through the facade), by `e2fsck -E journal_only -y`, and by the kernel
(a rw loop mount and umount); after each, `e2fsck -fn` runs and debugfs reads
the tree back for the model checks (crash_verify).

What must hold: the model checks of STRICT_KINDS (fsynced data survives, no
file shows another file's or stale data) always. When the crashed image has a
journal and needs_recovery set, the journal promises a consistent
filesystem, so `e2fsck -fn` after every replay must exit 0 and every other
check must pass too. Without that (no journal, or a server that did not
journal the writes), repairs e2fsck would make are recorded as notes, not
failures: the report says how often they were needed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from crash_model import Model
from crash_verify import STRICT_KINDS, Finding, check, read_image
from crash_workload import Workload
from journal_support import opened

from support.images import dumpe2fs_header
from support.kernel import kernel_mount, why_no_kernel_mounts
from support.serve import ext4box_argv, served

REPLAYERS = ("ext4box", "e2fsck", "kernel")
# Another checkout's app/ directory to crash and replay instead of this one
# (e.g. `git archive HEAD app | tar -x -C /tmp/head` to compare with the last commit).
SERVER_APP_ENV = "EXT4BOX_CRASH_APP"
_WORKLOAD_TIMEOUT_S = 60.0  # a kill always lands well before this
_KILL_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    mkfs_args: tuple[str, ...]
    size_mb: int = 32

    @property
    def block_size(self) -> int:
        return int(self.mkfs_args[self.mkfs_args.index("-b") + 1])


VARIANTS = {v.name: v for v in (
    Variant("4k-csum", ("-b", "4096", "-O", "has_journal,metadata_csum,64bit")),
    Variant("4k-nocsum", ("-b", "4096", "-O", "has_journal,^metadata_csum,64bit")),
    Variant("1k-csum", ("-b", "1024", "-O", "has_journal,metadata_csum,64bit")),
    # Ordered writes without a journal: checked like the others, repairs are notes.
    Variant("4k-nojournal", ("-b", "4096", "-O", "^has_journal,metadata_csum,64bit")),
)}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything an iteration does is decided by these (kill timing is best effort)."""

    variant: str
    seed: int
    kill_mode: str  # "delay": after kill_at seconds; "ops": as op number kill_at starts
    kill_at: float
    replayers: tuple[str, ...] = REPLAYERS

    def repro(self) -> str:
        return f"{self.variant}:{self.seed}:{self.kill_mode}:{self.kill_at:g}:" + ",".join(
            self.replayers)

    @classmethod
    def parse(cls, text: str) -> Plan:
        variant, seed, mode, at, replayers = text.split(":")
        return cls(variant, int(seed), mode, float(at), tuple(replayers.split(",")))


def plan_for(variant: str, seed: int, *, max_delay_s: float = 1.0, max_ops: int = 250,
             kernel: bool = True) -> Plan:
    """The plan seed `seed` gives: half the kills after a delay, half as an op starts."""
    rng = random.Random(f"{variant}:{seed}:plan")
    if rng.random() < 0.5:
        mode, at = "delay", round(rng.uniform(0.0, max_delay_s), 3)
    else:
        mode, at = "ops", float(rng.randint(0, max_ops))
    replayers = REPLAYERS if kernel else tuple(r for r in REPLAYERS if r != "kernel")
    return Plan(variant, seed, mode, at, replayers)


# What e2fsck -n reports that a crash without a journal may leave and that costs
# nothing but a repair: an unprocessed orphan list (the kernel's ext4 leaves one
# too; the next mount frees it), blocks and inodes marked in use that nothing
# uses (leaks: bitmaps are written before the pointers), and summary counts.
# A '+' bitmap difference (in use but marked free) is real damage: the block
# could be handed out twice.
_BENIGN_LINES = re.compile(
    r"Deleted inode \d+ has zero dtime|Inodes that were part of a corrupted orphan linked"
    r"|Inode \d+ was part of the orphaned inode list|Fix\? no"
    r"|(Free blocks|Free inodes|Directories) count wrong"
    r"|^(Block|Inode) bitmap differences:[-\s\d()]*$|^[-\s\d()]+$")


@dataclass(slots=True)
class Fsck:
    returncode: int
    problems: list[str]  # what e2fsck would fix (its messages, without the pass headers)

    @property
    def clean(self) -> bool:
        return self.returncode == 0

    @property
    def verdict(self) -> str:
        """clean; leaks/orphans (only what _BENIGN_LINES explains); or damaged."""
        if self.clean:
            return "clean"
        if all(_BENIGN_LINES.search(line.strip()) for line in self.problems):
            return "leaks/orphans"
        return "damaged"


@dataclass(slots=True)
class ReplayOutcome:
    replayer: str
    skipped: str | None = None
    error: str | None = None
    fsck: Fsck | None = None
    findings: list[Finding] = field(default_factory=list)


@dataclass(slots=True)
class IterationResult:
    plan: Plan
    ops: int = 0
    fsyncs: int = 0
    survivors: int = 0
    has_journal: bool = False
    needs_recovery: bool = False
    before: Fsck | None = None
    replays: list[ReplayOutcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # the last ops before the kill
    full_history: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase

    @property
    def journal_case(self) -> bool:
        """The image promises consistency: it has a journal that needs replaying."""
        return self.has_journal and self.needs_recovery

    def report(self) -> str:
        lines = [f"crash iteration {self.plan.repro()}: {self.ops} ops, {self.fsyncs} fsyncs, "
                 f"{self.survivors} must-survive files, journal={self.has_journal} "
                 f"needs_recovery={self.needs_recovery}"]
        lines += [f"  FAIL {f}" for f in self.failures]
        lines += [f"  note {n}" for n in self.notes]
        if self.failures:
            lines.append("  last ops: " + "; ".join(self.history[-12:]))
            lines.append("  reproduce: .venv/bin/python bench/soak_crash.py --repro "
                         f"{self.plan.repro()}")
        return "\n".join(lines)


# ---- images ------------------------------------------------------------------


def make_base_image(variant: Variant, path: Path) -> Path:
    with path.open("wb") as image:
        image.truncate(variant.size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", *variant.mkfs_args,
                    str(path)], check=True, capture_output=True)
    return path


def fsck(image: Path) -> Fsck:
    result = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                            errors="replace", check=False)
    problems = [line for line in result.stdout.splitlines()
                if line.strip() and not line.startswith(("Pass ", f"{image}:", "e2fsck "))
                and not line.startswith("Warning: skipping journal recovery")]
    return Fsck(result.returncode, problems)


def _features(image: Path) -> set[str]:
    return set(dumpe2fs_header(image).get("Filesystem features", "").split())


# ---- the crash ---------------------------------------------------------------


class _Killer(threading.Thread):
    """Sends SIGKILL after a delay, or as soon as op number `at` starts."""

    def __init__(self, process: subprocess.Popen[bytes], plan: Plan) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.plan = plan
        self.fired = threading.Event()
        self._go = threading.Event()

    def run(self) -> None:
        if self.plan.kill_mode == "delay":
            self._go.wait(self.plan.kill_at)
        else:
            self._go.wait()
        self.fired.set()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def op_starting(self, number: int) -> None:
        if self.plan.kill_mode == "ops" and number >= self.plan.kill_at:
            self._go.set()
            # Yield the GIL to the killer; the op then issues its system calls while
            # the kill is on its way, so it is usually in flight when it lands.
            time.sleep(0)

    def now(self) -> None:
        self._go.set()


def _workload(variant: Variant, rng: random.Random, root: Path, model: Model) -> Workload:
    fs_units = (variant.size_mb << 20) // 512
    return Workload(rng, root, model, capacity_units=fs_units * 3 // 10,
                    big_xattr=1500 if variant.block_size >= 4096 else 600)


def _other_app() -> str | None:
    return os.environ.get(SERVER_APP_ENV) or None


def _server_argv(image: Path, mountpoint: Path) -> list[str]:
    app = _other_app()
    if app is None:
        return ext4box_argv(image, mountpoint, "rw")
    # env execs the server: the pid stays the one we kill.
    return ["env", f"PYTHONPATH={app}", sys.executable, "-m", "ext4box", "serve", "-f",
            str(image), str(mountpoint), "-o", "rw"]


def crash(plan: Plan, image: Path, work: Path, result: IterationResult) -> Model:
    """Run the workload on `image` until the kill; the model of what was done."""
    variant = VARIANTS[plan.variant]
    mountpoint = work / "mnt"
    model = Model()
    with served(image, mountpoint, _server_argv(image, mountpoint),
                expect_exit_zero=False) as handle:
        workload = _workload(variant, random.Random(f"{plan.seed}:workload"),
                             handle.mountpoint, model)
        killer = _Killer(handle.process, plan)
        killer.start()
        deadline = time.monotonic() + _WORKLOAD_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                killer.op_starting(result.ops)
                try:
                    workload.step()
                except OSError as err:
                    if not killer.fired.is_set():
                        code = handle.process.poll()
                        kind = "server_died" if code is not None else "op_error"
                        result.failures.append(
                            f"{kind}: {workload.history[-1:]} next op failed: {err!r} "
                            f"(server exit {code}): {handle.stderr_text()[-2000:]}")
                    break
                except Exception:  # a model or harness bug: report it with the seed
                    result.failures.append(f"workload_error: {traceback.format_exc()}")
                    break
                result.ops += 1
            else:
                result.failures.append("workload_timeout: the kill never stopped the workload")
        finally:
            killer.now()
            killer.join(_KILL_WAIT_S)
            workload.close_orphans()
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
        code = handle.process.returncode
        if code not in (-signal.SIGKILL, None) and not result.failures:
            result.failures.append(f"server_died: exit {code}: {handle.stderr_text()[-2000:]}")
        result.history = workload.history[-40:]
        result.full_history = list(workload.history)
    return model


# ---- replays -----------------------------------------------------------------


def _replay(replayer: str, image: Path, work: Path) -> None:
    if replayer == "ext4box" and _other_app() is not None:
        done = subprocess.run([sys.executable, "-c", _OPEN_CLOSE, str(image)],
                              env={**os.environ, "PYTHONPATH": _other_app() or ""},
                              capture_output=True, text=True, errors="replace", check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ext4box rw open/close failed: {done.stderr[-2000:]}")
    elif replayer == "ext4box":
        with opened(image, readonly=False):
            pass
    elif replayer == "e2fsck":
        done = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(image)],
                              capture_output=True, text=True, errors="replace", check=False)
        if done.returncode >= 4:
            raise RuntimeError(f"e2fsck -E journal_only exited {done.returncode}: "
                               f"{done.stdout}{done.stderr}")
    else:
        with kernel_mount(image, work / "kmnt", readonly=False):
            pass


_OPEN_CLOSE = """
import sys
from ext4box.ext4.opening import open_filesystem
from ext4box.blockdev import BlockDevice
from ext4box.ext4.read.filesystem import Filesystem
dev = BlockDevice.open(sys.argv[1], writable=True)
open_filesystem(dev, readonly=False).close()
dev.close()
"""


def _why_skip(replayer: str, result: IterationResult) -> str | None:
    if replayer != "kernel":
        return None
    reason = why_no_kernel_mounts()
    if reason is not None:
        return reason
    # A kernel with known bugs is not handed a damaged image to write to. Without a
    # journal, a crash leaves the orphan list to process (e2fsck -n reports it);
    # if no replay made the image clean, something else is damaged.
    if not result.journal_case and not any(
            r.fsck is not None and r.fsck.clean for r in result.replays):
        return "no journal, and no replay left an e2fsck-clean image"
    return None


def replay_and_check(plan: Plan, image: Path, model: Model, work: Path,
                     result: IterationResult) -> None:
    for replayer in plan.replayers:
        outcome = ReplayOutcome(replayer, skipped=_why_skip(replayer, result))
        result.replays.append(outcome)
        if outcome.skipped:
            continue
        copy = work / f"replay-{replayer}.img"
        started = time.monotonic()
        shutil.copyfile(image, copy)
        try:
            _replay(replayer, copy, work)
        except Exception as err:  # reported with the iteration, never lost
            outcome.error = f"{type(err).__name__}: {err}"
        result.phases[replayer] = time.monotonic() - started
        outcome.fsck = fsck(copy)
        try:
            tree = read_image(copy, work)
        except RuntimeError as err:
            outcome.findings = [Finding("unreadable", "", str(err))]
        else:
            outcome.findings = check(model, tree)
        copy.unlink()
        result.phases[f"{replayer}+check"] = time.monotonic() - started
        _judge(result, outcome)


def _judge(result: IterationResult, outcome: ReplayOutcome) -> None:
    strict = result.journal_case
    name = outcome.replayer
    if outcome.error:
        (result.failures if strict else result.notes).append(
            f"replay_error [{name}]: {outcome.error}")
    if outcome.fsck is not None and not outcome.fsck.clean:
        summary = "; ".join(outcome.fsck.problems[:6])
        (result.failures if strict else result.notes).append(
            f"fsck [{name}]: e2fsck -fn exit {outcome.fsck.returncode}: {summary}")
    for finding in outcome.findings:
        failing = strict or finding.kind in STRICT_KINDS
        (result.failures if failing else result.notes).append(f"[{name}] {finding}")


def run_iteration(plan: Plan, base: Path, work: Path,
                  keep_failed: Path | None = None) -> IterationResult:
    """Crash a copy of `base` per `plan` and check every replay; work is emptied after
    (a failing iteration's crashed image and history go to `keep_failed` first)."""
    started = time.monotonic()
    result = IterationResult(plan)
    work.mkdir(parents=True, exist_ok=True)
    image = work / "crashed.img"
    try:
        shutil.copyfile(base, image)
        model = crash(plan, image, work, result)
        result.phases["crash"] = time.monotonic() - started
        result.fsyncs = model.fsyncs
        result.survivors = len(model.survive)
        features = _features(image)
        result.has_journal = "has_journal" in features
        result.needs_recovery = "needs_recovery" in features
        result.before = fsck(image)
        replay_and_check(plan, image, model, work, result)
        if result.failures and keep_failed is not None:
            _keep(result, image, keep_failed)
    finally:
        for leftover in work.glob("*.img"):
            leftover.unlink()
        result.seconds = time.monotonic() - started
    return result


def _keep(result: IterationResult, image: Path, directory: Path) -> None:
    """Save the crashed image (before any replay) and the full op history."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = result.plan.repro().replace(":", "_").replace(",", "+")
    shutil.copyfile(image, directory / f"{stem}.img")
    (directory / f"{stem}.txt").write_text(result.report() + "\n\nall ops:\n"
                                           + "\n".join(result.full_history) + "\n")


def base_images(names: list[str], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return {n: make_base_image(VARIANTS[n], directory / f"base-{n}.img") for n in names}


def fast_scratch() -> str | None:
    """A tmpfs to work in when there is one with room (fsync is free there, which
    triples the iterations per minute), else None: the system's temp directory."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    return shm if st.f_bavail * st.f_frsize >= 1 << 30 else None


# ---- directed crashes ----------------------------------------------------------


def crash_after(image: Path, work: Path, steps: Callable[[Path], None]) -> None:
    """Serve `image` rw, run `steps(root)`, then kill -9 the server (nothing in flight)."""
    mountpoint = work / "mnt"
    with served(image, mountpoint, _server_argv(image, mountpoint),
                expect_exit_zero=False) as handle:
        try:
            steps(handle.mountpoint)
        finally:
            handle.process.send_signal(signal.SIGKILL)
            handle.process.wait()
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


def replayed_copy(replayer: str, image: Path, work: Path) -> tuple[Path, str | None]:
    """A copy of `image` replayed by `replayer`, and the replay's error if it failed."""
    copy = work / f"replay-{replayer}.img"
    shutil.copyfile(image, copy)
    try:
        _replay(replayer, copy, work)
    except Exception as err:  # the caller reports it
        return copy, f"{type(err).__name__}: {err}"
    return copy, None


def read_file(image: Path, path: str, work: Path) -> bytes | None:
    """A file's content as debugfs reads it, None if it does not exist."""
    out = work / "dumped"
    out.unlink(missing_ok=True)
    done = subprocess.run(["debugfs", "-R", f"dump /{path} {out}", str(image)],
                          capture_output=True, text=True, errors="replace", check=False)
    if not out.exists() or "not found" in done.stderr:
        return None
    data = out.read_bytes()
    out.unlink()
    return data


def image_flags(image: Path) -> tuple[bool, bool]:
    """(has_journal, needs_recovery) of an image."""
    features = _features(image)
    return "has_journal" in features, "needs_recovery" in features
