"""The `ext4box` command: serve an image over FUSE, or read it offline.

Every failure the user can cause (bad path, not ext4, corrupt image, bad
option) ends as one `ext4box: error: ...` line and exit status 1; usage errors
exit 2 (argparse's convention). No traceback reaches the terminal.

This module parses arguments and dispatches; the offline commands' work
(open_image, path resolution, inspect/ls/cat) is in offline.py, extract in
extract.py, and both raise the CliError that main() prints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ext4box import __version__
from ext4box import log as logsetup
from ext4box.extract import cmd_extract
from ext4box.offline import EXIT_OK, CliError, cmd_cat, cmd_inspect, cmd_ls, open_image

EXIT_ERROR = 1


# -- serve ---------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from ext4box.fuse.mount import (
        MountConfig,
        MountSetupError,
        check_mountpoint,
        fuse_options,
        serve,
        split_options,
    )
    from ext4box.fuse.ops import Ext4Operations

    try:
        options = fuse_options(
            os.path.abspath(args.image),
            split_options(args.options),
            as_root=os.geteuid() == 0,
            debug=args.debug,
        )
        check_mountpoint(args.mountpoint)
        with open_image(args.image, writable="rw" in options) as (fs, engine):
            serve(Ext4Operations(fs, engine), MountConfig(args.mountpoint, options))
    except MountSetupError as err:
        raise CliError(str(err)) from None
    return EXIT_OK


# -- policy --------------------------------------------------------------------


def cmd_policy_check(args: argparse.Namespace) -> int:
    from ext4box.policy.explain import explain_cli

    return explain_cli(
        args.image,
        user=args.user,
        mode=args.mode,
        mountpoint=args.mountpoint,
        policy_dir=args.policy,
    )


# -- host helper: mount, umount, list -------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    from ext4box.helper import commands
    from ext4box.helper.errors import HelperError
    from ext4box.helper.external import Endpoint

    endpoint = None
    if args.server_uid is not None and not 0 <= args.server_uid < 0xFFFFFFFF:
        raise CliError(f"--server-uid {args.server_uid} is not a uid (0 to 4294967294)")
    if args.handoff_listen and args.server_uid is None:
        raise CliError(
            "--handoff-listen needs --server-uid UID: only the server's uid may connect"
            " and receive /dev/fuse and the image"
        )
    if args.handoff_listen or args.handoff_connect:
        endpoint = Endpoint(
            path=args.handoff_listen or args.handoff_connect,
            listen=bool(args.handoff_listen),
            server_uid=args.server_uid,
        )
    elif args.foreground or args.server_uid is not None:
        raise CliError("--foreground and --server-uid need --handoff-listen or --handoff-connect")
    try:
        result = commands.mount(
            args.image,
            args.mountpoint,
            mode=args.mode,
            policy_dir=args.policy,
            timeout=args.timeout,
            endpoint=endpoint,
        )
    except HelperError as err:
        raise CliError(err.line) from None
    record = result.record
    server = f"server {record.container_id}" if endpoint else f"container {record.name}"
    print(
        f"mounted {record.image} on {record.mountpoint} ({record.mode}, {server},"
        f" ready in {result.ready_seconds:.2f} s)",
        flush=True,
    )
    if args.foreground:
        why = commands.serve_until_stopped(result)
        print(f"unmounted {record.mountpoint} ({why})", flush=True)
    elif result.channel is not None:
        result.channel.close()
    return EXIT_OK


def cmd_umount(args: argparse.Namespace) -> int:
    from ext4box.helper import commands
    from ext4box.helper.errors import HelperError

    try:
        commands.umount(args.mountpoint)
    except HelperError as err:
        raise CliError(err.line) from None
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from ext4box.helper import commands

    rows = commands.list_mounts()
    if args.json:
        print(commands.format_json(rows))
    elif rows:
        print(commands.format_table(rows))
    return EXIT_OK


def cmd_service(args: argparse.Namespace) -> int:
    from ext4box.service.main import main as service_main

    return service_main(list(args.service_args))


# -- argument parsing ----------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ext4box", description="A memory-safe ext4 implementation served through FUSE."
    )
    parser.add_argument("--version", action="version", version=f"ext4box {__version__}")
    parser.add_argument(
        "--log-level", choices=logsetup.LEVELS, help="log verbosity (env: EXT4BOX_LOG_LEVEL)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="mount IMAGE on MOUNTPOINT, in the foreground")
    serve.add_argument("image", metavar="IMAGE")
    serve.add_argument("mountpoint", metavar="MOUNTPOINT", help="a directory, or /dev/fd/N")
    serve.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="mount options: ro (default), rw, noexec, allow_other, noatime (always nosuid,nodev)",
    )
    serve.add_argument("--debug", action="store_true", help="debug logs and libfuse tracing")
    serve.set_defaults(handler=cmd_serve, default_level="info")

    inspect = commands.add_parser("inspect", help="summarise the superblock")
    inspect.add_argument("image", metavar="IMAGE")
    inspect.set_defaults(handler=cmd_inspect)

    ls = commands.add_parser("ls", help="list a directory of the image")
    ls.add_argument("image", metavar="IMAGE")
    ls.add_argument("path", metavar="PATH", nargs="?", default="/")
    ls.add_argument("-l", dest="long", action="store_true", help="long listing")
    ls.set_defaults(handler=cmd_ls)

    cat = commands.add_parser("cat", help="write a file of the image to stdout")
    cat.add_argument("image", metavar="IMAGE")
    cat.add_argument("path", metavar="PATH")
    cat.set_defaults(handler=cmd_cat)

    extract = commands.add_parser("extract", help="copy a subtree of the image out")
    extract.add_argument("image", metavar="IMAGE")
    extract.add_argument("path", metavar="PATH")
    extract.add_argument("dest", metavar="DEST")
    extract.set_defaults(handler=cmd_extract)

    policy = commands.add_parser("policy", help="mount policy tools")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    check = policy_commands.add_parser("check", help="explain the policy decision for IMAGE")
    check.add_argument("image", metavar="IMAGE")
    check.add_argument("--user")
    check.add_argument("--mode", choices=("ro", "rw"), default="ro")
    check.add_argument("--mountpoint")
    check.add_argument("--policy", metavar="DIR")
    check.set_defaults(handler=cmd_policy_check)

    mount = commands.add_parser(
        "mount", help="mount IMAGE on MOUNTPOINT through the sandboxed server, if policy allows"
    )
    mount.add_argument("image", metavar="IMAGE")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    access = mount.add_mutually_exclusive_group()
    access.add_argument("--ro", dest="mode", action="store_const", const="ro", help="(default)")
    access.add_argument("--rw", dest="mode", action="store_const", const="rw")
    mount.add_argument(
        "--policy", metavar="DIR", help="policy directory (default /etc/ext4box/policy.d)"
    )
    mount.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="wait for the server"
    )
    # Deployments (compose/, docs in README "Deployments"): a server someone else runs.
    meet = mount.add_mutually_exclusive_group()
    meet.add_argument("--handoff-listen", metavar="SOCKET",
                      help="listen on SOCKET for an already running server instead of"
                      " starting a container")  # fmt: skip
    meet.add_argument(
        "--handoff-connect",
        metavar="SOCKET",
        help="connect to a server listening on SOCKET (systemd socket unit)",
    )
    mount.add_argument(
        "--server-uid",
        type=int,
        metavar="UID",
        help="the uid the server runs as (required with --handoff-listen; with"
        " --handoff-connect the listener must be root unless this is given)",
    )
    mount.add_argument(
        "--foreground",
        action="store_true",
        help="stay until SIGTERM/SIGINT or the server exits, then unmount",
    )
    # info: the policy decision is always logged (JSON when stderr is not a terminal).
    mount.set_defaults(handler=cmd_mount, mode="ro", default_level="info")

    umount = commands.add_parser("umount", help="unmount an ext4box mount and stop its server")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.set_defaults(handler=cmd_umount, default_level="info")

    listing = commands.add_parser("list", help="show active ext4box mounts")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    listing.set_defaults(handler=cmd_list)

    service = commands.add_parser(
        "service", help="the in-container server (started by `ext4box mount`)", add_help=False
    )
    service.add_argument("service_args", nargs=argparse.REMAINDER)
    service.set_defaults(handler=cmd_service)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["service"]:
        # The service parses its own options (argparse would take its
        # --options for ours) and configures its own logging.
        from ext4box.service.main import main as service_main

        return service_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    # Offline commands stay quiet unless asked: their output is the point.
    level = args.log_level or ("debug" if debug else None)
    if level is None and not os.environ.get("EXT4BOX_LOG_LEVEL"):
        level = getattr(args, "default_level", "warning")
    try:
        logsetup.setup(level)
    except ValueError as err:
        parser.error(str(err))
    from ext4box.ext4.errors import Ext4Error

    try:
        return int(args.handler(args))
    except CliError as err:
        print(f"ext4box: error: {err}", file=sys.stderr)
    except Ext4Error as err:
        print(f"ext4box: error: {err}", file=sys.stderr)
    except BrokenPipeError:
        # `ext4box cat ... | head`: the reader left; not an error of ours.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    return EXIT_ERROR
