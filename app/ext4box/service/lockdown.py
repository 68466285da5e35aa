"""Stage 2 of the sandbox: after the hand-off, only the fds held stay usable.

The OCI profile (seccomp/ext4box.json, stage 1) applies from container start
and must let Python start, read its modules and receive the fds. Once the
fds are received and verified, and before a single byte of the image is
parsed, the service stacks this tighter filter on top (filters only ever add
restrictions). It is an allowlist of what the FUSE server measurably does
(seccomp/measure.sh, "stage 2" section of seccomp/README.md); everything else
fails with EPERM. In particular:

- no path is ever resolved again: open/openat/openat2/creat, exec*, every
  *at/path call (mkdir, unlink, rename, link, chmod, truncate, statfs...) are
  denied, so the image cannot lead the process to any file it does not hold;
- no new sockets or pipes (socket, socketpair, pipe2, accept, connect, bind);
- no new processes: clone only with CLONE_THREAD and no namespace flag
  (clone3 answers ENOSYS so glibc falls back to clone, whose flags a filter
  can see); no mount, ptrace, bpf, keyctl, unshare, setns, io_uring,
  userfaultfd, perf_event_open, memfd_create, pidfd_getfd, ...

Callers must have imported every module and dlopen()ed every library they
will use before calling lock_down(): afterwards Python can open no file.
The native FUSE loop needs nothing more; with backend="pyfuse3", trio's run
loop must already be running (its wakeup socketpair and epoll fd are created
when it starts) and threads, epoll and socket reads are allowed too.
"""

from __future__ import annotations

import errno
import importlib
import os
import pkgutil

from ext4box.service import libseccomp
from ext4box.service.libseccomp import ACT_ALLOW, ArgCmp, Rule, act_errno

# Flags of clone(2) that create namespaces; CLONE_THREAD marks a thread.
CLONE_THREAD = 0x00010000
CLONE_NAMESPACES = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
PR_SET_NAME = 15
PR_GET_NAME = 16
FIONBIO = 0x5421
FIOCLEX = 0x5451
FIONCLEX = 0x5450

# Syscalls on descriptors the process already holds, memory, time and
# signals: what the native FUSE loop (ext4box.fuse.session: blocking readv,
# one writev per reply, poll only while a commit is pending) measurably does
# (seccomp/measure.sh), plus the close relatives a libc may pick instead
# (e.g. ppoll for poll, preadv for multi-segment reads).
READ_ONLY_SYSCALLS = (
    # I/O on held fds: /dev/fuse, the image, the hand-off socket (READY or
    # ERROR is its last message), stderr.
    "read", "readv", "pread64", "preadv", "preadv2", "write", "writev",
    "lseek", "close", "fstat", "newfstatat", "statx", "fcntl", "fstatfs",
    "sendmsg", "sendto", "poll", "ppoll",
    # memory
    "mmap", "munmap", "mprotect", "madvise", "mremap", "brk",
    # the allocator's and the interpreter's locks
    "futex",
    # signals (SIGTERM from catatonit ends the session between requests)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    # identity, time, randomness
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday",
    "getrandom",
    "exit", "exit_group",
)  # fmt: skip

# Only for backend="pyfuse3": trio's epoll loop, wakeup socketpair and worker
# threads (large reads), libfuse's poll of the fd.
PYFUSE3_SYSCALLS = (
    "recvmsg", "recvfrom", "getsockopt", "getsockname",
    "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "select", "pselect6",
    "set_robust_list", "get_robust_list", "rseq", "sched_yield", "sched_getaffinity",
    "membarrier",
)  # fmt: skip

# Added for read-write mounts: writes, early writeback (iomap/writeback.py) and
# flushes on the held image fd.
WRITE_SYSCALLS = ("pwrite64", "pwritev", "pwritev2", "sync_file_range", "fsync", "fdatasync",
                  "fallocate")


def rules(*, writable: bool, backend: str = "native") -> list[Rule]:
    names = READ_ONLY_SYSCALLS + (WRITE_SYSCALLS if writable else ())
    out = [Rule(name, ACT_ALLOW) for name in names]
    out += [
        # socket.setblocking() and os.set_inheritable() on held fds.
        Rule("ioctl", ACT_ALLOW, (ArgCmp(1, libseccomp.CMP_EQ, FIONBIO),)),
        Rule("ioctl", ACT_ALLOW, (ArgCmp(1, libseccomp.CMP_EQ, FIOCLEX),)),
        Rule("ioctl", ACT_ALLOW, (ArgCmp(1, libseccomp.CMP_EQ, FIONCLEX),)),
    ]
    if backend != "pyfuse3":
        # The native loop is one thread: no clone, no thread names, no tgkill.
        return out
    out += [Rule(name, ACT_ALLOW) for name in PYFUSE3_SYSCALLS]
    pid = os.getpid()
    out += [
        # A thread, never a process, never a namespace.
        Rule(
            "clone",
            ACT_ALLOW,
            (ArgCmp(0, libseccomp.CMP_MASKED_EQ, CLONE_THREAD | CLONE_NAMESPACES, CLONE_THREAD),),
        ),
        # glibc tries clone3 first and falls back to clone on ENOSYS.
        Rule("clone3", act_errno(errno.ENOSYS)),
        # Signals only to our own threads (pthread_kill, trio's wakeups).
        Rule("tgkill", ACT_ALLOW, (ArgCmp(0, libseccomp.CMP_EQ, pid),)),
        # Worker threads name themselves (trio: pthread_setname_np on self).
        Rule("prctl", ACT_ALLOW, (ArgCmp(0, libseccomp.CMP_EQ, PR_SET_NAME),)),
        Rule("prctl", ACT_ALLOW, (ArgCmp(0, libseccomp.CMP_EQ, PR_GET_NAME),)),
    ]
    return out


# Packages whose code runs after lock_down(): every module is imported up
# front, so a late `import` inside a function (the read-write facade, say)
# cannot fail once open() is denied.
_SERVING_PACKAGES = ("ext4box.ext4", "ext4box.iomap", "ext4box.fuse")
# Imported only for that backend: pyfuse3 and trio (whose import probes
# ctypes with `ldconfig -p`, a fork and exec the native server never needs).
_BACKEND_ONLY_MODULES = {"ext4box.fuse.pyfuse3_backend": "pyfuse3"}


def prepare(backend: str = "native") -> None:
    """Load what lock_down() and the server need while files can still be opened."""
    libseccomp.load_library()
    libseccomp.resolve("read")
    for package_name in _SERVING_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__, package_name + "."):
            if _BACKEND_ONLY_MODULES.get(module.name, backend) == backend:
                importlib.import_module(module.name)


def lock_down(*, writable: bool = False, backend: str = "native") -> None:
    """Install the stage-2 filter on every thread of this process.

    Raises libseccomp.SeccompError if it cannot be installed: the caller must
    then refuse to serve (untrusted bytes are parsed only under this filter).
    """
    libseccomp.install(act_errno(errno.EPERM), rules(writable=writable, backend=backend),
                       all_threads=True)
