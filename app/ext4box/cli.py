"""The `ext4box` command: serve an image over FUSE, or read it offline.

Every failure the user can cause (bad path, not ext4, corrupt image, bad
option) ends as one `ext4box: error: ...` line and exit status 1; usage errors
exit 2 (argparse's convention). No traceback reaches the terminal.

This module parses arguments and dispatches; the handlers of serve, policy
check and the host helper's commands are in cli_commands.py, the offline
commands' work (open_image, path resolution, inspect/ls/cat) in offline.py,
extract in extract.py, and all raise the CliError that main() prints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ext4box import __version__, mount_helper
from ext4box import log as logsetup
from ext4box.cli_commands import (
    cmd_broker,
    cmd_doctor,
    cmd_list,
    cmd_mount,
    cmd_policy_check,
    cmd_serve,
    cmd_service,
    cmd_umount,
)
from ext4box.extract import cmd_extract
from ext4box.offline import EXIT_OK, CliError, cmd_cat, cmd_inspect, cmd_ls

EXIT_ERROR = 1


# -- argument parsing ----------------------------------------------------------

POLICY_DIR_HELP = "policy directory (default: /etc/ext4box/policy.d)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the examples in each epilog as written; wrap everything else."""


def _command(
    commands: argparse._SubParsersAction, name: str, summary: str, examples: str
) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with copy-pasteable examples."""
    return commands.add_parser(
        name,
        help=summary,
        description=summary[:1].upper() + summary[1:] + ".",
        epilog="examples:\n" + examples.rstrip(),
        formatter_class=HelpFormatter,
    )


def _server_options(text: str) -> tuple[str, ...]:
    from ext4box.policy.server_options import ServerOptionError, parse_server_options

    try:
        return parse_server_options(text)
    except ServerOptionError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _image(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="an ext4 image file (or block device)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ext4box",
        description="A memory-safe ext4 implementation served through FUSE.",
        epilog="examples:\n"
        "  ext4box inspect disk.img\n"
        "  ext4box serve disk.img /mnt/disk -o ro\n"
        "  ext4box mount /srv/images/a.img /mnt/a --ro\n"
        "  ext4box doctor /mnt/a\n"
        "  ext4box disk.img /mnt/disk -o ro     # mount(8)'s helper form: serve\n"
        "  mount -t fuse.ext4box disk.img /mnt/disk -o ro,appliance   # the appliance\n"
        "\nRun `ext4box COMMAND --help` for a command's options and examples.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ext4box {__version__}")
    parser.add_argument(
        "--log-level",
        choices=logsetup.LEVELS,
        help="log verbosity (env: EXT4BOX_LOG_LEVEL; default: warning on a terminal,"
        " the command's own otherwise)",
    )
    parser.add_argument(
        "--log-format",
        choices=logsetup.FORMATS,
        help="log lines as JSON or short human lines (env: EXT4BOX_LOG_FORMAT, set to json in"
        " the container image; default: auto, human on a terminal, JSON otherwise)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _command(
        commands, "serve",
        "mount IMAGE on MOUNTPOINT, serve it in the background once the mount is live",
        "  ext4box serve disk.img /mnt/disk              # read-only; returns once mounted\n"
        "  ext4box serve disk.img /mnt/disk -o rw        # read-write; umount /mnt/disk ends it\n"
        "  ext4box serve disk.img /mnt/disk -f           # stay in the foreground\n",
    )  # fmt: skip
    _image(serve)
    serve.add_argument(
        "mountpoint", metavar="MOUNTPOINT", help="an existing directory, or /dev/fd/N"
    )
    serve.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: ro, rw, noexec, allow_other; relatime (default), strictatime,"
        " noatime, nodiratime and their negations, lazytime (default: ro;"
        " always nosuid,nodev); fstab-only options (defaults, noauto, nofail, _netdev,"
        " user, x-*) are ignored; backend=native (default) or backend=pyfuse3 picks"
        " the FUSE transport; transport=auto (default: FUSE over io_uring when the"
        " kernel's enable_uring is on), uring or dev picks the native backend's loop;"
        " writeback_cache (native, rw) lets the kernel's page cache collect small"
        " writes (docs/status.md says what it trades)",
    )
    serve.add_argument(
        "-f", "--foreground", action="store_true",
        help="serve in this process until unmounted or signalled, logging to stderr"
        " (default: return once the mount is live and serve in the background; under"
        " systemd, with NOTIFY_SOCKET set, always foreground and READY=1 once live)",
    )  # fmt: skip
    serve.add_argument(
        "--debug", action="store_true",
        help="debug logs and one line per FUSE request (default: off)",
    )
    serve.set_defaults(handler=cmd_serve, default_level="info")

    inspect = _command(
        commands, "inspect", "summarise the superblock and features, no mount",
        "  ext4box inspect disk.img\n",
    )  # fmt: skip
    _image(inspect)
    inspect.set_defaults(handler=cmd_inspect)

    ls = _command(
        commands, "ls", "list a directory of the image, no mount",
        "  ext4box ls disk.img\n  ext4box ls disk.img /etc -l\n",
    )  # fmt: skip
    _image(ls)
    ls.add_argument(
        "path", metavar="PATH", nargs="?", default="/",
        help="directory (or file) inside the image (default: /)",
    )  # fmt: skip
    ls.add_argument(
        "-l", dest="long", action="store_true",
        help="long listing: mode, links, owner, size, time (default: names only)",
    )  # fmt: skip
    ls.set_defaults(handler=cmd_ls)

    cat = _command(
        commands, "cat", "write a file of the image to stdout, no mount",
        "  ext4box cat disk.img /etc/hostname\n",
    )  # fmt: skip
    _image(cat)
    cat.add_argument("path", metavar="PATH", help="file inside the image")
    cat.set_defaults(handler=cmd_cat)

    extract = _command(
        commands, "extract", "copy a subtree of the image out, no mount",
        "  ext4box extract disk.img /etc ./etc-copy\n",
    )  # fmt: skip
    _image(extract)
    extract.add_argument("path", metavar="PATH", help="file or directory inside the image")
    extract.add_argument(
        "dest", metavar="DEST", help="host path: a new name, or an existing directory to copy into"
    )
    extract.set_defaults(handler=cmd_extract)

    policy = _command(
        commands, "policy", "mount policy tools",
        "  ext4box policy check disk.img --policy policy/ --user alice\n",
    )  # fmt: skip
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = _command(
        policy_commands, "check", "explain the policy decision for IMAGE",
        "  ext4box policy check /srv/images/a.img --user alice --mountpoint /mnt/a\n"
        "  ext4box policy check disk.img --policy ./policy.d --mode rw\n",
    )  # fmt: skip
    _image(check)
    check.add_argument("--user", metavar="NAME", help="whose request to judge (default: you)")
    check.add_argument(
        "--mode", choices=("ro", "rw"), default="ro", help="access asked for (default: ro)"
    )
    check.add_argument(
        "--mountpoint", metavar="DIR", help="where it would be mounted (default: not checked)"
    )
    check.add_argument("--policy", metavar="DIR", help=POLICY_DIR_HELP)
    check.set_defaults(handler=cmd_policy_check)

    mount = _command(
        commands, "mount",
        "mount IMAGE on MOUNTPOINT through the sandboxed server, if policy allows",
        "  ext4box mount /srv/images/a.img /mnt/a          # read-only\n"
        "  ext4box mount /srv/images/a.img /mnt/a --rw\n"
        "  ext4box mount /srv/images/a.img /mnt/a --rw -o usrquota,noatime\n"
        "  ext4box mount /srv/images/a.img /mnt/a --handoff-connect /run/ext4box/server.sock\n",
    )  # fmt: skip
    _image(mount)
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    access = mount.add_mutually_exclusive_group()
    access.add_argument(
        "--ro", dest="mode", action="store_const", const="ro", help="read-only (the default)"
    )
    access.add_argument(
        "--rw", dest="mode", action="store_const", const="rw",
        help="read-write, if a policy rule allows it",
    )  # fmt: skip
    mount.add_argument("--policy", metavar="DIR", help=POLICY_DIR_HELP)
    mount.add_argument(
        "-o", dest="server_options", type=_server_options, default=(), metavar="OPTIONS",
        help="server options, if the policy's rule allows them: usrquota|quota,grpquota,"
        "prjquota (enforce limits; always allowed), noatime, strictatime, relatime,"
        " nodiratime and their negations, lazytime (default: none, the server's relatime;"
        " noatime, strictatime and nodiratime only where the rule lists them)",
    )
    mount.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS",
        help="how long to wait for the server to become ready (default: 30)",
    )  # fmt: skip
    # Deployments (compose/, docs in README "Deployments"): a server someone else runs.
    meet = mount.add_mutually_exclusive_group()
    meet.add_argument("--handoff-listen", metavar="SOCKET",
                      help="listen on SOCKET for an already running server instead of"
                      " starting a container (default: start a container)")  # fmt: skip
    meet.add_argument(
        "--handoff-connect",
        metavar="SOCKET",
        help="connect to a server listening on SOCKET, e.g. a systemd socket unit"
        " (default: start a container)",
    )
    mount.add_argument(
        "--server-uid",
        type=int,
        metavar="UID",
        help="the uid the server runs as (required with --handoff-listen; with"
        " --handoff-connect, default: the listener must be root)",
    )
    mount.add_argument(
        "--foreground",
        action="store_true",
        help="stay until SIGTERM/SIGINT or the server exits, then unmount (default: return"
        " once mounted)",
    )
    # info: the policy decision is always logged (JSON when stderr is not a terminal).
    mount.set_defaults(handler=cmd_mount, mode="ro", default_level="info")

    umount = _command(
        commands, "umount", "unmount an ext4box mount and stop its server",
        "  ext4box umount /mnt/a\n",
    )  # fmt: skip
    umount.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the image is mounted")
    umount.set_defaults(handler=cmd_umount, default_level="info")

    listing = _command(
        commands, "list", "show active ext4box mounts (root: every user's)",
        "  ext4box list\n  ext4box list --json\n",
    )  # fmt: skip
    listing.add_argument("--json", action="store_true", help="one JSON array (default: a table)")
    listing.set_defaults(handler=cmd_list)

    broker = _command(
        commands, "broker",
        "the root daemon that mounts for ordinary users (systemd, or --foreground)",
        "  ext4box broker --foreground\n"
        "  ext4box broker --foreground --socket /tmp/broker.sock --policy /etc/ext4box/policy.d\n",
    )  # fmt: skip
    broker.add_argument(
        "--foreground", action="store_true",
        help="listen on --socket yourself (default: take the socket from systemd)",
    )  # fmt: skip
    broker.add_argument(
        "--socket", metavar="PATH",
        help="with --foreground (default: /run/ext4box/broker.sock)",
    )  # fmt: skip
    broker.add_argument("--policy", metavar="DIR", help=POLICY_DIR_HELP)
    broker.add_argument(
        "--state-dir", metavar="DIR",
        help="where mounts are recorded (default: /run/ext4box/mounts)",
    )  # fmt: skip
    broker.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS",
        help="how long to wait for each server (default: %(default)s)",
    )  # fmt: skip
    broker.set_defaults(handler=cmd_broker, default_level="info")

    doctor = _command(
        commands, "doctor", "check what `ext4box mount` needs, one line per check",
        "  ext4box doctor\n  ext4box doctor /mnt/a     # also the mountpoint's propagation\n",
    )  # fmt: skip
    doctor.add_argument(
        "mountpoint", metavar="MOUNTPOINT", nargs="?",
        help="also check this mountpoint (default: none)",
    )  # fmt: skip
    doctor.add_argument("--policy", metavar="DIR", help=POLICY_DIR_HELP)
    doctor.set_defaults(handler=cmd_doctor)

    # The in-container entrypoint: main() dispatches it before parsing; it is
    # registered only so that it is a known choice, and has no help line.
    service = commands.add_parser("service", add_help=False)
    service.add_argument("service_args", nargs=argparse.REMAINDER)
    service.set_defaults(handler=cmd_service)
    return parser


def _command_names(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["service"]:
        # The service parses its own options (argparse would take its
        # --options for ours) and configures its own logging.
        from ext4box.service.main import main as service_main

        return service_main(argv[1:])
    parser = build_parser()
    if mount_helper.is_helper_form(argv, _command_names(parser)):
        try:
            argv = mount_helper.translate(argv)
        except mount_helper.HelperFormError as err:
            print(f"ext4box: error: {err}", file=sys.stderr)
            return EXIT_ERROR
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        fmt = logsetup.resolve_format(args.log_format)
    except ValueError as err:
        parser.error(str(err))
    # Offline commands stay quiet unless asked: their output is the point. On
    # a terminal every command does: its human lines say what happened.
    level = args.log_level or ("debug" if debug else None)
    if level is None and not os.environ.get("EXT4BOX_LOG_LEVEL"):
        level = getattr(args, "default_level", "warning")
        if fmt == "human":
            level = logsetup.TERMINAL_LEVEL
    try:
        logsetup.setup(level, fmt)
    except ValueError as err:
        parser.error(str(err))
    from ext4box.ext4.format.errors import Ext4Error
    from ext4box.helper.errors import HelperError

    try:
        return int(args.handler(args))
    except CliError as err:
        print(f"ext4box: error: {err}", file=sys.stderr)
    except Ext4Error as err:
        print(f"ext4box: error: {err}", file=sys.stderr)
    except HelperError as err:
        # Any helper step a command forgot to translate: still one line.
        print(f"ext4box: error: {err.line}", file=sys.stderr)
    except BrokenPipeError:
        # `ext4box cat ... | head`: the reader left; not an error of ours.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    return EXIT_ERROR
