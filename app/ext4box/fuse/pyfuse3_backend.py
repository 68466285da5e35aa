"""The second FUSE backend: libfuse through pyfuse3 and trio, over the same Operations.

Selected with `ext4box serve ... -o backend=pyfuse3`. Each handler here only
translates: pyfuse3's arguments into an operations.Operations call, the
result into pyfuse3's types, FuseError into pyfuse3.FUSEError. libfuse
negotiates INIT itself (no FUSE_DONT_MASK, no FUSE_HANDLE_KILLPRIV_V2), so
the umask is already applied and suid/sgid clearing is decided by caller.

pyfuse3 (3.x) has no handlers for fallocate, lseek, copy_file_range, statx
or syncfs, so Operations.fallocate/seek/copy_file_range are not reachable
here: libfuse answers ENOSYS and the kernel falls back (EOPNOTSUPP for
fallocate, the whole file as data for SEEK_DATA/SEEK_HOLE, a splice copy,
no btime). The native backend serves them.
"""

from __future__ import annotations

import errno
import functools
import gc
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import ParamSpec, TypeVar

import pyfuse3
import trio

from ext4box.ext4.write.caller import Caller, acting_as
from ext4box.fuse.attrs import Attributes, entry_ids
from ext4box.fuse.changes import SetattrRequest
from ext4box.fuse.errors import FuseError
from ext4box.fuse.operations import Operations
from ext4box.fuse.request_records import Context, OpenResult
from ext4box.iomap.read_plan import ReadPlan
from ext4box.log import get_logger

log = get_logger("ext4box.fuse")

P = ParamSpec("P")
R = TypeVar("R")

# Plans with at least this many device bytes are executed in a worker thread:
# the trio loop keeps accepting requests (and the kernel's parallel
# readahead gets parallel preads) while the thread waits on the device.
# Not for O_DIRECT handles: there the thread hand-off only adds latency
# (bench, 1 MiB O_DIRECT reads of 256 MiB: 78-88% -> 90-93% of the kernel).
THREADED_READ_BYTES = 64 * 1024
POSIX_ACL_ACCESS = b"system.posix_acl_access"
# ext4's default commit interval: changes are made durable at least this often.
COMMIT_INTERVAL_S = 5.0


def _translated(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    @functools.wraps(handler)
    async def translate(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            ctx = next((arg for arg in (*args, *kwargs.values())
                        if isinstance(arg, pyfuse3.RequestContext)), None)
            if ctx is None:  # no ids: write, release... act as the opener or the fs
                return await handler(*args, **kwargs)
            # The caller's ids decide what it may allocate (reserved blocks, quota).
            with acting_as(Caller(ctx.uid, ctx.gid)):
                return await handler(*args, **kwargs)
        except FuseError as err:
            raise pyfuse3.FUSEError(err.errno) from None

    return translate


def entry_attributes(attr: Attributes) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = attr.ino
    out.generation = attr.generation
    out.entry_timeout = attr.entry_timeout
    out.attr_timeout = attr.attr_timeout
    out.st_mode = attr.mode
    out.st_nlink = attr.nlink
    out.st_uid = attr.uid
    out.st_gid = attr.gid
    out.st_rdev = attr.rdev
    out.st_size = attr.size
    out.st_blksize = attr.blksize
    out.st_blocks = attr.blocks
    out.st_atime_ns = attr.atime_ns
    out.st_mtime_ns = attr.mtime_ns
    out.st_ctime_ns = attr.ctime_ns
    out.st_birthtime_ns = attr.crtime_ns
    return out


def _context(ctx: pyfuse3.RequestContext) -> Context:
    return Context(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid)


def _file_info(result: OpenResult) -> pyfuse3.FileInfo:
    return pyfuse3.FileInfo(fh=result.fh, keep_cache=result.keep_cache)


class Pyfuse3Operations(pyfuse3.Operations):
    # FUSE_EXPORT_SUPPORT: "." and ".." lookups by node id (fuse/export.py).
    supports_dot_lookup = True
    # The kernel enforces POSIX ACLs (with default_permissions), as ext4 does.
    enable_acl = True

    def __init__(self, ops: Operations) -> None:
        super().__init__()
        self.ops = ops

    @_translated
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:  # fmt: skip
        attr = self.ops.lookup(parent_inode, name)
        out = entry_attributes(attr)
        # libfuse sends st_ino as both the node id and fuse_attr.ino: the root
        # (only a ".." lookup answers it) is node 1 and shows st_ino 1 until
        # its next GETATTR.
        out.st_ino, out.generation = entry_ids(attr)
        return out

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for node_id, nlookup in inode_list:
            self.ops.forget(node_id, nlookup)

    @_translated
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.ops.getattr(inode))

    @_translated
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.ops.readlink(inode)

    @_translated
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return _file_info(self.ops.open(inode, flags, _context(ctx)))

    @_translated
    async def read(self, fh: int, off: int, size: int) -> bytes:
        plan, direct = self.ops.read_plan(fh, off, size)
        if not direct and _device_bytes(plan) >= THREADED_READ_BYTES:
            return await trio.to_thread.run_sync(self.ops.execute_read, plan)
        return self.ops.execute_read(plan)

    @_translated
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return self.ops.write(fh, off, buf)
        finally:
            # Without HANDLE_KILLPRIV_V2 the kernel cleared the bits itself
            # (by SETATTR and REMOVEXATTR): it knows already.
            self.ops.changed_behind_kernel.clear()

    async def flush(self, fh: int) -> None:
        # close(2) is not a durability point on ext4 either, and there is
        # nothing else to do at a close: ENOSYS makes the kernel stop sending
        # FLUSH for good (one request less per close).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_translated
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.ops.fsync()

    @_translated
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.ops.fsync()

    @_translated
    async def release(self, fh: int) -> None:
        self.ops.release(fh)

    @_translated
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.ops.opendir(inode)

    @_translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        def emit(name: bytes, ino: int, file_type: int, attr: Attributes | None,
                 cookie: int) -> bool:  # fmt: skip
            assert attr is not None
            return bool(pyfuse3.readdir_reply(token, name, entry_attributes(attr), cookie))

        try:
            self.ops.readdir(self.ops.dir_of_handle(fh), start_id, emit, plus=True)
        finally:
            # libfuse's OPENDIR reply never lets the kernel cache a listing.
            self.ops.listings_to_drop.clear()

    async def releasedir(self, fh: int) -> None:
        self.ops.releasedir(fh)

    @_translated
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:  # fmt: skip
        handle, attr = self.ops.create(parent_inode, name, mode, flags, _context(ctx))
        return _file_info(handle), entry_attributes(attr)

    @_translated
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:  # fmt: skip
        return entry_attributes(self.ops.mknod(parent_inode, name, mode, rdev, _context(ctx)))

    @_translated
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:  # fmt: skip
        return entry_attributes(self.ops.mkdir(parent_inode, name, mode, _context(ctx)))

    @_translated
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:  # fmt: skip
        return entry_attributes(self.ops.symlink(parent_inode, name, target, _context(ctx)))

    @_translated
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:  # fmt: skip
        return entry_attributes(self.ops.link(inode, new_parent_inode, new_name))

    @_translated
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.ops.unlink(parent_inode, name)

    @_translated
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.ops.rmdir(parent_inode, name)

    @_translated
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self.ops.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_translated
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:  # fmt: skip
        request = SetattrRequest(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return entry_attributes(self.ops.setattr(inode, request, _context(ctx)))

    @_translated
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        info = self.ops.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = info.block_size
        data.f_frsize = info.block_size
        data.f_blocks = info.blocks
        data.f_bfree = info.blocks_free
        data.f_bavail = info.blocks_avail
        data.f_files = info.files
        data.f_ffree = info.files_free
        data.f_favail = info.files_free
        data.f_namemax = info.namelen
        return data

    @_translated
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # pyfuse3 answers size-0 probes and ERANGE from the returned value.
        return self.ops.getxattr(inode, name)

    @_translated
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.ops.listxattr(inode)

    @_translated
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:  # fmt: skip
        # pyfuse3 has already checked XATTR_CREATE / XATTR_REPLACE with getxattr.
        self.ops.setxattr(inode, name, value, kill_sgid=self._acl_kills_sgid(inode, name, ctx))

    def _acl_kills_sgid(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bool:
        """The kernel's FUSE_SETXATTR_ACL_KILL_SGID, which libfuse does not pass on:
        an access ACL set by a caller neither root (CAP_FSETID) nor in the file's
        group. The groups come from /proc; where it cannot be read (a sandbox),
        only the request's gid counts, so the bit is cleared rather than kept."""
        if name != POSIX_ACL_ACCESS or ctx.uid == 0:
            return False
        gid = self.ops.getattr(inode).gid
        if gid == ctx.gid:
            return False
        try:
            return gid not in pyfuse3.get_sup_groups(ctx.pid)
        except OSError:
            return True

    @_translated
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.ops.removexattr(inode, name)

    @_translated
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return self.ops.access(inode, mode, _context(ctx),
                               lambda: list(pyfuse3.get_sup_groups(ctx.pid)))


def _device_bytes(plan: ReadPlan) -> int:
    return sum(segment.length for segment in plan.segments)


# -- the session ---------------------------------------------------------------


def serve_mounted(ops: Operations, mountpoint: str, options: set[str], *,
                  unmount: bool, tune: Callable[[], bool] | None = None,
                  on_ready: Callable[[], None] | None = None,
                  probe: str | None = None) -> None:  # fmt: skip
    """Start libfuse on `mountpoint` (or /dev/fd/N), serve until unmounted or signalled.

    Raises RuntimeError when libfuse cannot start (it has said why on stderr).
    `unmount`: unmount at the end when we stopped for a signal. `on_ready`
    runs once a stat of `probe` (the resolved mountpoint) has come back
    through the mount, which the kernel holds until our INIT reply; without
    a probe path (/dev/fd/N), as soon as the loop runs.
    """
    pyfuse3.init(Pyfuse3Operations(ops), mountpoint, options)
    ready = None if on_ready is None else functools.partial(_announce_ready, on_ready, probe)
    try:
        trio.run(serve_until_unmounted, ops.commit_tick if ops.writable else None, tune, ready)
    finally:
        pyfuse3.close(unmount=unmount)


def start_on_fd(ops: Operations, fuse_fd: int) -> None:
    """pyfuse3 takes a mountpoint of /dev/fd/N as an already-mounted /dev/fuse fd."""
    pyfuse3.init(Pyfuse3Operations(ops), f"/dev/fd/{fuse_fd}", set())


async def serve_until_unmounted(commit: Callable[[], None] | None = None,
                                tune: Callable[[], bool] | None = None,
                                ready: Callable[[], Awaitable[None]] | None = None,
                                ) -> None:  # fmt: skip
    """Run pyfuse3's loop until the kernel unmounts or SIGINT/SIGTERM/SIGHUP arrives.

    `commit` (read-write mounts) runs every COMMIT_INTERVAL_S in the loop,
    between requests. `tune` adjusts the mount once the kernel has processed
    our FUSE_INIT reply (which would undo it).
    """
    # Everything alive now (modules, the opened filesystem) lives as long as
    # the session: out of the collector's sight, a full collection walks only
    # what requests create.
    gc.freeze()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        if commit is not None:
            nursery.start_soon(_commit_periodically, commit)
        if tune is not None:
            nursery.start_soon(_tune_after_init, tune)
        if ready is not None:
            nursery.start_soon(ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _announce_ready(on_ready: Callable[[], None], probe: str | None) -> None:
    if probe is not None:
        try:
            # In a thread: the stat waits for INIT, which this loop answers.
            await trio.to_thread.run_sync(os.stat, probe, abandon_on_cancel=True)
        except OSError as err:
            log.warning("mount did not answer", mountpoint=probe, why=err.strerror)
            return
    on_ready()


async def _tune_after_init(tune: Callable[[], bool]) -> None:
    # FUSE_INIT is the kernel's first request and is answered as soon as the loop
    # runs; its reply caps the read-ahead, so set it after that, and once more
    # later in case the reply was slow.
    for delay in (0.2, 1.0):
        await trio.sleep(delay)
        try:
            if not tune():
                return
        except Exception as err:  # tuning must never stop the server
            log.warning("tuning failed", exc_info=err)
            return


async def _commit_periodically(commit: Callable[[], None]) -> None:
    while True:
        await trio.sleep(COMMIT_INTERVAL_S)
        try:
            commit()
        except Exception as err:  # a failed commit must not stop the server
            log.error("commit failed", exc_info=err)


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("terminating", signal=signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def close_session() -> None:
    """End a session started with start_on_fd, never unmounting (closes the fd)."""
    pyfuse3.close(unmount=False)
