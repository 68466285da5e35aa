"""How a file handle's node id becomes an inode again: the "." and ".." lookups of FUSE export.

With FUSE_EXPORT_SUPPORT agreed, the kernel (fs/fuse/inode.c) encodes a file
handle as the node id and the generation it knows, and decodes one it has
no cached inode for (after a cache drop, in a new mount) by sending
LOOKUP(node id, "."); it reconnects a directory to the tree (open_by_handle_at,
NFS) by LOOKUP(directory, "..") and then a READDIR of the parent. It compares
the generation of the reply with the handle's and says ESTALE when they
differ, and turns an ENOENT answer into ESTALE too.

So handles survive here because node ids are stable, the ext4 inode number
itself (attrs.py; the root is node 1 with generation 0, as the kernel's FUSE
root inode has), and the generation is the inode's i_generation, new for
each life of an inode number (inode_table.py).

The node id of a "." lookup comes from whoever called open_by_handle_at,
not from this server: it is only a number, checked the way the kernel's
ext4 checks an inode number from a handle (ext4_nfs_get_inode, __ext4_iget
with EXT4_IGET_HANDLE): below the first non-reserved inode (the root
excepted), above s_inodes_count, the journal, a quota or the orphan-file
inode, an EA inode, or an inode no name holds (links_count 0) is ESTALE. A slot that does not
parse as an inode is ESTALE too: nothing in use lives there (an unused slot
of a never-initialised inode table reads as garbage); the same inode reached
by a name would report the damage.
"""

from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING, NoReturn

from ext4box.ext4.format.errors import Corrupt, inode_where
from ext4box.ext4.format.inode import FL_EA_INODE
from ext4box.fuse.attrs import EXT4_ROOT_INO, Attributes, ext4_ino
from ext4box.fuse.errors import FuseError, fuse_errors
from ext4box.fuse.protocol import ROOT_ID
from ext4box.log import get_logger

if TYPE_CHECKING:
    from ext4box.ext4.format.inode import Inode
    from ext4box.ext4.format.superblock import Superblock
    from ext4box.ext4.read.filesystem import Filesystem

log = get_logger("ext4box.fuse")

# Superblock fields naming inodes that hold filesystem metadata, never a file.
_METADATA_INODE_FIELDS = (
    "journal_inum", "usr_quota_inum", "grp_quota_inum", "prj_quota_inum", "orphan_file_inum",
)  # fmt: skip


def refusal(sb: Superblock, ino: int) -> str | None:
    """Why inode number `ino` can never be a file a handle names (None: it can).

    The root is node id 1, never 2, so a node id of 2 is refused too: it
    would make a second node of the root.
    """
    if ino == EXT4_ROOT_INO:
        return "the root directory is node 1, not 2"
    if ino < sb.first_ino:
        return f"reserved inode (below the first inode {sb.first_ino})"
    if ino > sb.inodes_count:
        return f"past the last inode {sb.inodes_count}"
    for field in _METADATA_INODE_FIELDS:
        if ino == int(sb.fields[field]):
            return f"metadata inode ({field})"
    return None


class ExportLookups:
    """The "." and ".." lookups of Operations (a mixin: see module doc)."""

    # Provided by Operations.
    fs: Filesystem
    _dead: dict[int, Attributes]

    def _attributes(self, ino: int) -> Attributes: ...
    def _inode_attributes(self, inode: Inode) -> Attributes: ...
    def remember(self, ino: int) -> None: ...

    def _root_entry(self) -> Attributes:
        self.remember(ROOT_ID)
        return self._attributes(EXT4_ROOT_INO)

    @fuse_errors("lookup")
    def lookup_self(self, node_id: int) -> Attributes:
        """LOOKUP(node_id, "."): the inode a file handle names, or ESTALE."""
        if node_id == ROOT_ID:
            return self._root_entry()
        inode = self._handle_inode(node_id)
        attr = self._inode_attributes(inode)
        self.remember(node_id)
        return attr

    def _handle_inode(self, ino: int) -> Inode:
        reason = refusal(self.fs.sb, ino)
        if reason is not None:
            _stale(ino, reason, forged=True)
        if ino in self._dead:
            _stale(ino, "inode freed", forged=False)
        try:
            inode = self.fs.inode(ino)
        except Corrupt as err:
            _stale(ino, f"no inode in use: {err.what} at {err.where}: {err.why}", forged=False)
        if inode.links_count == 0:
            _stale(ino, "inode deleted (links_count 0)", forged=False)
        if inode.flags & FL_EA_INODE:
            _stale(ino, "EA inode (holds an xattr value, not a file)", forged=True)
        return inode

    @fuse_errors("lookup")
    def lookup_parent(self, node_id: int) -> Attributes:
        """LOOKUP(node_id, ".."): the directory holding directory `node_id`.

        The kernel sends it only for a directory it holds; its ".." entry is
        image data, so a bad one is Corrupt (EUCLEAN), not ESTALE.
        """
        dir_ino = ext4_ino(node_id)
        if dir_ino in self._dead:
            # Removed while the kernel still held it: no parent any more.
            raise FuseError(errno.ENOENT)
        parent = self.fs.find(dir_ino, b"..")
        if parent is None:
            raise Corrupt("directory", inode_where(dir_ino), 'no ".." entry')
        if parent == EXT4_ROOT_INO:
            return self._root_entry()
        reason = refusal(self.fs.sb, parent)
        if reason is not None:
            raise Corrupt("directory entry", inode_where(dir_ino), f'".." names {reason}')
        attr = self._attributes(parent)
        if not stat.S_ISDIR(attr.mode):
            why = f'".." names non-directory {parent}'
            raise Corrupt("directory entry", inode_where(dir_ino), why)
        self.remember(parent)
        return attr


def _stale(ino: int, why: str, *, forged: bool) -> NoReturn:
    """Answer ESTALE for a handle naming `ino`, with one log line saying why.

    `forged`: no handle this filesystem gave out can name it (a warning);
    otherwise the file is simply gone, as happens to any handle (info).
    """
    if forged:
        log.warning("stale_handle", node=ino, why=why)
    else:
        log.info("stale_handle", node=ino, why=why)
    raise FuseError(errno.ESTALE)
