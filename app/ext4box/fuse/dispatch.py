"""Which handler answers each FUSE opcode, and how its bytes become an Operations call.

`ROUTES` is the table: opcode, the fixed-size structure its body starts with
(its size is the minimum body length the session checks), and the handler.
A handler takes (node id, caller, body) — caller is (uid, gid, pid) — calls
operations.Operations, and returns the reply payload (bytes or a list of
buffers), or NO_REPLY for the requests the kernel expects no answer to. It
raises FuseError for an error reply. Opcodes not in the table get ENOSYS.

STATX (7.39) and COPY_FILE_RANGE_64 (7.45) are newer than the installed
header and the minor INIT answers (7.38); the 6.18 kernel sends them anyway,
and they are answered here (protocol.NEWER_LAYOUTS).
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ext4box.fuse import protocol as p
from ext4box.fuse.attr_replies import pack_attr_out, pack_entry, pack_statx_out
from ext4box.fuse.attrs import Attributes
from ext4box.fuse.changes import SetattrRequest
from ext4box.fuse.errors import FuseError
from ext4box.fuse.negotiate import Agreed
from ext4box.fuse.operations import Operations
from ext4box.fuse.protocol import InitFlag, Layout, Opcode
from ext4box.fuse.request_records import Context, OpenResult

Caller = tuple[int, int, int]  # uid, gid, pid
Payload = bytes | memoryview | list[bytes] | None
Handler = Callable[[int, Caller, bytes], Payload]

# The answer to FORGET, BATCH_FORGET and INTERRUPT: nothing at all.
NO_REPLY = None
EMPTY = b""

_ALIGN = 8
_PADDING = tuple(bytes(n) for n in range(_ALIGN))  # NULs after a name, by count


@dataclass(frozen=True, slots=True)
class Route:
    opcode: Opcode
    request: Layout | None  # the fixed part of the body (None: names or nothing)
    handler: str  # method name of Dispatcher


ROUTES: tuple[Route, ...] = (
    Route(Opcode.LOOKUP, None, "lookup"),
    Route(Opcode.FORGET, p.FORGET_IN, "forget"),
    Route(Opcode.BATCH_FORGET, p.BATCH_FORGET_IN, "batch_forget"),
    Route(Opcode.GETATTR, p.GETATTR_IN, "getattr"),
    Route(Opcode.STATX, p.STATX_IN, "statx"),
    Route(Opcode.SETATTR, p.SETATTR_IN, "setattr"),
    Route(Opcode.READLINK, None, "readlink"),
    Route(Opcode.SYMLINK, None, "symlink"),
    Route(Opcode.MKNOD, p.MKNOD_IN, "mknod"),
    Route(Opcode.MKDIR, p.MKDIR_IN, "mkdir"),
    Route(Opcode.UNLINK, None, "unlink"),
    Route(Opcode.RMDIR, None, "rmdir"),
    Route(Opcode.RENAME, p.RENAME_IN, "rename"),
    Route(Opcode.RENAME2, p.RENAME2_IN, "rename2"),
    Route(Opcode.LINK, p.LINK_IN, "link"),
    Route(Opcode.OPEN, p.OPEN_IN, "open"),
    Route(Opcode.CREATE, p.CREATE_IN, "create"),
    Route(Opcode.TMPFILE, p.CREATE_IN, "tmpfile"),
    Route(Opcode.READ, p.READ_IN, "read"),
    Route(Opcode.WRITE, p.WRITE_IN, "write"),
    Route(Opcode.FLUSH, p.FLUSH_IN, "flush"),
    Route(Opcode.RELEASE, p.RELEASE_IN, "release"),
    Route(Opcode.FSYNC, p.FSYNC_IN, "fsync"),
    Route(Opcode.STATFS, None, "statfs"),
    Route(Opcode.SETXATTR, None, "setxattr"),  # fixed part's size depends on SETXATTR_EXT
    Route(Opcode.GETXATTR, p.GETXATTR_IN, "getxattr"),
    Route(Opcode.LISTXATTR, p.GETXATTR_IN, "listxattr"),
    Route(Opcode.REMOVEXATTR, None, "removexattr"),
    Route(Opcode.OPENDIR, p.OPEN_IN, "opendir"),
    Route(Opcode.READDIR, p.READ_IN, "readdir"),
    Route(Opcode.READDIRPLUS, p.READ_IN, "readdirplus"),
    Route(Opcode.RELEASEDIR, p.RELEASE_IN, "releasedir"),
    Route(Opcode.FSYNCDIR, p.FSYNC_IN, "fsync"),
    Route(Opcode.ACCESS, p.ACCESS_IN, "access"),
    Route(Opcode.INTERRUPT, p.INTERRUPT_IN, "interrupt"),
    Route(Opcode.SYNCFS, p.SYNCFS_IN, "syncfs"),
    Route(Opcode.FALLOCATE, p.FALLOCATE_IN, "fallocate"),
    Route(Opcode.LSEEK, p.LSEEK_IN, "lseek"),
    Route(Opcode.COPY_FILE_RANGE, p.COPY_FILE_RANGE_IN, "copy_file_range"),
    Route(Opcode.COPY_FILE_RANGE_64, p.COPY_FILE_RANGE_IN, "copy_file_range_64"),
    Route(Opcode.IOCTL, p.IOCTL_IN, "ioctl"),
    Route(Opcode.DESTROY, None, "destroy"),
)

# ext4 directory entry file type → DT_* of getdents (0: DT_UNKNOWN).
_FTYPE_TO_DT = {1: 8, 2: 4, 3: 2, 4: 6, 5: 1, 6: 12, 7: 10}


def _split_name(body: bytes, start: int = 0) -> tuple[bytes, int]:
    """The NUL-terminated name at `start`, and where the next field begins."""
    end = body.find(b"\0", start)
    if end < 0:
        raise FuseError(errno.EINVAL)
    return body[start:end], end + 1




class Dispatcher:
    """The handlers of ROUTES over one Operations, for one negotiated connection."""

    def __init__(self, ops: Operations, agreed: Agreed) -> None:
        self.ops = ops
        self.agreed = agreed
        self.dont_mask = agreed.has(InitFlag.DONT_MASK)
        self.killpriv_v2 = agreed.has(InitFlag.HANDLE_KILLPRIV_V2)
        self.setxattr_in_size = (p.SETXATTR_IN.size if agreed.has(InitFlag.SETXATTR_EXT)
                                 else p.SETXATTR_IN_COMPAT_SIZE)  # fmt: skip
        self.no_opendir = agreed.has(InitFlag.NO_OPENDIR_SUPPORT)
        self.writeback_cache = agreed.has(InitFlag.WRITEBACK_CACHE)
        # READ replies are made here, page-aligned so the data can come straight
        # from the device (iomap/direct_io.py), and reused: each reply is a view
        # of it, written before the loop reads the next request. A transport
        # that answers requests out of order must not use `read` as it is.
        self.read_buffer = memoryview(mmap.mmap(-1, agreed.max_write + mmap.PAGESIZE))

    def table(self) -> dict[int, tuple[int, Handler]]:
        """opcode → (minimum body length, bound handler)."""
        return {route.opcode: (route.request.size if route.request else 0,
                               getattr(self, route.handler)) for route in ROUTES}  # fmt: skip

    def _context(self, caller: Caller, umask: int) -> Context:
        uid, gid, pid = caller
        return Context(uid, gid, pid, umask if self.dont_mask else None)

    def _kill(self, flag_set: bool) -> bool | None:
        # Without HANDLE_KILLPRIV_V2 the kernel says nothing: Operations decides.
        return flag_set if self.killpriv_v2 else None

    # -- names -------------------------------------------------------------------

    def lookup(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        name, _ = _split_name(body)
        return pack_entry(self.ops.lookup(nodeid, name))

    def forget(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        (nlookup,) = p.FORGET_IN.unpack_from(body)
        self.ops.forget(nodeid, nlookup)
        return NO_REPLY

    def batch_forget(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        (count,) = p.BATCH_FORGET_IN.unpack_from(body)
        start, size = p.BATCH_FORGET_IN.size, p.FORGET_ONE.size
        count = min(count, (len(body) - start) // size)  # never past the body
        for index in range(count):
            node, nlookup = p.FORGET_ONE.unpack_from(body, start + index * size)
            self.ops.forget(node, nlookup)
        return NO_REPLY

    def getattr(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        return pack_attr_out(self.ops.getattr(nodeid))

    def statx(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        # Everything is cheap to fill, so sx_mask (what the caller wants) is not consulted.
        return pack_statx_out(self.ops.getattr(nodeid))

    def readlink(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        return self.ops.readlink(nodeid)

    def setattr(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        (valid, _fh, size, _owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
         mode, uid, gid) = p.SETATTR_IN.unpack_from(body)
        now = time.time_ns()
        request = SetattrRequest(
            mode=mode if valid & p.FATTR_MODE else None,
            uid=uid if valid & p.FATTR_UID else None,
            gid=gid if valid & p.FATTR_GID else None,
            size=size if valid & p.FATTR_SIZE else None,
            atime_ns=(now if valid & p.FATTR_ATIME_NOW else atime * 1_000_000_000 + atimensec)
            if valid & p.FATTR_ATIME else None,
            mtime_ns=(now if valid & p.FATTR_MTIME_NOW else mtime * 1_000_000_000 + mtimensec)
            if valid & p.FATTR_MTIME else None,
            ctime_ns=ctime * 1_000_000_000 + ctimensec if valid & p.FATTR_CTIME else None,
            kill_suidgid=self._kill(bool(valid & p.FATTR_KILL_SUIDGID)),
            times_now=self._time_flush(valid) or not (
                (valid & p.FATTR_ATIME and not valid & p.FATTR_ATIME_NOW)
                or (valid & p.FATTR_MTIME and not valid & p.FATTR_MTIME_NOW)),
        )  # fmt: skip
        return pack_attr_out(self.ops.setattr(nodeid, request, self._context(caller, 0)))

    def _time_flush(self, valid: int) -> bool:
        """The writeback cache's own mtime+ctime flush (fuse_flush_times): the
        times of write(2)s, "now" when they happened, which an append-only file
        allows. (utimensat with atime omitted and an explicit mtime looks the
        same and is let through on an append-only file, which ext4 refuses.)"""
        times = p.FATTR_MTIME | p.FATTR_CTIME
        others = (p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID | p.FATTR_SIZE | p.FATTR_ATIME
                  | p.FATTR_MTIME_NOW)
        return self.writeback_cache and valid & times == times and not valid & others

    # -- namespace changes -------------------------------------------------------

    def mknod(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        mode, rdev, umask = p.MKNOD_IN.unpack_from(body)
        name, _ = _split_name(body, p.MKNOD_IN.size)
        return pack_entry(self.ops.mknod(nodeid, name, mode, rdev, self._context(caller, umask)))

    def mkdir(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        mode, umask = p.MKDIR_IN.unpack_from(body)
        name, _ = _split_name(body, p.MKDIR_IN.size)
        return pack_entry(self.ops.mkdir(nodeid, name, mode, self._context(caller, umask)))

    def symlink(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        name, after = _split_name(body)
        target, _ = _split_name(body, after)
        return pack_entry(self.ops.symlink(nodeid, name, target, self._context(caller, 0)))

    def link(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        (old_node,) = p.LINK_IN.unpack_from(body)
        name, _ = _split_name(body, p.LINK_IN.size)
        return pack_entry(self.ops.link(old_node, nodeid, name))

    def unlink(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        name, _ = _split_name(body)
        self.ops.unlink(nodeid, name)
        return EMPTY

    def rmdir(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        name, _ = _split_name(body)
        self.ops.rmdir(nodeid, name)
        return EMPTY

    def rename(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        (new_dir,) = p.RENAME_IN.unpack_from(body)
        return self._rename(nodeid, new_dir, 0, body, p.RENAME_IN.size, caller)

    def rename2(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        new_dir, flags = p.RENAME2_IN.unpack_from(body)
        return self._rename(nodeid, new_dir, flags, body, p.RENAME2_IN.size, caller)

    def _rename(self, old_dir: int, new_dir: int, flags: int, body: bytes, at: int,
                caller: Caller) -> Payload:  # fmt: skip
        old_name, after = _split_name(body, at)
        new_name, _ = _split_name(body, after)
        # The caller owns the whiteout RENAME_WHITEOUT leaves behind.
        self.ops.rename(old_dir, old_name, new_dir, new_name, flags, self._context(caller, 0))
        return EMPTY

    # -- files -------------------------------------------------------------------

    def _open_out(self, result: OpenResult) -> bytes:
        # NOFLUSH: close(2) needs nothing from us, so the kernel sends no FLUSH.
        flags = p.FOPEN_NOFLUSH | (p.FOPEN_KEEP_CACHE if result.keep_cache else 0)
        if result.direct_io:
            flags |= p.FOPEN_DIRECT_IO
        return p.OPEN_OUT.pack(result.fh, flags)

    def open(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        flags, open_flags = p.OPEN_IN.unpack_from(body)
        kill = self._kill(bool(open_flags & p.OPEN_KILL_SUIDGID))
        return self._open_out(self.ops.open(nodeid, flags, self._context(caller, 0), kill))

    def create(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        flags, mode, umask, _open_flags = p.CREATE_IN.unpack_from(body)
        name, _ = _split_name(body, p.CREATE_IN.size)
        handle, attr = self.ops.create(nodeid, name, mode, flags, self._context(caller, umask))
        return [pack_entry(attr), self._open_out(handle)]

    def tmpfile(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        # open(O_TMPFILE) in directory `nodeid`; the name that follows is the
        # kernel's placeholder for a nameless dentry, so it is not read.
        flags, mode, umask, _open_flags = p.CREATE_IN.unpack_from(body)
        handle, attr = self.ops.tmpfile(nodeid, mode, flags, self._context(caller, umask))
        return [pack_entry(attr), self._open_out(handle)]

    def read(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        fh, offset, size = p.READ_IN.unpack_from(body)[:3]
        if size > agreed_read_limit(self.read_buffer):
            return self.ops.read(fh, offset, size)  # larger than negotiated: not our buffer
        return self.ops.read_into(fh, offset, size, self.read_buffer)

    def write(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        fh, offset, size, write_flags, _lock_owner, file_flags = p.WRITE_IN.unpack_from(body)
        if len(body) - p.WRITE_IN.size < size:
            raise FuseError(errno.EINVAL)
        # A view, not a second copy of up to 1 MiB: `body` is immutable bytes.
        data = memoryview(body)[p.WRITE_IN.size : p.WRITE_IN.size + size]
        written = self.ops.write(fh, offset, data,
                                 self._kill(bool(write_flags & p.WRITE_KILL_SUIDGID)),
                                 file_flags=file_flags,
                                 cached=bool(write_flags & p.WRITE_CACHE))
        return p.WRITE_OUT.pack(written)

    def flush(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        # Only for handles opened before FOPEN_NOFLUSH applied; ENOSYS stops it for good.
        raise FuseError(errno.ENOSYS)

    def release(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        (fh,) = p.RELEASE_IN.unpack_from(body)[:1]
        self.ops.release(fh)
        return EMPTY

    def fsync(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        self.ops.fsync(nodeid)
        return EMPTY

    def syncfs(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        self.ops.fsync()
        return EMPTY

    def fallocate(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        fh, offset, length, mode = p.FALLOCATE_IN.unpack_from(body)
        self.ops.fallocate(fh, mode, offset, length)
        return EMPTY

    def lseek(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        fh, offset, whence = p.LSEEK_IN.unpack_from(body)
        return p.LSEEK_OUT.pack(self.ops.seek(fh, offset, whence))

    def copy_file_range(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        # fuse_write_out: the count is 32 bits; one copy never exceeds MAX_RW_COUNT.
        return p.WRITE_OUT.pack(self._copy(body))

    def copy_file_range_64(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        return p.COPY_FILE_RANGE_OUT.pack(self._copy(body))

    def _copy(self, body: bytes) -> int:
        fh_in, off_in, _nodeid_out, fh_out, off_out, length, flags = (
            p.COPY_FILE_RANGE_IN.unpack_from(body))
        return self.ops.copy_file_range(fh_in, off_in, fh_out, off_out, length, flags)

    # -- directories -------------------------------------------------------------

    def opendir(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        if self.no_opendir:
            # With NO_OPENDIR_SUPPORT agreed, ENOSYS means "no handle needed,
            # don't ask again"; READDIR then names the directory by node id.
            raise FuseError(errno.ENOSYS)
        return p.OPEN_OUT.pack(self.ops.opendir(nodeid), 0)

    def releasedir(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        (fh,) = p.RELEASE_IN.unpack_from(body)[:1]
        self.ops.releasedir(fh)
        return EMPTY

    def readdir(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        return self._list(nodeid, body, plus=False)

    def readdirplus(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        return self._list(nodeid, body, plus=True)

    def _list(self, nodeid: int, body: bytes, *, plus: bool) -> Payload:
        fh, offset, size = p.READ_IN.unpack_from(body)[:3]
        if fh and not self.no_opendir:
            self.ops.dir_of_handle(fh)  # EBADF for a handle we never gave
        # Records collect in a list joined once: a names-only entry is the
        # hot path of a listing (~1 µs of bytearray growth and bookkeeping
        # each before), so it is one pack and one concatenation here.
        parts: list[bytes] = []
        room = size
        fixed = p.DIRENTPLUS.size if plus else p.DIRENT.size
        pack_dirent = p.DIRENT.pack
        dtypes = _FTYPE_TO_DT

        def emit(name: bytes, ino: int, file_type: int, attr: Attributes | None,
                 cookie: int) -> bool:  # fmt: skip
            nonlocal room
            length = len(name)
            padded = (fixed + length + _ALIGN - 1) & ~(_ALIGN - 1)
            if padded > room:
                return False
            room -= padded
            if attr is None:
                parts.append(pack_dirent(ino, cookie, length, dtypes.get(file_type, 0))
                             + name + _PADDING[padded - fixed - length])  # fmt: skip
                return True
            # S_IFMT >> 12 is the DT_* value
            dtype = (attr.mode >> 12) & 0xF
            parts.append(pack_entry(attr) + pack_dirent(ino, cookie, length, dtype)
                         + name + _PADDING[padded - fixed - length])  # fmt: skip
            return True

        self.ops.readdir(nodeid, offset, emit, plus=plus)
        return b"".join(parts)

    # -- filesystem and xattrs ---------------------------------------------------

    def statfs(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        info = self.ops.statfs()
        return p.STATFS_OUT.pack(info.blocks, info.blocks_free, info.blocks_avail, info.files,
                                 info.files_free, info.block_size, info.namelen, info.block_size)

    def setxattr(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        fixed = self.setxattr_in_size
        if len(body) < fixed:
            raise FuseError(errno.EINVAL)
        size, flags = p.SETXATTR_IN.struct.unpack_from(body.ljust(p.SETXATTR_IN.size, b"\0"))[:2]
        setxattr_flags = (p.SETXATTR_IN.unpack_from(body)[2]
                          if fixed == p.SETXATTR_IN.size else 0)  # fmt: skip
        name, after = _split_name(body, fixed)
        value = body[after : after + size]
        if len(value) != size:
            raise FuseError(errno.EINVAL)
        self.ops.setxattr(nodeid, name, value, flags,
                          kill_sgid=bool(setxattr_flags & p.SETXATTR_ACL_KILL_SGID))
        return EMPTY

    def getxattr(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        (size,) = p.GETXATTR_IN.unpack_from(body)
        name, _ = _split_name(body, p.GETXATTR_IN.size)
        return _sized(self.ops.getxattr(nodeid, name), size)

    def listxattr(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        (size,) = p.GETXATTR_IN.unpack_from(body)
        names = b"".join(name + b"\0" for name in self.ops.listxattr(nodeid))
        return _sized(names, size)

    def removexattr(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        name, _ = _split_name(body)
        self.ops.removexattr(nodeid, name)
        return EMPTY

    def access(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        (mask,) = p.ACCESS_IN.unpack_from(body)
        if not self.ops.access(nodeid, mask, self._context(caller, 0),
                               lambda: _groups_of(caller[2])):
            raise FuseError(errno.EACCES)
        return EMPTY

    def ioctl(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        _fh, flags, cmd, _arg, in_size, out_size = p.IOCTL_IN.unpack_from(body)
        if flags & p.IOCTL_UNRESTRICTED:
            raise FuseError(errno.ENOTTY)  # CUSE only: every ioctl we serve is sized
        data = body[p.IOCTL_IN.size : p.IOCTL_IN.size + in_size]
        if len(data) != in_size:
            raise FuseError(errno.EINVAL)
        out = self.ops.ioctl(nodeid, cmd, data, out_size, self._context(caller, 0))
        return [p.IOCTL_OUT.pack(0, 0, 0, 0), out]

    # -- session-level -----------------------------------------------------------

    def interrupt(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        # Every request is answered before the next is read, so the one to
        # interrupt is finished (or its answer is on its way): nothing to do.
        return NO_REPLY

    def destroy(self, nodeid: int, caller: Caller, body: bytes) -> Payload:
        self.ops.commit_tick()
        return EMPTY


def agreed_read_limit(buffer: memoryview) -> int:
    """The largest READ answered in `buffer`: a page is kept for O_DIRECT's rounding."""
    return len(buffer) - mmap.PAGESIZE


def _sized(value: bytes, size: int) -> bytes:
    """A getxattr/listxattr answer: the length for a size-0 probe, ERANGE if too small."""
    if size == 0:
        return p.GETXATTR_OUT.pack(len(value))
    if len(value) > size:
        raise FuseError(errno.ERANGE)
    return value


def _groups_of(pid: int) -> list[int]:
    """Supplementary groups of `pid` (ACCESS arrives only without default_permissions)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return list(os.getgroups()) if pid == os.getpid() else []
