"""The offline commands' image side: open an image, resolve a path in it, inspect/ls/cat.

`ext4box extract` lives in extract.py. Failures become CliError: one
`ext4box: error: ...` line printed by cli.main, then exit status 1.
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ext4box.ext4.format.inode import Inode
    from ext4box.ext4.read.filesystem import Filesystem
    from ext4box.iomap.engine import IOMapEngine

EXIT_OK = 0
ROOT_INO = 2
MAX_SYMLINK_FOLLOWS = 40  # as the kernel's MAXSYMLINKS
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
    from ext4box.ext4.format.errors import Corrupt, Ext4Error, NotExt4, Unsupported
    from ext4box.ext4.opening import open_filesystem
    from ext4box.iomap.engine import IOMapEngine

    try:
        dev = BlockDevice.open(path, writable=writable)
    except OSError as err:
        raise CliError(f"cannot open image {path}: {err.strerror}") from None
    except ValueError as err:  # neither a regular file nor a block device
        raise CliError(f"cannot use image {path}: {err}") from None
    try:
        try:
            fs = open_filesystem(dev, readonly=not writable)
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
    from ext4box.ext4.format.errors import NotADirectory, NotFound

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
        for chunk in file_chunks(engine, inode):
            out.write(chunk)
        out.flush()
    return EXIT_OK


def file_chunks(engine: IOMapEngine, inode: Inode) -> Iterator[bytes]:
    pos = 0
    while pos < inode.size:
        chunk = engine.read(inode, pos, COPY_CHUNK)
        if not chunk:
            break
        yield chunk
        pos += len(chunk)
