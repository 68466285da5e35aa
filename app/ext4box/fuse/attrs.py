"""Inode → the attributes FUSE replies carry, and the FUSE node id rules.

FUSE reserves node id 1 for the root; ext4's root is inode 2. Every other node
id is the ext4 inode number itself, so st_ino matches what the kernel's ext4
shows. Inode 1 (bad blocks) can never appear in a directory.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

from ext4box.ext4.format.errors import Corrupt, inode_where
from ext4box.ext4.format.inode import Inode
from ext4box.fuse.protocol import ROOT_ID

EXT4_ROOT_INO = 2
BAD_BLOCKS_INO = 1

# Nothing changes under a read-only mount: let the kernel cache names and
# attributes for a long time.
ENTRY_TIMEOUT = 300.0
ATTR_TIMEOUT = 300.0
# Read-write: every change arrives through this kernel mount. Names change
# only by requests the kernel itself sends (create, mkdir, link, unlink,
# rmdir, rename), and it updates its dentries from their answers, so a name
# stays valid as long as on a read-only mount: a short entry timeout only
# made the kernel look up again every name older than it (e.g. before each
# unlink). Attributes: the FUSE kernel module invalidates what a request it
# sent can have changed (the parent after create/unlink, both inodes after
# link/rename, attributes after write/setattr/setxattr), but a few changes
# happen behind its back (suid/sgid cleared on write, times set by the
# server's clock), so keep that window short.
RW_ENTRY_TIMEOUT = ENTRY_TIMEOUT
RW_ATTR_TIMEOUT = 1.0

# ext4 directory entry file types → S_IFMT bits.
_FTYPE_TO_S_IFMT = {
    1: stat.S_IFREG,
    2: stat.S_IFDIR,
    3: stat.S_IFCHR,
    4: stat.S_IFBLK,
    5: stat.S_IFIFO,
    6: stat.S_IFSOCK,
    7: stat.S_IFLNK,
}


@dataclass(slots=True)
class Attributes:
    """What a FUSE entry or attribute reply says about one inode (backend-neutral).

    Timeouts are seconds the kernel may cache the name (entry) and the
    attributes; times are nanoseconds since the epoch.
    """

    ino: int
    mode: int
    nlink: int
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    blksize: int = 4096
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    crtime_ns: int = 0
    generation: int = 0
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0


def ext4_ino(node_id: int) -> int:
    """The ext4 inode behind a FUSE node id."""
    return EXT4_ROOT_INO if node_id == ROOT_ID else node_id


def entry_ids(attr: Attributes) -> tuple[int, int]:
    """(node id, generation) an entry reply carries for `attr`.

    Only a ".." lookup (FUSE export) answers with the root: node 1, and
    generation 0 as the kernel gave its own root inode (a root reply with
    another generation makes it warn and use 0).
    """
    if attr.ino == EXT4_ROOT_INO:
        return ROOT_ID, 0
    return attr.ino, attr.generation


def check_child_ino(ino: int, dir_ino: int, name: bytes) -> None:
    """Refuse a directory entry whose inode would collide with the FUSE root.

    Only "." and ".." may name ext4's root; a hard link to it, or to inode 1,
    exists only in a corrupt image and would alias the FUSE root node.
    """
    if ino in (BAD_BLOCKS_INO, EXT4_ROOT_INO):
        raise Corrupt(
            "directory entry",
            inode_where(dir_ino),
            f"entry {name!r} refers to reserved inode {ino}",
        )


def entry_attributes(
    inode: Inode, block_size: int, *, timeouts: tuple[float, float] = (ENTRY_TIMEOUT, ATTR_TIMEOUT)
) -> Attributes:
    """Attributes of a facade Inode, exact to the nanosecond and the 512-byte block.

    `timeouts` is (entry, attribute) validity in seconds.
    """
    return Attributes(
        ino=inode.ino,
        mode=inode.mode,
        nlink=inode.links_count,
        uid=inode.uid,
        gid=inode.gid,
        rdev=inode.rdev,
        size=inode.size,
        blksize=block_size,
        blocks=inode.stat_blocks,
        atime_ns=inode.atime_ns,
        mtime_ns=inode.mtime_ns,
        ctime_ns=inode.ctime_ns,
        crtime_ns=inode.crtime_ns,
        generation=inode.generation,
        entry_timeout=timeouts[0],
        attr_timeout=timeouts[1],
    )


def placeholder_attributes(ino: int, file_type: int) -> Attributes:
    """Attributes for a listed name whose inode cannot be read.

    The name still shows up in the listing (as with the kernel's ext4, where
    readdir does not read inodes); zero timeouts make the kernel come back
    for real attributes, and that lookup/getattr reports the error.
    """
    return Attributes(ino=ino, mode=file_type_mode(file_type), nlink=1)


def file_type_mode(file_type: int) -> int:
    """The S_IFMT bits of an ext4 directory entry's file type (regular if unknown)."""
    return _FTYPE_TO_S_IFMT.get(file_type, stat.S_IFREG)
