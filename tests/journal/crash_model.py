"""What a crash may leave behind: the model a crash workload keeps as it runs.

Directories and files are known by ids (the root is 0), names by (directory
id, name). For every op the model records, before the op is issued, every
state it could leave on the image if the server died in the middle of it —
these "ever" sets only grow — and afterwards the state it did leave:

- `entries_ever[(dir, name)]`: every file or directory that name ever held;
  a directory found after the crash may be any directory its name ever held,
  so a path is resolved to a set of candidates, never trusted as it reads.
- per file: the generations ever written at each unit, the largest size ever
  reached, and `pinned`: the units an fsync made durable with data and no
  truncate has cut since (they may hold an older or newer generation after a
  crash, never zeros).
- `survive`: the must-survive records. After fsync(F) and fsyncdir(F's
  parent) both returned, with every directory on the path itself durable (its
  own entry fsynced since it was made or moved), F must be found at that path
  with exactly that content (and xattrs). Any later change to F's content,
  that name, or a directory on the path retires the record before it is
  issued, since an interrupted change may leave either state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

ROOT = 0
LOST_FOUND = -1  # made by mkfs; the workload never touches it

Link = tuple[int, str]  # (directory id, name)
Entry = tuple[str, int]  # ("f", file id) or ("d", directory id)


@dataclass(slots=True)
class FileState:
    fid: int
    gens: list[int] = field(default_factory=list)  # generation per unit; 0 = zero unit
    ever: dict[int, set[int]] = field(default_factory=dict)  # unit -> generations ever there
    max_units: int = 0  # largest size ever reached (or requested), in units
    pinned: set[int] = field(default_factory=set)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    xattrs_ever: dict[str, set[bytes]] = field(default_factory=dict)
    links: set[Link] = field(default_factory=set)
    orphan_fd: int | None = None  # open after its last name was unlinked

    @property
    def live(self) -> bool:
        return bool(self.links) or self.orphan_fd is not None


@dataclass(slots=True)
class DirState:
    did: int
    parent: int
    name: str
    children: dict[str, Entry] = field(default_factory=dict)
    durable: bool = False  # its entry in its parent was fsynced since it was made or moved
    removed: bool = False


@dataclass(frozen=True, slots=True)
class Durable:
    """A must-survive record: file `fid` at `path` with exactly `gens` (and `xattrs`)."""

    fid: int
    link: Link
    path: str
    chain: tuple[int, ...]  # directory ids from the root's child down to the parent
    gens: tuple[int, ...]
    xattrs: dict[str, bytes] | None  # None: an xattr changed since, not checked


class Model:
    def __init__(self) -> None:
        self.files: dict[int, FileState] = {}
        self.dirs: dict[int, DirState] = {ROOT: DirState(ROOT, ROOT, "", durable=True)}
        self.entries_ever: dict[Link, set[Entry]] = {(ROOT, "lost+found"): {("d", LOST_FOUND)}}
        self.survive: dict[int, Durable] = {}
        self.fsyncs = 0
        self._next_id = 1
        self._next_gen = 1

    # ---- ids -------------------------------------------------------------

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def new_gen(self) -> int:
        self._next_gen += 1
        return self._next_gen - 1

    # ---- paths -----------------------------------------------------------

    def dir_chain(self, did: int) -> tuple[int, ...]:
        chain: list[int] = []
        while did != ROOT:
            chain.append(did)
            did = self.dirs[did].parent
        return tuple(reversed(chain))

    def dir_path(self, did: int) -> str:
        return "/".join(self.dirs[d].name for d in self.dir_chain(did))

    def path(self, link: Link) -> str:
        parent = self.dir_path(link[0])
        return f"{parent}/{link[1]}" if parent else link[1]

    def chain_durable(self, did: int) -> bool:
        return all(self.dirs[d].durable for d in self.dir_chain(did))

    def live_files(self) -> list[FileState]:
        return [f for f in self.files.values() if f.live]

    def linked_files(self) -> list[FileState]:
        return [f for f in self.files.values() if f.links]

    def live_dirs(self) -> list[DirState]:
        return [d for d in self.dirs.values() if not d.removed]

    def live_units(self) -> int:
        return sum(max(len(f.gens), 1) for f in self.live_files())

    # ---- before an op: what it may leave --------------------------------

    def may_hold(self, link: Link, entry: Entry) -> None:
        self.entries_ever.setdefault(link, set()).add(entry)

    def may_write(self, f: FileState, first: int, gens: list[int]) -> None:
        """Units first.. may get `gens` (and the file that size); retires F's record."""
        for i, g in enumerate(gens):
            if g:
                f.ever.setdefault(first + i, set()).add(g)
        f.max_units = max(f.max_units, first + len(gens))
        self.survive.pop(f.fid, None)

    def may_resize(self, f: FileState, units: int) -> None:
        f.max_units = max(f.max_units, units)
        f.pinned = {u for u in f.pinned if u < units}
        self.survive.pop(f.fid, None)

    def may_set_xattr(self, f: FileState, name: str, value: bytes | None) -> None:
        if value is not None:
            f.xattrs_ever.setdefault(name, set()).add(value)
        record = self.survive.get(f.fid)
        if record is not None:
            self.survive[f.fid] = replace(record, xattrs=None)

    def may_drop_link(self, link: Link) -> None:
        """The name `link` may stop naming what it names now."""
        for fid, record in list(self.survive.items()):
            if record.link == link:
                del self.survive[fid]

    def may_move_dir(self, did: int) -> None:
        self.dirs[did].durable = False
        for fid, record in list(self.survive.items()):
            if did in record.chain:
                del self.survive[fid]

    # ---- after an op: what it did ----------------------------------------

    def wrote(self, f: FileState, first: int, gens: list[int]) -> None:
        end = first + len(gens)
        if end > len(f.gens):
            f.gens.extend([0] * (end - len(f.gens)))
        f.gens[first:end] = gens

    def resized(self, f: FileState, units: int) -> None:
        if units < len(f.gens):
            del f.gens[units:]
        else:
            f.gens.extend([0] * (units - len(f.gens)))

    def linked(self, f: FileState, link: Link) -> None:
        f.links.add(link)
        self.dirs[link[0]].children[link[1]] = ("f", f.fid)

    def unlinked(self, link: Link) -> None:
        kind, ident = self.dirs[link[0]].children.pop(link[1])
        if kind == "f":
            self.files[ident].links.discard(link)

    def file_synced(self, f: FileState) -> None:
        """fsync(F) returned: its data is durable."""
        f.pinned = {u for u, g in enumerate(f.gens) if g}
        self.fsyncs += 1

    def dir_synced(self, did: int) -> None:
        """fsyncdir(D) returned: D's entries are durable."""
        for kind, ident in self.dirs[did].children.values():
            if kind == "d":
                self.dirs[ident].durable = True
        self.fsyncs += 1

    def record_survivor(self, f: FileState, link: Link) -> None:
        """fsync(F) then fsyncdir(parent) returned, nothing touched F in between."""
        if not self.chain_durable(link[0]):
            return
        self.survive[f.fid] = Durable(
            f.fid, link, self.path(link), self.dir_chain(link[0]), tuple(f.gens),
            dict(f.xattrs),
        )
