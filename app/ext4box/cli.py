"""The `ext4box` command: serve an image over FUSE, or read it offline.

Every failure the user can cause (bad path, not ext4, corrupt image, bad
option) ends as one `ext4box: error: ...` line and exit status 1; usage errors
exit 2 (argparse's convention). No traceback reaches the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ext4box import __version__
from ext4box import log as logsetup

if TYPE_CHECKING:
    from ext4box.ext4.filesystem import Filesystem
    from ext4box.ext4.inode import Inode
    from ext4box.iomap.engine import IOMapEngine

EXIT_OK = 0
EXIT_ERROR = 1
ROOT_INO = 2
MAX_SYMLINK_FOLLOWS = 40  # as the kernel's MAXSYMLINKS
MAX_EXTRACT_DEPTH = 400  # stays well inside Python's recursion limit
COPY_CHUNK = 1024 * 1024


class CliError(Exception):
    """One line for stderr, then exit 1."""


# -- opening -------------------------------------------------------------------


@contextlib.contextmanager
def open_image(path: str, *, writable: bool = False) -> Iterator[tuple[Filesystem, IOMapEngine]]:
    """(Filesystem, IOMapEngine) over an image, read-only unless `writable`, closed on exit.

    Closing a writable filesystem commits and marks the image clean.
    """
    from ext4box.blockdev import BlockDevice
    from ext4box.ext4.errors import Corrupt, Ext4Error, NotExt4, Unsupported
    from ext4box.ext4.filesystem import Filesystem
    from ext4box.iomap.engine import IOMapEngine

    try:
        dev = BlockDevice.open(path, writable=writable)
    except OSError as err:
        raise CliError(f"cannot open image {path}: {err.strerror}") from None
    except ValueError as err:  # neither a regular file nor a block device
        raise CliError(f"cannot use image {path}: {err}") from None
    try:
        try:
            fs = Filesystem.open(dev, readonly=not writable)
        except NotExt4 as err:
            raise CliError(f"{path}: not an ext2/3/4 filesystem: {err}") from None
        except Corrupt as err:
            raise CliError(f"{path}: corrupt filesystem: {err}") from None
        except Unsupported as err:
            raise CliError(f"{path}: {err}") from None
        except Ext4Error as err:
            raise CliError(f"{path}: {err}") from None
        try:
            yield fs, IOMapEngine(fs, fs.dev)
        finally:
            fs.close()
    finally:
        dev.close()


# -- path resolution -----------------------------------------------------------


def resolve(fs: Filesystem, path: bytes, *, follow_final: bool) -> int:
    """The inode a path names inside the image, resolving as the kernel would.

    Symlinks are followed for intermediate components (and the last one if
    asked), relative to the directory holding them or to the image root when
    absolute; ".." of the root is the root, so nothing escapes the image.
    """
    from ext4box.ext4.errors import NotADirectory, NotFound

    pending = [part for part in reversed(path.split(b"/")) if part]
    current = ROOT_INO
    follows = 0
    while pending:
        name = pending.pop()
        if name == b".":
            continue
        try:
            child = fs.lookup(current, name)
        except NotFound:
            raise CliError(f"{os.fsdecode(path)}: no such file or directory") from None
        except NotADirectory:
            raise CliError(f"{os.fsdecode(path)}: not a directory") from None
        if name != b".." and (pending or follow_final) and fs.inode(child).is_symlink:
            follows += 1
            if follows > MAX_SYMLINK_FOLLOWS:
                raise CliError(
                    f"{path.decode(errors='replace')}: too many levels of symbolic links"
                )
            target = fs.readlink(child)
            if target.startswith(b"/"):
                current = ROOT_INO
            pending.extend(part for part in reversed(target.split(b"/")) if part)
            continue
        current = child
    return current


def _display(name: bytes) -> str:
    return os.fsdecode(name)


# -- inspect -------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    with open_image(args.image) as (fs, _):
        sb = fs.sb
        rows = [
            ("volume name", sb.volume_name or "<none>"),
            ("uuid", str(uuid.UUID(bytes=sb.uuid))),
            ("block size", str(sb.block_size)),
            ("blocks", f"{sb.blocks_count} ({sb.free_blocks_count} free)"),
            ("inodes", f"{sb.inodes_count} ({sb.free_inodes_count} free)"),
            ("inode size", str(sb.inode_size)),
            ("groups", str(sb.group_count)),
            ("blocks per group", str(sb.blocks_per_group)),
            ("inodes per group", str(sb.inodes_per_group)),
            ("features", " ".join(sb.feature_names()) or "<none>"),
        ]
        width = max(len(label) for label, _ in rows) + 1
        for label, value in rows:
            print(f"{label + ':':<{width}} {value}")
    return EXIT_OK


# -- ls ------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    path = os.fsencode(args.path)
    with open_image(args.image) as (fs, _):
        # Like ls(1): -l describes a symlink itself, a plain listing follows it.
        ino = resolve(fs, path, follow_final=not args.long)
        inode = fs.inode(ino)
        out = sys.stdout.buffer
        if not inode.is_dir:
            out.write(_ls_line(fs, ino, path.rstrip(b"/").rsplit(b"/", 1)[-1], args.long))
            return EXIT_OK
        items = sorted(
            (item for item in fs.readdir(ino) if item.name not in (b".", b"..")),
            key=lambda item: item.name,
        )
        for item in items:
            out.write(_ls_line(fs, item.ino, item.name, args.long))
    return EXIT_OK


def _ls_line(fs: Filesystem, ino: int, name: bytes, long: bool) -> bytes:
    if not long:
        return name + b"\n"
    inode = fs.inode(ino)
    if stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
        size = f"{os.major(inode.rdev)}, {os.minor(inode.rdev)}"
    else:
        size = str(inode.size)
    line = (
        f"{stat.filemode(inode.mode)} {inode.links_count:>3} {inode.uid:>5} {inode.gid:>5} "
        f"{size:>10} {_format_time(inode.mtime_ns)} "
    ).encode()
    line += name
    if inode.is_symlink:
        line += b" -> " + fs.readlink(ino)
    return line + b"\n"


def _format_time(ns: int) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(ns // 1_000_000_000))
    except (OverflowError, OSError, ValueError):
        return "????-??-?? ??:??"


# -- cat -----------------------------------------------------------------------


def cmd_cat(args: argparse.Namespace) -> int:
    with open_image(args.image) as (fs, engine):
        ino = resolve(fs, os.fsencode(args.path), follow_final=True)
        inode = fs.inode(ino)
        if inode.is_dir:
            raise CliError(f"{args.path}: is a directory")
        if not inode.is_reg:
            raise CliError(f"{args.path}: not a regular file")
        out = sys.stdout.buffer
        for chunk in _file_chunks(engine, inode):
            out.write(chunk)
        out.flush()
    return EXIT_OK


def _file_chunks(engine: IOMapEngine, inode: Inode) -> Iterator[bytes]:
    pos = 0
    while pos < inode.size:
        chunk = engine.read(inode, pos, COPY_CHUNK)
        if not chunk:
            break
        yield chunk
        pos += len(chunk)


# -- extract -------------------------------------------------------------------


@dataclass
class _Extraction:
    fs: Filesystem
    engine: IOMapEngine
    root_fd: int
    as_root: bool = field(default_factory=lambda: os.geteuid() == 0)
    # ext4 inode → path (relative to root_fd) of its first copy, for hard links.
    first_copies: dict[int, bytes] = field(default_factory=dict)
    dirs_seen: set[int] = field(default_factory=set)
    problems: int = 0


_ZERO_CHUNK = bytes(COPY_CHUNK)


def cmd_extract(args: argparse.Namespace) -> int:
    source = os.fsencode(args.path)
    with open_image(args.image) as (fs, engine):
        ino = resolve(fs, source, follow_final=False)
        base = source.rstrip(b"/").rsplit(b"/", 1)[-1]
        dest = os.path.abspath(args.dest)
        if os.path.isdir(dest):
            parent, name = dest, base
        else:
            parent, name = os.path.split(dest)
            name = os.fsencode(name)
            if not os.path.isdir(parent):
                raise CliError(f"{parent}: no such directory")
        root_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            job = _Extraction(fs, engine, root_fd)
            if not name:  # the image root into an existing directory: merge
                job.dirs_seen.add(ino)
                _extract_children(job, ino, root_fd, b"", 1)
            else:
                _extract_node(job, ino, root_fd, name, name, 0)
        finally:
            os.close(root_fd)
    if job.problems:
        raise CliError(f"{job.problems} entr{'y' if job.problems == 1 else 'ies'} not extracted")
    return EXIT_OK


def _warn(job: _Extraction, where: bytes, why: str) -> None:
    job.problems += 1
    print(f"ext4box: warning: {_display(where)}: {why}", file=sys.stderr)


def _safe_name(name: bytes) -> bool:
    # A corrupt directory could hold names that would climb out of DEST.
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


def _extract_children(job: _Extraction, dir_ino: int, dir_fd: int, rel: bytes, depth: int) -> None:
    from ext4box.ext4.errors import Ext4Error

    try:
        items = [item for item in job.fs.readdir(dir_ino) if item.name not in (b".", b"..")]
    except Ext4Error as err:
        _warn(job, rel or b".", str(err))
        return
    for item in items:
        child_rel = rel + b"/" + item.name if rel else item.name
        _extract_node(job, item.ino, dir_fd, item.name, child_rel, depth)


def _extract_node(
    job: _Extraction, ino: int, parent_fd: int, name: bytes, rel: bytes, depth: int
) -> None:
    from ext4box.ext4.errors import Ext4Error

    if not _safe_name(name):
        _warn(job, rel, "unsafe name in image, skipped")
        return
    try:
        inode = job.fs.inode(ino)
        if inode.is_dir:
            _extract_dir(job, inode, parent_fd, name, rel, depth)
        elif ino in job.first_copies:
            os.link(
                job.first_copies[ino],
                name,
                src_dir_fd=job.root_fd,
                dst_dir_fd=parent_fd,
                follow_symlinks=False,
            )
        else:
            _extract_leaf(job, inode, parent_fd, name)
            if inode.links_count > 1:
                job.first_copies[ino] = rel
    except Ext4Error as err:
        _warn(job, rel, str(err))
    except OSError as err:
        _warn(job, rel, err.strerror or str(err))


def _extract_dir(
    job: _Extraction,
    inode: Inode,
    parent_fd: int,
    name: bytes,
    rel: bytes,
    depth: int,
) -> None:
    if inode.ino in job.dirs_seen:
        _warn(job, rel, f"directory inode {inode.ino} seen twice (loop in image), skipped")
        return
    if depth >= MAX_EXTRACT_DEPTH:
        _warn(job, rel, f"deeper than {MAX_EXTRACT_DEPTH} levels, skipped")
        return
    job.dirs_seen.add(inode.ino)
    os.mkdir(name, 0o700, dir_fd=parent_fd)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    try:
        _extract_children(job, inode.ino, fd, rel, depth + 1)
        # Mode and times last: a read-only mode would block the children, and
        # creating them would touch the times.
        if job.as_root:
            os.fchown(fd, inode.uid, inode.gid)
        os.fchmod(fd, stat.S_IMODE(inode.mode))
        os.utime(fd, ns=(inode.atime_ns, inode.mtime_ns))
    finally:
        os.close(fd)


def _extract_leaf(job: _Extraction, inode: Inode, parent_fd: int, name: bytes) -> None:
    mode = inode.mode
    times = (inode.atime_ns, inode.mtime_ns)
    if stat.S_ISREG(mode):
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent_fd,
        )
        try:
            _copy_file(job, inode, fd)
            if job.as_root:
                os.fchown(fd, inode.uid, inode.gid)
            # setuid/setgid bits from an image are not worth trusting on the host.
            os.fchmod(fd, stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))
            os.utime(fd, ns=times)
        finally:
            os.close(fd)
        return
    if stat.S_ISLNK(mode):
        os.symlink(job.fs.readlink(inode.ino), name, dir_fd=parent_fd)
    elif stat.S_ISFIFO(mode):
        os.mkfifo(name, stat.S_IMODE(mode), dir_fd=parent_fd)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        if not job.as_root:
            raise OSError(0, "device nodes need root to be extracted")
        os.mknod(name, mode, inode.rdev, dir_fd=parent_fd)
    else:
        raise OSError(0, f"{stat.filemode(mode)[0]!r} files (sockets) are not extracted")
    if job.as_root:
        os.chown(name, inode.uid, inode.gid, dir_fd=parent_fd, follow_symlinks=False)
    if not stat.S_ISLNK(mode):
        os.chmod(name, stat.S_IMODE(mode), dir_fd=parent_fd, follow_symlinks=False)
    os.utime(name, ns=times, dir_fd=parent_fd, follow_symlinks=False)


def _copy_file(job: _Extraction, inode: Inode, fd: int) -> None:
    for chunk in _file_chunks(job.engine, inode):
        if chunk == _ZERO_CHUNK[: len(chunk)]:
            os.lseek(fd, len(chunk), os.SEEK_CUR)  # keep holes sparse
            continue
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
    os.ftruncate(fd, inode.size)


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
        help="with --handoff-listen: the uid the server must connect as",
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
