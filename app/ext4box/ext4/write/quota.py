"""How much space and how many inodes each user, group and project uses, and whether
an allocation would pass their limits (the `quota` feature on a read-write mount).

One choke point: `WritableFilesystem.store` hands every inode change to
`QuotaAccounting.inode_stored`, which compares the inode as it was with the
inode as it will be and charges the difference, as the kernel charges:
space is i_blocks in bytes (extent tree and xattr blocks included), and each
live inode counts one, to its uid, gid and project id. Like the kernel (and
e2fsck, which checks the result) it does not count the reserved inodes other
than the root directory, the quota inodes, or EA inodes (their space and
count go to the inode that owns the value: `charge_inodes` for the count).

Limits are checked before anything is allocated (`check`, called by the
operations that allocate: creating an inode, a directory block, a slow
symlink, a file's data blocks) and answered with QuotaExceeded (EDQUOT):
a hard limit refuses an allocation that would pass it; a soft limit starts
its grace period when usage passes it and refuses once the grace period is
over, as the kernel does. As in the kernel, usage is always counted but
limits only for the types the mount enforces (`enforce`: the usrquota,
grpquota and prjquota mount options), never for a privileged caller (root,
standing for CAP_SYS_RESOURCE; caller.py), and a change of owner is checked
against the new owner's limits (`check_transfer`, chown and chgrp).

The quota files are metadata: their 1 KiB blocks are read and written
through the MetadataWriter inside the quota inodes' own blocks, so they
reach the device (or the journal) in the same commit as the inodes whose
usage they count.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from ext4box.ext4.format import features as F
from ext4box.ext4.format.errors import Corrupt, Ext4Error, NoSpace, inode_where
from ext4box.ext4.format.inode import FL_EA_INODE, Inode, replace_inode
from ext4box.ext4.format.quota_file import (
    GRPQUOTA,
    PRJQUOTA,
    QUOTA_BLOCK_SIZE,
    QUOTA_TYPE_NAMES,
    USRQUOTA,
    Dquot,
    EntryPos,
    QuotaFile,
)
from ext4box.ext4.format.xattr import XattrEntry
from ext4box.ext4.write.caller import FILESYSTEM, acting_as, current_caller

if TYPE_CHECKING:
    from ext4box.ext4.write.context import WriteContext

log = structlog.get_logger("ext4box.ext4")

ROOT_INO = 2
_INUM_FIELDS = {USRQUOTA: "usr_quota_inum", GRPQUOTA: "grp_quota_inum",
                PRJQUOTA: "prj_quota_inum"}


def ea_values_held(entries: Iterable[XattrEntry]) -> int:
    """How many inodes an owner is charged for the values it keeps in EA inodes: one
    per entry naming one (in its inode or its xattr block, shared or not), as the
    kernel charges them when set and e2fsck counts them."""
    return sum(1 for entry in entries if entry.value_inum)


class QuotaExceeded(Ext4Error):
    """An allocation would pass a quota limit."""

    errno = errno.EDQUOT


class QuotaInodeFile:
    """The 1 KiB quota blocks of one quota inode, read and written as metadata; the
    inode grows (a block allocated and mapped, i_size raised) when written past its end."""

    def __init__(self, fs: WriteContext, ino: int) -> None:
        self.fs = fs
        self.ino = ino
        self._pblks: dict[int, int] = {}
        # Only this object changes a quota inode (no name leads to one), so the
        # copy it stored last is the inode as it is.
        self._inode: Inode | None = None

    def inode(self) -> Inode:
        if self._inode is None:
            self._inode = self.fs.table.read(self.ino)
        return self._inode

    def _pblk(self, lblk: int, inode: Inode) -> int | None:
        pblk = self._pblks.get(lblk)
        if pblk is None:
            (run,) = self.fs.mapper_for(inode).map(lblk, 1)
            if run.pblk is None or run.unwritten:
                return None
            pblk = self._pblks[lblk] = run.pblk
        return pblk

    def read(self, qblk: int) -> bytes:
        inode = self.inode()
        if (qblk + 1) * QUOTA_BLOCK_SIZE > inode.size:
            raise Corrupt("quota file", inode_where(self.ino), f"quota block {qblk} past i_size")
        lblk, offset = divmod(qblk * QUOTA_BLOCK_SIZE, self.fs.block_size)
        pblk = self._pblk(lblk, inode)
        if pblk is None:
            raise Corrupt("quota file", inode_where(self.ino), f"quota block {qblk} unmapped")
        return self.fs.writer.read(pblk)[offset : offset + QUOTA_BLOCK_SIZE]

    def write(self, qblk: int, data: bytes) -> None:
        fs = self.fs
        inode = self.inode()
        lblk, offset = divmod(qblk * QUOTA_BLOCK_SIZE, fs.block_size)
        pblk = self._pblk(lblk, inode)
        if pblk is None:
            pblk = self._grow(inode, lblk)
            inode = self.inode()
        end = (qblk + 1) * QUOTA_BLOCK_SIZE
        if end > inode.size:
            # The kernel's quota write raises i_size to the end of what it wrote.
            self._inode = fs.store(replace_inode(inode, size=end))
        block = bytearray(fs.writer.read(pblk))
        block[offset : offset + QUOTA_BLOCK_SIZE] = data
        fs.writer.write(pblk, bytes(block))

    def _grow(self, inode: Inode, lblk: int) -> int:
        fs = self.fs
        goal = self._pblks.get(lblk - 1)
        # A quota file is the filesystem's own metadata: it may use the reserved
        # blocks whoever's usage it records (as ext4 lets quota writes do).
        with acting_as(FILESYSTEM):
            pblk = fs.alloc_meta_block(goal + 1 if goal else fs.group_goal(self.ino))
            tree = fs.tree_writer(inode)
            try:
                tree.insert(lblk, pblk, 1)
            except BaseException:
                fs.free_block(pblk)
                raise
        fs.writer.write(pblk, bytes(fs.block_size))
        self._inode = fs.store(fs.with_tree(inode, tree, 1))
        self._pblks[lblk] = pblk
        return pblk


def _owner_id(inode: Inode, qtype: int) -> int:
    if qtype == USRQUOTA:
        return inode.uid
    if qtype == GRPQUOTA:
        return inode.gid
    return inode.projid


class QuotaAccounting:
    """The quota files of one read-write mount and the usage they count."""

    def __init__(self, fs: WriteContext,
                 ea_values_of: Callable[[Inode], int] | None = None) -> None:
        """`ea_values_of(inode)`: `ea_values_held` for an inode's xattrs (ea_inode
        images), which a change of owner moves with the inode itself."""
        self.fs = fs
        self.ea_values_of = ea_values_of
        sb = fs.sb
        self.first_ino = sb.first_ino
        self.files: dict[int, QuotaFile] = {}
        self.quota_inodes: set[int] = set()
        for qtype, field in _INUM_FIELDS.items():
            ino = int(sb.fields[field])
            if not ino:
                continue
            if qtype == PRJQUOTA and not sb.has_ro_compat(F.RO_COMPAT_PROJECT):
                continue
            if not 0 < ino <= sb.inodes_count:
                raise Corrupt("superblock", "superblock", f"{field} {ino} out of range")
            backing = QuotaInodeFile(fs, ino)
            if not backing.inode().is_reg:  # what we would write into must be a file
                raise Corrupt("quota file", inode_where(ino), "not a regular file")
            capacity = backing.inode().size // QUOTA_BLOCK_SIZE
            self.files[qtype] = QuotaFile(qtype, backing.read, backing.write,
                                          where=inode_where(ino), capacity=capacity)
            self.quota_inodes.add(ino)
        self._positions: dict[tuple[int, int], EntryPos] = {}
        # The entries read or written so far: only this object writes the files.
        self._dquots: dict[tuple[int, int], Dquot] = {}
        # The quota types whose limits are enforced (mount options); usage is
        # counted for all.
        self.enforced: frozenset[int] = frozenset()

    def enforce(self, qtypes: frozenset[int]) -> None:
        """Enforce the limits of `qtypes` (USRQUOTA...), as the kernel does for the
        usrquota, grpquota and prjquota mount options; a type without a quota file
        here is logged and ignored."""
        missing = sorted(QUOTA_TYPE_NAMES[t] for t in qtypes - self.files.keys())
        if missing:
            log.warning("quota_not_enforced", quotas=",".join(missing),
                        why="the image has no quota file for them")
        self.enforced = frozenset(qtypes & self.files.keys())

    @classmethod
    def open(cls, fs: WriteContext,
             ea_values_of: Callable[[Inode], int] | None = None) -> QuotaAccounting | None:
        if not fs.sb.has_ro_compat(F.RO_COMPAT_QUOTA):
            return None
        accounting = cls(fs, ea_values_of)
        return accounting if accounting.files else None

    # ---- what counts -----------------------------------------------------

    def counted(self, inode: Inode) -> bool:
        """Whether the kernel charges this inode to its owners at all."""
        ino = inode.ino
        if ino in self.quota_inodes or inode.flags & FL_EA_INODE:
            return False
        return ino == ROOT_INO or ino >= self.first_ino

    def inode_stored(self, old: Inode | None, new: Inode, *, old_live: bool,
                     new_live: bool) -> None:
        """Charge the change from `old` (None: a slot never charged) to `new`.
        `*_live`: whether the inode is in use (linked, or unlinked but still open)."""
        if not self.counted(new):
            return
        before = (old.blocks_512 * 512, 1) if old is not None and old_live else (0, 0)
        after = (new.blocks_512 * 512, 1) if new_live else (0, 0)
        if before == after and old is not None and all(
                _owner_id(old, t) == _owner_id(new, t) for t in self.files):
            return
        moved = 0  # inodes charged for EA values: they follow the owner (a chown)
        if self.ea_values_of is not None and old is not None and old_live and new_live:
            moved = self.ea_values_of(new)
        for qtype in list(self.files):
            old_id = _owner_id(old, qtype) if old is not None else None
            new_id = _owner_id(new, qtype)
            if old_id == new_id:
                self._charge(qtype, new_id, after[0] - before[0], after[1] - before[1])
                continue
            if old_id is not None and before != (0, 0):
                self._charge(qtype, old_id, -before[0], -before[1] - moved)
            self._charge(qtype, new_id, after[0], after[1] + moved)

    def charge_inodes(self, owner: Inode, count: int) -> None:
        """Count `count` more (or fewer) inodes for `owner`'s ids: the EA inodes
        holding its values, which the kernel charges to the owner (their space
        is in the owner's i_blocks and follows from `inode_stored`)."""
        if not self.counted(owner):
            return
        for qtype in list(self.files):
            self._charge(qtype, _owner_id(owner, qtype), 0, count)

    # ---- limits -------------------------------------------------------------

    def check(self, uid: int, gid: int, projid: int, *, space: int = 0,
              inodes: int = 0) -> None:
        """Raise QuotaExceeded if charging `space` bytes and `inodes` inodes to these
        ids would pass a hard limit, or a soft limit whose grace period is over."""
        self._check({USRQUOTA: uid, GRPQUOTA: gid, PRJQUOTA: projid}, space, inodes)

    def check_transfer(self, inode: Inode, *, uid: int | None, gid: int | None) -> None:
        """Raise QuotaExceeded if giving `inode` (its space and itself) to a new
        owner or group would pass that id's limits, as dquot_transfer checks."""
        if not self.counted(inode):
            return
        ids: dict[int, int] = {}
        if uid is not None and uid != inode.uid:
            ids[USRQUOTA] = uid
        if gid is not None and gid != inode.gid:
            ids[GRPQUOTA] = gid
        held = self.ea_values_of(inode) if self.ea_values_of is not None else 0
        self._check(ids, inode.blocks_512 * 512, 1 + held)

    def _check(self, ids: dict[int, int], space: int, inodes: int) -> None:
        if (space <= 0 and inodes <= 0) or not self.enforced or current_caller().privileged:
            return
        now = int(time.time())
        for qtype in list(self.files):
            if qtype not in self.enforced or qtype not in ids:
                continue
            qid = ids[qtype]
            try:
                pos = self._find(qtype, qid)
                dquot = None if pos is None else self._read(qtype, qid, pos)
            except Corrupt as err:
                self._disable(qtype, err)
                continue
            if dquot is None:
                continue
            why = _over_limit(dquot, space, inodes, now)
            if why is not None:
                raise QuotaExceeded(f"{QUOTA_TYPE_NAMES[qtype]} quota of id {qid}: {why}")

    def check_inode(self, inode: Inode, *, blocks: int = 0, inodes: int = 0) -> None:
        """`check` for the ids of an existing inode, `blocks` filesystem blocks more."""
        if not self.counted(inode):
            return
        self.check(inode.uid, inode.gid, inode.projid, space=blocks * self.fs.block_size,
                   inodes=inodes)

    # ---- setting limits (what setquota does through quotactl) ---------------

    def set_limits(self, qtype: int, qid: int, *, block_soft: int = 0, block_hard: int = 0,
                   inode_soft: int = 0, inode_hard: int = 0) -> Dquot:
        """Set one id's limits (block limits in 1 KiB units, as setquota takes them);
        a grace period starts if usage is already past a new soft limit, and stops if
        it is not. Returns the entry as written."""
        quota_file = self.files[qtype]
        pos = self._find(qtype, qid)
        if pos is None:
            pos = self._positions[(qtype, qid)] = quota_file.add(Dquot(qid))
        dquot = replace(self._read(qtype, qid, pos), bsoftlimit=block_soft, bhardlimit=block_hard,
                        isoftlimit=inode_soft, ihardlimit=inode_hard, btime=0, itime=0)
        info = quota_file.info
        now = int(time.time())
        if block_soft and dquot.curspace > block_soft * QUOTA_BLOCK_SIZE:
            dquot = replace(dquot, btime=now + info.bgrace)
        if inode_soft and dquot.curinodes > inode_soft:
            dquot = replace(dquot, itime=now + info.igrace)
        self._write(qtype, pos, dquot)
        return dquot

    def set_grace(self, qtype: int, block_grace_s: int, inode_grace_s: int) -> None:
        """The grace periods (seconds) of one quota type, for soft limits passed from now on."""
        self.files[qtype].set_grace(block_grace_s, inode_grace_s)

    # ---- the entries --------------------------------------------------------

    def usage(self, qtype: int, qid: int) -> Dquot | None:
        pos = self._find(qtype, qid)
        return None if pos is None else self._read(qtype, qid, pos)

    def _find(self, qtype: int, qid: int) -> EntryPos | None:
        key = (qtype, qid)
        pos = self._positions.get(key)
        if pos is None:
            pos = self.files[qtype].find(qid)
            if pos is not None:
                self._positions[key] = pos
        return pos

    def _charge(self, qtype: int, qid: int, space: int, inodes: int) -> None:
        if (not space and not inodes) or qtype not in self.files:
            return
        quota_file = self.files[qtype]
        try:
            pos = self._find(qtype, qid)
            if pos is None:
                pos = self._positions[(qtype, qid)] = quota_file.add(Dquot(qid))
            dquot = self._read(qtype, qid, pos)
            # Grace periods start only where limits are enforced (as in the kernel,
            # whose limit check is what starts them).
            self._write(qtype, pos, _charged(dquot, space, inodes, quota_file.info.bgrace,
                                             quota_file.info.igrace, int(time.time()),
                                             start_grace=qtype in self.enforced))
        except NoSpace as err:
            # Only a full filesystem stops a quota file from growing; the counts
            # of this id are then wrong until e2fsck recomputes them.
            log.error("quota_entry_not_added", quota=QUOTA_TYPE_NAMES[qtype], id=qid,
                      why=str(err))
        except Corrupt as err:
            self._disable(qtype, err)

    def _read(self, qtype: int, qid: int, pos: EntryPos) -> Dquot:
        dquot = self._dquots.get((qtype, qid))
        if dquot is None:
            dquot = self._dquots[(qtype, qid)] = self.files[qtype].read(pos)
        return dquot

    def _write(self, qtype: int, pos: EntryPos, dquot: Dquot) -> None:
        self.files[qtype].write(pos, dquot)
        self._dquots[(qtype, dquot.qid)] = dquot

    def _disable(self, qtype: int, err: Corrupt) -> None:
        """Stop counting a quota type whose file turned out damaged (the operation
        that found it goes on, as the kernel's goes on after a failed quota write);
        e2fsck rebuilds the file."""
        self.files.pop(qtype, None)
        log.error("quota_file_disabled", quota=QUOTA_TYPE_NAMES[qtype], what=err.what,
                  where=err.where, why=err.why)


def _charged(dquot: Dquot, space: int, inodes: int, bgrace: int, igrace: int,
             now: int, *, start_grace: bool = True) -> Dquot:
    """`dquot` with the usage changed and the grace deadlines started or cleared as
    usage crosses the soft limits (usage never goes below zero, as in the kernel)."""
    curspace = max(dquot.curspace + space, 0)
    curinodes = max(dquot.curinodes + inodes, 0)
    btime, itime = dquot.btime, dquot.itime
    soft_space = dquot.bsoftlimit * QUOTA_BLOCK_SIZE
    if not soft_space or curspace <= soft_space:
        btime = 0
    elif space > 0 and not btime and start_grace:
        btime = now + bgrace
    if not dquot.isoftlimit or curinodes <= dquot.isoftlimit:
        itime = 0
    elif inodes > 0 and not itime and start_grace:
        itime = now + igrace
    return Dquot(dquot.qid, dquot.ihardlimit, dquot.isoftlimit, curinodes, dquot.bhardlimit,
                 dquot.bsoftlimit, curspace, btime, itime)


def _over_limit(dquot: Dquot, space: int, inodes: int, now: int) -> str | None:
    if space > 0:
        total = dquot.curspace + space
        hard = dquot.bhardlimit * QUOTA_BLOCK_SIZE
        soft = dquot.bsoftlimit * QUOTA_BLOCK_SIZE
        if hard and total > hard:
            return f"{total} bytes would pass the hard limit of {hard}"
        if soft and total > soft and dquot.btime and now >= dquot.btime:
            return f"{total} bytes would pass the soft limit of {soft}, grace period over"
    if inodes > 0:
        count = dquot.curinodes + inodes
        if dquot.ihardlimit and count > dquot.ihardlimit:
            return f"{count} inodes would pass the hard limit of {dquot.ihardlimit}"
        if (dquot.isoftlimit and count > dquot.isoftlimit and dquot.itime
                and now >= dquot.itime):
            return f"{count} inodes would pass the soft limit of {dquot.isoftlimit}, grace over"
    return None
