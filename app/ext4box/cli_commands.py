"""What each non-offline `ext4box` command does once its arguments are parsed.

serve, policy check, and the host helper's mount, umount, list, broker,
doctor and service. cli.py builds the parser that names these handlers and
prints the CliError they raise; the offline commands' handlers live with their
work in offline.py and extract.py.
"""

from __future__ import annotations

import argparse
import os

from ext4box.offline import EXIT_OK, CliError, open_image

# -- serve ---------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from ext4box import daemon
    from ext4box.fuse.atime import take_atime_options
    from ext4box.fuse.fs_options import (
        apply_quota_options,
        take_quota_options,
        take_writeback_option,
    )
    from ext4box.fuse.mount import (
        MountConfig,
        MountSetupError,
        check_mountpoint,
        fuse_options,
        serve_pyfuse3,
        split_options,
        take_backend,
        take_transport,
    )
    from ext4box.fuse.operations import Operations
    from ext4box.iomap.direct_io import direct_io_for

    try:
        backend, user_options = take_backend(split_options(args.options))
        transport, user_options = take_transport(user_options)
        if backend == "pyfuse3" and transport != "auto":
            raise MountSetupError("transport= is for backend=native (pyfuse3 reads /dev/fuse)")
        quota_types, user_options = take_quota_options(user_options)
        writeback_cache, user_options = take_writeback_option(user_options)
        if writeback_cache and backend == "pyfuse3":
            raise CliError("-o writeback_cache needs the native FUSE transport, not pyfuse3")
        atime, user_options = take_atime_options(user_options)
        options = fuse_options(
            os.path.abspath(args.image),
            [*user_options, *atime.mount_flags],
            as_root=os.geteuid() == 0,
            debug=args.debug and backend == "pyfuse3",
        )
        check_mountpoint(args.mountpoint)
        config = MountConfig(args.mountpoint, options, backend, transport)
        # Type=notify waits for READY=1 from the process systemd started.
        foreground = args.foreground or daemon.under_systemd_notify()
        # Background: from here on the parent only waits for the child's verdict.
        readiness = daemon.Readiness() if foreground else daemon.background()
        with (open_image(args.image, writable="rw" in options) as (fs, engine),
              direct_io_for(fs.dev) as direct):
            engine.direct = direct  # large data runs bypass the image's page cache
            apply_quota_options(fs, quota_types)
            ops = Operations(fs, engine, atime, writeback_cache=writeback_cache)
            if backend == "pyfuse3":
                serve_pyfuse3(ops, config, on_ready=readiness.ready)
            else:
                from ext4box.direct_mount import serve_native

                serve_native(ops, config, os.path.abspath(args.image), trace=args.debug,
                             on_ready=readiness.ready)  # fmt: skip
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
    from ext4box.helper import broker_client, foreground, mount_command
    from ext4box.helper.errors import HelperError
    from ext4box.helper.external import Endpoint

    if broker_client.broker_available():
        try:
            print(broker_client.mount_for_cli(args), flush=True)
        except HelperError as err:
            raise CliError(err.line) from None
        return EXIT_OK
    broker_client.warn_if_advisory()
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
        result = mount_command.mount(
            args.image,
            args.mountpoint,
            mode=args.mode,
            policy_dir=args.policy,
            timeout=args.timeout,
            endpoint=endpoint,
            server_options=args.server_options,
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
        why = foreground.serve_until_stopped(result)
        print(f"unmounted {record.mountpoint} ({why})", flush=True)
    elif result.channel is not None:
        result.channel.close()
    return EXIT_OK


def cmd_umount(args: argparse.Namespace) -> int:
    from ext4box.helper import broker_client, state, umount_command
    from ext4box.helper.errors import HelperError

    try:
        own = state.find(os.path.realpath(os.path.abspath(args.mountpoint)))
        if broker_client.broker_available() and own is None:
            broker_client.umount(args.mountpoint)
            return EXIT_OK
        umount_command.umount(args.mountpoint)
    except HelperError as err:
        raise CliError(err.line) from None
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from ext4box.helper import broker_client, listing
    from ext4box.helper.errors import HelperError

    rows = listing.list_mounts()
    if broker_client.broker_available():
        try:
            rows = broker_client.list_mounts() + rows  # the broker's, then our own direct ones
        except HelperError as err:
            raise CliError(err.line) from None
    if args.json:
        print(listing.format_json(rows))
    elif rows:
        print(listing.format_table(rows))
    else:
        print("no mounts")
    return EXIT_OK


def cmd_broker(args: argparse.Namespace) -> int:
    from ext4box.helper import broker
    from ext4box.helper.errors import HelperError

    try:
        return broker.run(args.socket, args.policy, args.state_dir, args.timeout,
                          foreground=args.foreground)  # fmt: skip
    except HelperError as err:
        raise CliError(err.line) from None


def cmd_doctor(args: argparse.Namespace) -> int:
    from ext4box.helper import doctor

    return doctor.run_cli(args.mountpoint, policy_dir=args.policy)


def cmd_service(args: argparse.Namespace) -> int:
    from ext4box.service.main import main as service_main

    return service_main(list(args.service_args))
