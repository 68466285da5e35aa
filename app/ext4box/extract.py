"""`ext4box extract`: copy a subtree of an image out to the host, safely.

Names from the image never climb out of DEST, loops and overly deep trees are
skipped, hard links stay hard links, holes stay sparse; each entry that cannot
be copied is one warning line, and a non-zero count fails the command.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ext4box.offline import COPY_CHUNK, EXIT_OK, CliError, file_chunks, open_image, resolve

if TYPE_CHECKING:
    from ext4box.ext4.format.inode import Inode
    from ext4box.ext4.read.filesystem import Filesystem
    from ext4box.iomap.engine import IOMapEngine

MAX_EXTRACT_DEPTH = 400  # stays well inside Python's recursion limit


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
    from ext4box.ext4.format.errors import Ext4Error

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
    from ext4box.ext4.format.errors import Ext4Error

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
    for chunk in file_chunks(job.engine, inode):
        if chunk == _ZERO_CHUNK[: len(chunk)]:
            os.lseek(fd, len(chunk), os.SEEK_CUR)  # keep holes sparse
            continue
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
    os.ftruncate(fd, inode.size)


def _display(name: bytes) -> str:
    return os.fsdecode(name)
