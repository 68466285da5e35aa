"""A seeded random write workload on a mounted filesystem, recorded in a crash Model.

Each `step()` picks one operation — create, random and sequential writes,
appends, truncates, renames (also over an existing file), unlinks (also of a
file kept open: an orphan), hard links, mkdir/rmdir/directory moves, xattrs,
fsync/fsyncdir — issues it with plain system calls, and keeps the model in
step (crash_model explains what is recorded before and after). Every write
covers whole 512-byte units of self-identifying content (crash_content).
The same seed gives the same sequence of operations.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from pathlib import Path

from crash_content import UNIT, units_bytes, xattr_value
from crash_model import ROOT, DirState, FileState, Link, Model

# (smallest, largest) unit counts of a write, with weights: single units and
# sub-block pieces (read-modify-write of a 4 KiB block), a few blocks, large runs.
_WRITE_SIZES = [((1, 1), 3), ((2, 7), 3), ((8, 64), 3), ((65, 512), 1)]
_XATTR_NAMES = ("user.a", "user.b", "user.big")
_MAX_DIRS = 10
_MAX_DEPTH = 3
_MAX_LINKS = 3
_MAX_ORPHANS = 3
_CHUNK_UNITS = 256  # sequential rewrites go out in 128 KiB writes


class Workload:
    def __init__(self, rng: random.Random, root: Path, model: Model, *,
                 capacity_units: int, big_xattr: int) -> None:
        self.rng = rng
        self.root = root
        self.model = model
        self.capacity_units = capacity_units  # keep clear of ENOSPC
        self.big_xattr = big_xattr  # the largest xattr value the block size fits
        self.history: list[str] = []
        self._ops: list[tuple[Callable[[], str | None], int]] = [
            (self.create, 8), (self.write_random, 10), (self.append, 6),
            (self.rewrite, 3), (self.truncate, 4), (self.rename_file, 4),
            (self.unlink, 3), (self.unlink_open, 1), (self.orphan_write, 2),
            (self.orphan_close, 1), (self.link, 2), (self.mkdir, 2), (self.rmdir, 1),
            (self.move_dir, 1), (self.set_xattr, 4), (self.remove_xattr, 1),
            (self.fsync, 8), (self.fsyncdir, 2),
        ]  # fmt: skip

    # ---- driver ------------------------------------------------------------

    def step(self) -> str:
        """Run one operation (retrying the pick until one applies); its description."""
        funcs, weights = zip(*self._ops, strict=True)
        for _ in range(100):
            op = self.rng.choices(funcs, weights)[0]
            description = op()
            if description is not None:
                self.history.append(description)
                return description
        raise AssertionError("no operation applies to the model")

    def close_orphans(self) -> None:
        for f in self.model.files.values():
            if f.orphan_fd is not None:
                with contextlib.suppress(OSError):  # the connection is gone
                    os.close(f.orphan_fd)
                f.orphan_fd = None

    # ---- helpers -------------------------------------------------------------

    def _abs(self, link: Link) -> Path:
        return self.root / self.model.path(link)

    def _dir_abs(self, did: int) -> Path:
        return self.root / self.model.dir_path(did)

    def _pick_file(self) -> FileState | None:
        files = self.model.linked_files()
        return self.rng.choice(files) if files else None

    def _pick_link(self, f: FileState) -> Link:
        return self.rng.choice(sorted(f.links))

    def _pick_dir(self, *, max_depth: int = _MAX_DEPTH) -> DirState:
        dirs = [d for d in self.model.live_dirs()
                if len(self.model.dir_chain(d.did)) <= max_depth]
        return self.rng.choice(sorted(dirs, key=lambda d: d.did))

    def _write_size(self) -> int:
        (low, high), = self.rng.choices([r for r, _ in _WRITE_SIZES],
                                        [w for _, w in _WRITE_SIZES])
        return self.rng.randint(low, high)

    def _room(self, units: int) -> bool:
        return self.model.live_units() + units <= self.capacity_units

    def _pwrite_units(self, fd: int, f: FileState, first: int, count: int) -> int:
        gen = self.model.new_gen()
        self.model.may_write(f, first, [gen] * count)
        data = units_bytes(f.fid, gen, first, count)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], first * UNIT + done)
        self.model.wrote(f, first, [gen] * count)
        return gen

    # ---- files ---------------------------------------------------------------

    def create(self) -> str | None:
        count = self._write_size()
        if not self._room(count):
            return None
        parent = self._pick_dir()
        f = FileState(self.model.new_id())
        self.model.files[f.fid] = f
        link = (parent.did, f"f{f.fid}")
        self.model.may_hold(link, ("f", f.fid))
        fd = os.open(self._abs(link), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        self.model.linked(f, link)
        try:
            self._pwrite_units(fd, f, 0, count)
        finally:
            os.close(fd)
        return f"create {self.model.path(link)} ({count} units)"

    def write_random(self) -> str | None:
        f = self._pick_file()
        count = self._write_size()
        if f is None or not self._room(count):
            return None
        size = len(f.gens)
        where = self.rng.random()
        if where < 0.5 and size:
            first = self.rng.randrange(size)  # overwrite (and maybe extend)
        elif where < 0.75:
            first = size  # extend at the end
        else:
            first = size + self.rng.randint(1, 64)  # leave a hole
        link = self._pick_link(f)
        fd = os.open(self._abs(link), os.O_WRONLY)
        try:
            self._pwrite_units(fd, f, first, count)
        finally:
            os.close(fd)
        return f"write {self.model.path(link)} units {first}+{count}"

    def append(self) -> str | None:
        f = self._pick_file()
        count = self._write_size()
        if f is None or not self._room(count):
            return None
        link = self._pick_link(f)
        gen = self.model.new_gen()
        first = len(f.gens)
        self.model.may_write(f, first, [gen] * count)
        fd = os.open(self._abs(link), os.O_WRONLY | os.O_APPEND)
        try:
            data = units_bytes(f.fid, gen, first, count)
            done = 0
            while done < len(data):  # a short write only ever comes from the kill
                done += os.write(fd, data[done:])
        finally:
            os.close(fd)
        self.model.wrote(f, first, [gen] * count)
        return f"append {self.model.path(link)} {count} units"

    def rewrite(self) -> str | None:
        """open(O_TRUNC) and write the file anew in large sequential writes."""
        f = self._pick_file()
        count = self.rng.randint(8, 1024)
        if f is None or not self._room(count):
            return None
        link = self._pick_link(f)
        self.model.may_resize(f, 0)
        fd = os.open(self._abs(link), os.O_WRONLY | os.O_TRUNC)
        try:
            self.model.resized(f, 0)
            for first in range(0, count, _CHUNK_UNITS):
                self._pwrite_units(fd, f, first, min(_CHUNK_UNITS, count - first))
        finally:
            os.close(fd)
        return f"rewrite {self.model.path(link)} {count} units"

    def truncate(self) -> str | None:
        f = self._pick_file()
        if f is None:
            return None
        size = len(f.gens)
        choice = self.rng.random()
        if choice < 0.2:
            units = 0
        elif choice < 0.7 and size:
            units = self.rng.randrange(size)
        else:
            units = size + self.rng.randint(1, 128)
        if units > size and not self._room(units - size):
            return None
        link = self._pick_link(f)
        self.model.may_resize(f, units)
        fd = os.open(self._abs(link), os.O_WRONLY)
        try:
            os.ftruncate(fd, units * UNIT)
        finally:
            os.close(fd)
        self.model.resized(f, units)
        return f"truncate {self.model.path(link)} to {units} units"

    def rename_file(self) -> str | None:
        f = self._pick_file()
        if f is None:
            return None
        old = self._pick_link(f)
        target_dir = self._pick_dir()
        victims = [(name, ident) for name, (kind, ident) in target_dir.children.items()
                   if kind == "f" and ident != f.fid]
        if victims and self.rng.random() < 0.3:
            name, victim = self.rng.choice(sorted(victims))
        else:
            name, victim = f"r{f.fid}-{self.model.new_id()}", None
        new = (target_dir.did, name)
        self.model.may_drop_link(old)
        self.model.may_drop_link(new)
        self.model.may_hold(new, ("f", f.fid))
        old_path, new_path = self.model.path(old), self.model.path(new)
        os.rename(self.root / old_path, self.root / new_path)
        if victim is not None:
            self.model.unlinked(new)
        self.model.unlinked(old)
        self.model.linked(f, new)
        return f"rename {old_path} -> {new_path}" + (f" (replacing f{victim})" if victim else "")

    def unlink(self) -> str | None:
        f = self._pick_file()
        if f is None:
            return None
        link = self._pick_link(f)
        path = self.model.path(link)
        self.model.may_drop_link(link)
        os.unlink(self.root / path)
        self.model.unlinked(link)
        return f"unlink {path}"

    def unlink_open(self) -> str | None:
        """Unlink the last name of a file kept open: an orphan until closed."""
        orphans = sum(1 for f in self.model.files.values() if f.orphan_fd is not None)
        single = [f for f in self.model.linked_files() if len(f.links) == 1]
        if orphans >= _MAX_ORPHANS or not single:
            return None
        f = self.rng.choice(single)
        (link,) = f.links
        path = self.model.path(link)
        fd = os.open(self.root / path, os.O_RDWR)
        self.model.may_drop_link(link)
        try:
            os.unlink(self.root / path)
        except BaseException:
            os.close(fd)
            raise
        f.orphan_fd = fd
        self.model.unlinked(link)
        return f"unlink {path} kept open"

    def orphan_write(self) -> str | None:
        orphans = [f for f in self.model.files.values() if f.orphan_fd is not None]
        count = self._write_size()
        if not orphans or not self._room(count):
            return None
        f = self.rng.choice(orphans)
        assert f.orphan_fd is not None
        first = self.rng.randint(0, len(f.gens))
        self._pwrite_units(f.orphan_fd, f, first, count)
        return f"write orphan f{f.fid} units {first}+{count}"

    def orphan_close(self) -> str | None:
        orphans = [f for f in self.model.files.values() if f.orphan_fd is not None]
        if not orphans:
            return None
        f = self.rng.choice(orphans)
        assert f.orphan_fd is not None
        fd, f.orphan_fd = f.orphan_fd, None
        os.close(fd)
        return f"close orphan f{f.fid}"

    def link(self) -> str | None:
        files = [f for f in self.model.linked_files() if len(f.links) < _MAX_LINKS]
        if not files:
            return None
        f = self.rng.choice(files)
        old = self._pick_link(f)
        new = (self._pick_dir().did, f"l{f.fid}-{self.model.new_id()}")
        self.model.may_hold(new, ("f", f.fid))
        os.link(self._abs(old), self._abs(new))
        self.model.linked(f, new)
        return f"link {self.model.path(old)} {self.model.path(new)}"

    # ---- directories ---------------------------------------------------------

    def mkdir(self) -> str | None:
        if len(self.model.live_dirs()) > _MAX_DIRS:
            return None
        parent = self._pick_dir(max_depth=_MAX_DEPTH - 1)
        did = self.model.new_id()
        name = f"d{did}"
        self.model.may_hold((parent.did, name), ("d", did))
        os.mkdir(self._dir_abs(parent.did) / name, 0o755)
        self.model.dirs[did] = DirState(did, parent.did, name)
        parent.children[name] = ("d", did)
        if self.rng.random() < 0.6:
            self._fsync_dir(parent.did)
        return f"mkdir {self.model.dir_path(did)}"

    def rmdir(self) -> str | None:
        empty = [d for d in self.model.live_dirs() if d.did != ROOT and not d.children]
        if not empty:
            return None
        d = self.rng.choice(empty)
        path = self.model.dir_path(d.did)
        os.rmdir(self.root / path)
        del self.model.dirs[d.parent].children[d.name]
        d.removed = True
        return f"rmdir {path}"

    def move_dir(self) -> str | None:
        movable = [d for d in self.model.live_dirs() if d.did != ROOT]
        if not movable:
            return None
        d = self.rng.choice(movable)
        subtree_depth = self._subtree_depth(d.did)
        targets = [p for p in self.model.live_dirs()
                   if d.did not in (p.did, *self.model.dir_chain(p.did))
                   and len(self.model.dir_chain(p.did)) + subtree_depth <= _MAX_DEPTH]
        if not targets:
            return None
        target = self.rng.choice(sorted(targets, key=lambda p: p.did))
        name = f"d{d.did}-m{self.model.new_id()}"
        old_path = self.model.dir_path(d.did)
        self.model.may_move_dir(d.did)
        self.model.may_hold((target.did, name), ("d", d.did))
        new_path = self.model.dir_path(target.did)
        new_path = f"{new_path}/{name}" if new_path else name
        os.rename(self.root / old_path, self.root / new_path)
        del self.model.dirs[d.parent].children[d.name]
        d.parent, d.name = target.did, name
        target.children[name] = ("d", d.did)
        return f"move {old_path} -> {new_path}"

    def _subtree_depth(self, did: int) -> int:
        below = [self._subtree_depth(i) for kind, i in self.model.dirs[did].children.values()
                 if kind == "d"]
        return 1 + max(below, default=0)

    # ---- xattrs --------------------------------------------------------------

    def set_xattr(self) -> str | None:
        f = self._pick_file()
        if f is None:
            return None
        name = self.rng.choice(_XATTR_NAMES)
        length = (self.rng.randint(200, self.big_xattr) if name == "user.big"
                  else self.rng.randint(12, 60))
        value = xattr_value(f.fid, self.model.new_gen(), length)
        link = self._pick_link(f)
        self.model.may_set_xattr(f, name, value)
        os.setxattr(self._abs(link), name, value)
        f.xattrs[name] = value
        return f"setxattr {self.model.path(link)} {name} ({len(value)} bytes)"

    def remove_xattr(self) -> str | None:
        files = [f for f in self.model.linked_files() if f.xattrs]
        if not files:
            return None
        f = self.rng.choice(files)
        name = self.rng.choice(sorted(f.xattrs))
        link = self._pick_link(f)
        self.model.may_set_xattr(f, name, None)
        os.removexattr(self._abs(link), name)
        del f.xattrs[name]
        return f"removexattr {self.model.path(link)} {name}"

    # ---- durability ----------------------------------------------------------

    def fsync(self) -> str | None:
        """fsync a file; mostly its directory too, which makes it must-survive."""
        f = self._pick_file()
        if f is None:
            return None
        link = self._pick_link(f)
        path = self.model.path(link)
        fd = os.open(self.root / path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.model.file_synced(f)
        if self.rng.random() < 0.2:
            return f"fsync {path}"
        self._fsync_dir(link[0])
        self.model.record_survivor(f, link)
        return f"fsync {path} and its directory"

    def fsyncdir(self) -> str | None:
        d = self._pick_dir()
        self._fsync_dir(d.did)
        return f"fsyncdir /{self.model.dir_path(d.did)}"

    def _fsync_dir(self, did: int) -> None:
        fd = os.open(self._dir_abs(did), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.model.dir_synced(did)
