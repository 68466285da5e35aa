"""The filesystem label (s_volume_name): FS_IOC_GETFSLABEL and FS_IOC_SETFSLABEL,
as the kernel's ext4 answers and writes them (ext4_ioctl_getlabel/setlabel).

The label is at most 16 bytes and need not end in NUL. Setting it needs
CAP_SYS_ADMIN (root: uid 0, all FUSE tells us) and a label of at most 16
bytes before its NUL (else EINVAL). The kernel writes the primary superblock
through the journal and synchronously, then every backup superblock in place
(ext4_update_superblocks_fn: each group ext4_bg_has_super names; a backup
whose checksum is wrong is skipped). We do the same: the primary through the
metadata writer and a durable commit, then each backup block's copy edited
(label and checksum only: a backup keeps its own counts) and written.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import structlog

from ext4box.ext4.format.checksum import crc32c_raw
from ext4box.ext4.format.errors import InvalidArgument, NotPermitted
from ext4box.ext4.format.group_desc import group_first_block
from ext4box.ext4.format.superblock import SUPERBLOCK_SIZE, field_span

if TYPE_CHECKING:
    from ext4box.ext4.write.context import WriteContext

log = structlog.get_logger("ext4box.ext4")

LABEL_MAX = 16
_LABEL_OFFSET, _LABEL_SIZE = field_span("volume_name")
_CSUM_OFFSET, _ = field_span("checksum")
_U32 = struct.Struct("<I")
_ROOT = 0


def get_label(fs: WriteContext) -> bytes:
    """The label as GETFSLABEL copies it out: up to 16 bytes, NUL-padded to 17."""
    raw = bytes(fs.writer.superblock().fields["volume_name"])  # type: ignore[arg-type]
    return raw.split(b"\0", 1)[0].ljust(LABEL_MAX + 1, b"\0")


def parse_label(buffer: bytes) -> bytes:
    """The 16 on-disk bytes for a SETFSLABEL `buffer` (the caller's FSLABEL_MAX bytes):
    EINVAL when no NUL ends it within 17 bytes."""
    head = buffer[: LABEL_MAX + 1]
    end = head.find(b"\0")
    if end < 0:
        end = len(head)
    if end > LABEL_MAX:
        raise InvalidArgument(f"label longer than {LABEL_MAX} bytes")
    return head[:end].ljust(LABEL_MAX, b"\0")


def set_label(fs: WriteContext, buffer: bytes, uid: int) -> None:
    """SETFSLABEL by a caller of `uid`; durable when it returns."""
    if uid != _ROOT:
        raise NotPermitted("setting the filesystem label needs CAP_SYS_ADMIN")
    label = parse_label(buffer)
    with fs.lock:
        fs.writer.update_superblock(volume_name=label)
        fs.writer.commit(durable=True)
        for group in range(1, fs.writer.group_count):
            if fs.sb.group_has_super(group):
                _update_backup(fs, group, label)
        fs.dev.flush()


def _update_backup(fs: WriteContext, group: int, label: bytes) -> None:
    """Put `label` into group `group`'s backup superblock (the start of its first block)."""
    pblk = group_first_block(fs.sb, group)
    offset = pblk * fs.block_size
    raw = bytearray(fs.dev.pread(offset, SUPERBLOCK_SIZE))
    if fs.sb.metadata_csum:
        (stored,) = _U32.unpack_from(raw, _CSUM_OFFSET)
        if stored != crc32c_raw(0xFFFFFFFF, bytes(raw[:_CSUM_OFFSET])):
            log.warning("backup_superblock_skipped", group=group, block=pblk,
                        why="checksum does not match")
            return
    raw[_LABEL_OFFSET : _LABEL_OFFSET + _LABEL_SIZE] = label
    if fs.sb.metadata_csum:
        _U32.pack_into(raw, _CSUM_OFFSET, crc32c_raw(0xFFFFFFFF, bytes(raw[:_CSUM_OFFSET])))
    fs.dev.pwrite(offset, bytes(raw))
    fs.writer.cache.invalidate(pblk)
