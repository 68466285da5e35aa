"""`ext4box service`: the in-container entrypoint.

    ext4box service [--handoff-fd N | --handoff-socket PATH] [--allow-privileged]
    ext4box service --self-report [--allow-privileged]
    ext4box service --self-test [--allow-privileged]
    ext4box service --version

Start-up order, each step before the next may begin:
  1. inspect and log the sandbox; refuse if it is weaker than configured;
  2. receive /dev/fuse and the image over the hand-off socket and verify them
     (ext4box.service.receive);
  3. serve the FUSE session on those fds, then report READY to the helper.
The service never opens a host path: everything it touches arrives as an fd.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time

from ext4box import __version__, handoff_protocol
from ext4box.service import receive, sandbox

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_SANDBOX = 3
EXIT_HANDOFF = 4
EXIT_SERVE = 5
EXIT_SELFTEST = 1  # --self-test: a forbidden operation succeeded

# podman run --preserve-fds=1 places the helper's socket at fd 3.
DEFAULT_HANDOFF_FD = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ext4box service", description="serve one ext4 image handed over as fds"
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--self-report", action="store_true", help="print the sandbox report as JSON and exit"
    )
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="attempt operations the sandbox must deny (both stages), report JSON, exit 1 if"
        " any succeeded",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--handoff-fd", type=int, default=None, metavar="N")
    source.add_argument("--handoff-socket", default=None, metavar="PATH")
    parser.add_argument(
        "--allow-privileged",
        action="store_true",
        help="serve even when capabilities, no_new_privs, seccomp or netns are missing",
    )
    parser.add_argument("--timeout", type=float, default=handoff_protocol.DEFAULT_TIMEOUT)
    parser.add_argument(
        "--connect-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --handoff-socket: keep retrying while nobody listens there yet (compose and"
        " Kubernetes start the server and the helper in no particular order)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        print(f"ext4box {__version__}")
        return EXIT_OK
    try:
        report = sandbox.inspect()
        weaknesses = sandbox.check(report, allow_privileged=args.allow_privileged)
    except sandbox.SandboxViolation as exc:
        if args.self_report:
            print(json.dumps(_report_dict(report, exc.reasons, refused=True)))
        _log("sandbox_refused", reasons=list(exc.reasons))
        print(f"ext4box service: {exc}", file=sys.stderr)
        return EXIT_SANDBOX
    except sandbox.SandboxError as exc:
        print(f"ext4box service: cannot inspect the sandbox: {exc}", file=sys.stderr)
        return EXIT_SANDBOX
    if args.self_report:
        print(json.dumps(_report_dict(report, weaknesses, refused=False)))
        return EXIT_OK
    if args.self_test:
        from ext4box.service import selftest

        results, ok = selftest.run()
        results["sandbox"] = _report_dict(report, weaknesses, refused=False)
        print(json.dumps(results))
        return EXIT_OK if ok else EXIT_SELFTEST
    _log("sandbox", **report.as_dict(), weaknesses=list(weaknesses))
    return _serve_handoff(args)


def _serve_handoff(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        sock = _handoff_socket(args)
    except (OSError, handoff_protocol.HandoffError) as exc:
        print(f"ext4box service: no hand-off socket: {exc}", file=sys.stderr)
        return EXIT_HANDOFF
    with sock:
        try:
            received = receive.receive_handoff(sock, timeout=args.timeout)
        except handoff_protocol.HandoffError as exc:
            _log("handoff_refused", reason=exc.reason, errno=exc.errno)
            print(f"ext4box service: hand-off refused: {exc.reason}", file=sys.stderr)
            return EXIT_HANDOFF
        request = received.request
        _log(
            "handoff",
            version=received.version,
            mode=request.mode.name.lower(),
            image_kind=request.image_kind.name.lower(),
            image_size=request.image_size,
            options=list(request.options),
            refused_features=list(request.refused_features),
            server_options=list(request.server_options),
            seconds=round(time.monotonic() - started, 3),
        )
        # Imported here: --version/--self-report need none of the image-serving stack.
        from ext4box.service.serve import serve_fds

        def ready() -> None:
            receive.send_ready(sock)
            _log("ready", seconds=round(time.monotonic() - started, 3))

        writable = request.mode is handoff_protocol.Mode.RW
        # Imported here: --version/--self-report must work without cffi.
        from ext4box.service import libseccomp, lockdown

        def confine() -> None:
            # Stage 2: from here on only the fds already held are usable.
            status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                lockdown.lock_down(writable=writable)
                state = _seccomp_state(status_fd)  # read through the held fd
            finally:
                os.close(status_fd)
            _log("stage2", seconds=round(time.monotonic() - started, 3), **state)
            # The refused features are judged by serve_fds, on the superblock it parses.

        try:
            lockdown.prepare()
            return serve_fds(received, ready, confine=confine)
        except libseccomp.SeccompError as exc:
            received.close()
            reason = f"cannot install the stage-2 seccomp filter: {exc}"
            handoff_protocol.reply_error(sock, errno.EPERM, reason)
            print(f"ext4box service: {reason}", file=sys.stderr)
            return EXIT_SANDBOX
        except Exception as exc:  # report any start-up failure to the helper
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            handoff_protocol.reply_error(sock, getattr(exc, "errno", None) or errno.EIO, reason)
            _log("serve_failed", reason=reason)
            print(f"ext4box service: {reason}", file=sys.stderr)
            return EXIT_SERVE


def _handoff_socket(args: argparse.Namespace) -> socket.socket:
    if args.handoff_socket is not None:
        deadline = time.monotonic() + max(0.0, args.connect_wait)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(args.timeout)
                sock.connect(args.handoff_socket)
                return sock
            except OSError as exc:
                sock.close()
                # Not there yet / not listening yet: the helper may start after us.
                waiting = exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
                if not waiting or time.monotonic() >= deadline:
                    raise
            time.sleep(0.1)
    fd = DEFAULT_HANDOFF_FD if args.handoff_fd is None else args.handoff_fd
    sock = socket.socket(fileno=fd)
    try:
        handoff_protocol.check_socket(sock)
    except handoff_protocol.HandoffError:
        sock.detach()  # not ours to close: the caller passed a wrong fd
        raise
    return sock


def _report_dict(
    report: sandbox.SandboxReport, weaknesses: tuple[str, ...], *, refused: bool
) -> dict[str, object]:
    out = report.as_dict()
    out["weaknesses"] = list(weaknesses)
    out["refused"] = refused
    out["version"] = __version__
    return out


def _seccomp_state(status_fd: int) -> dict[str, object]:
    """Seccomp fields of /proc/self/status, read through an fd opened earlier."""
    text = os.pread(status_fd, sandbox.MAX_STATUS_BYTES, 0).decode("ascii", "replace")
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Seccomp", "Seccomp_filters"):
            fields[key.lower()] = int(value.strip() or 0)
    return fields


def _log(event: str, **fields: object) -> None:
    # One JSON object per line on stderr: podman's log captures it verbatim.
    print(json.dumps({"event": event, "service": "ext4box", **fields}), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
