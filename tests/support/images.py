"""Build a rich source tree and ext2/3/4 images of it, one per format variant.

mkfs.ext4 -d copies the tree into the image without mounting it. What it
cannot express (nanosecond and post-2038 timestamps, a fragmented file whose
extent tree needs index blocks, hash-indexed directories) is then done through
a kernel read-write mount of the finished image, so every image is shaped by
the two reference tools only: e2fsprogs and the kernel.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from support.kernel import kernel_mount

# Deterministic content: the same tree every run.
_SEED = 20240517

# Known (atime, mtime) pairs in ns, including ones mkfs -d cannot store.
PRE_1970_NS = -1_234_567_890 * 10**9 + 123_456_789
Y2100_NS = 4_102_444_800 * 10**9 + 987_654_321
_JUST_BEFORE_EPOCH_NS = -1 * 10**9 + 999_999_999
_Y2038_EDGE_NS = (2**31 - 1) * 10**9 + 1
_AFTER_Y2038_NS = 2**31 * 10**9 + 500_000_000
_BASE_TIME_NS = 1_700_000_000 * 10**9 + 123_456_789

FRAGMENTED_FILE = "frag/extent-tree.bin"
HTREE_DIR = "htree"
BIG_DIR = "bigdir"
BIG_XATTR_FILE = "xattrs/block-big"

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


@dataclass(frozen=True, slots=True)
class Variant:
    """One image flavour: mkfs options plus what the kernel adds afterwards."""

    name: str
    mkfs_args: tuple[str, ...]
    block_size: int
    size_mb: int = 48
    extents: bool = True
    htree_entries: int = 300  # a hash-indexed directory (dir_index images)
    big_dir_entries: int = 0  # a second, much larger one (2-level htree with 1k blocks)
    large_inodes: bool = True  # 256-byte inodes: ns and post-2038 timestamps
    tune2fs_args: tuple[str, ...] = ()  # applied before the kernel builds the htree dirs
    debugfs_writes: tuple[str, ...] = ()  # superblock tweaks tune2fs cannot make


VARIANTS: tuple[Variant, ...] = (
    Variant("ext4-4k", ("-t", "ext4", "-b", "4096"), 4096),
    Variant("ext4-1k", ("-t", "ext4", "-b", "1024"), 1024),
    Variant("ext4-no-extent", ("-t", "ext4", "-b", "4096", "-O", "^extent,^64bit"), 4096,
            extents=False),
    Variant("ext2", ("-t", "ext2", "-b", "1024"), 1024, extents=False),
    Variant("ext3", ("-t", "ext3", "-b", "4096"), 4096, extents=False),
    # Without metadata_csum, uninit_bg keeps the crc16 group descriptor checksums.
    Variant("ext4-no-csum", ("-t", "ext4", "-b", "4096", "-O", "^metadata_csum,uninit_bg"), 4096),
    Variant("ext4-no-64bit", ("-t", "ext4", "-b", "4096", "-O", "^64bit"), 4096),
    Variant("ext4-no-flex-bg", ("-t", "ext4", "-b", "1024", "-O", "^flex_bg"), 1024),
    Variant("ext4-meta-bg", ("-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"), 1024),
    Variant("ext4-inline", ("-t", "ext4", "-b", "4096", "-O", "inline_data"), 4096),
    # mke2fs has no hash option; tune2fs sets the default for directories indexed later.
    Variant("ext4-tea-hash", ("-t", "ext4", "-b", "4096"), 4096,
            tune2fs_args=("-E", "hash_alg=tea")),
    # x86 mkfs picks signed hashing; the unsigned variant hashes some names differently.
    Variant("ext4-unsigned-hash", ("-t", "ext4", "-b", "1024"), 1024,
            debugfs_writes=("ssv flags 2",)),
    Variant("ext4-big-dir", ("-t", "ext4", "-b", "1024", "-N", "24000"), 1024, size_mb=64,
            big_dir_entries=20_000),
    Variant("ext4-small-inodes", ("-t", "ext4", "-b", "4096", "-I", "128"), 4096,
            large_inodes=False),
)

VARIANTS_BY_NAME = {v.name: v for v in VARIANTS}


@dataclass(slots=True)
class SourceTree:
    """A tree on disk plus the timestamps its entries must carry in every image."""

    root: Path
    times_ns: dict[str, tuple[int, int]] = field(default_factory=dict)


def run(argv: list[str], **kwargs: object) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_at(path: Path, pieces: list[tuple[int, bytes]], size: int | None = None) -> None:
    """A sparse file: data only at the given offsets, optionally truncated to `size`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset, data in pieces:
            os.pwrite(fd, data, offset)
        if size is not None:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _make_socket(path: Path) -> None:
    # AF_UNIX paths are limited to ~108 bytes; bind relative to a directory fd.
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
    finally:
        sock.close()
        os.close(dir_fd)


def build_source_tree(root: Path) -> SourceTree:
    """Create the rich tree (needs root: device nodes, chown, trusted.* xattrs)."""
    rng = random.Random(_SEED)
    tree = SourceTree(root)
    root.mkdir(parents=True, exist_ok=True)

    # Regular files: empty, inline-sized, block-sized, indirect-block-sized.
    _write(root / "files/empty", b"")
    _write(root / "files/tiny.txt", b"hello, ext4box\n")
    _write(root / "files/fifty.bin", rng.randbytes(50))
    _write(root / "files/inline-plus-xattr.txt", b"inline data spills into system.data. " * 4)
    _write(root / "files/one-block.bin", rng.randbytes(4096))
    _write(root / "files/odd-size.bin", rng.randbytes(12_345))
    _write(root / "files/medium.bin", rng.randbytes(300 * 1024))
    _write(root / "files/large.bin", rng.randbytes(1536 * 1024))
    text = b"".join(b"line %06d of a text file\n" % i for i in range(3000))
    _write(root / "files/text.txt", text)

    # Sparse files (mkfs -d skips zero blocks, so holes survive).
    data = rng.randbytes(10_000)
    _write_at(root / "sparse/hole-at-start.bin", [(1 << 20, data)])
    _write_at(root / "sparse/hole-in-middle.bin", [(0, data), ((1 << 20) + 3, data)])
    _write_at(root / "sparse/hole-at-end.bin", [(0, data)], size=2 << 20)
    _write_at(root / "sparse/all-hole.bin", [], size=3 << 20)
    # With 1k blocks, data beyond 64.3 MiB sits behind a triple-indirect block.
    _write_at(root / "sparse/far.bin", [(0, b"near"), (68 << 20, data)])

    # Symlinks: fast (< 60 bytes, in i_block), slow (in a block), boundary lengths.
    links = root / "links"
    links.mkdir()
    os.symlink("../files/tiny.txt", links / "short")
    os.symlink("../files", links / "to-dir")
    os.symlink("does/not/exist", links / "dangling")
    for length in (59, 60, 61):
        os.symlink("t" * length, links / f"len-{length}")
    os.symlink("/".join(["long-component"] * 14), links / "long")
    os.symlink("x" * 900, links / "very-long")

    # Hard links, across directories.
    _write(root / "hardlinks/original", b"one inode, three names\n")
    os.link(root / "hardlinks/original", root / "hardlinks/second")
    os.link(root / "hardlinks/original", root / "files/third-name")

    # Special files.
    special = root / "special"
    special.mkdir()
    os.mknod(special / "char-null", 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(special / "char-big-numbers", 0o600 | 0o020000, os.makedev(259, 70000))
    os.mknod(special / "block-sda1", 0o660 | 0o060000, os.makedev(8, 1))
    os.mkfifo(special / "fifo", 0o644)
    _make_socket(special / "socket")

    # Extended attributes: in the inode, in a block, many, empty, on dirs/symlinks.
    xattrs = root / "xattrs"
    xattrs.mkdir()
    small = xattrs / "in-inode"
    _write(small, b"small xattrs\n")
    os.setxattr(small, "user.a", b"1")
    os.setxattr(small, "user.colour", b"blue")
    os.setxattr(small, "trusted.t", b"x")
    _write(xattrs / "block-big", b"big xattr\n")
    # 600 bytes: beyond any in-inode space, but fits a 1 KiB xattr block.
    os.setxattr(xattrs / "block-big", "user.big", bytes(rng.randrange(256) for _ in range(600)))
    os.setxattr(xattrs / "block-big", "security.label", b"system_u:object_r:etc_t:s0\0")
    _write(xattrs / "many", b"many xattrs\n")
    for i in range(20):
        os.setxattr(xattrs / "many", f"user.attr-{i:02d}", f"value number {i:03d}".encode())
    _write(xattrs / "empty-value", b"")
    os.setxattr(xattrs / "empty-value", "user.empty", b"")
    for name in ("shared-1", "shared-2"):
        _write(xattrs / name, name.encode())
        os.setxattr(xattrs / name, "user.shared", b"S" * 300)
    (xattrs / "dir-with-xattr").mkdir()
    os.setxattr(xattrs / "dir-with-xattr", "user.on-dir", b"directory value")
    os.symlink("in-inode", xattrs / "symlink-with-xattr")
    os.setxattr(xattrs / "symlink-with-xattr", "trusted.on-link", b"link value",
                follow_symlinks=False)

    # POSIX ACLs: access on a file, access + default on a directory.
    acl = root / "acl"
    acl.mkdir()
    _write(acl / "file", b"acl file\n")
    run(["setfacl", "-m", "u:1000:rw,u:4000000000:r,g:65534:r,m::rw", str(acl / "file")])
    (acl / "dir").mkdir()
    run(["setfacl", "-m", "u:1000:rwx,g:100:rx", str(acl / "dir")])
    run(["setfacl", "-d", "-m", "u:1000:rx,g::r,o::-", str(acl / "dir")])

    # Owners and modes.
    owners = root / "owners"
    owners.mkdir()
    for name, uid, gid in (("root", 0, 0), ("user", 1000, 1000), ("nobody", 65534, 65534),
                           ("huge", 4_000_000_000, 4_000_000_001)):
        _write(owners / name, name.encode())
        os.chown(owners / name, uid, gid)
    os.symlink("user", owners / "symlink-owned")
    os.chown(owners / "symlink-owned", 1000, 100, follow_symlinks=False)
    modes = root / "modes"
    modes.mkdir()
    for name, mode in (("setuid", 0o4755), ("setgid", 0o2755), ("none", 0o000),
                       ("all-bits", 0o7777), ("exec-only", 0o111)):
        _write(modes / name, name.encode())
        os.chmod(modes / name, mode)
    for name, mode in (("sticky-dir", 0o1777), ("closed-dir", 0o000), ("setgid-dir", 0o2775)):
        (modes / name).mkdir()
        os.chmod(modes / name, mode)

    # Names.
    names = root / "names"
    names.mkdir()
    for name in ("with space", "ünïcødé-名前", ".hidden", "-dash", "n" * 255, "a=b;c"):
        _write(names / name, name.encode())

    deep = root / "deep/a/b/c/d/e/f/g/h"
    deep.mkdir(parents=True)
    _write(deep / "bottom.txt", b"deep\n")

    # Timestamps: special values where they matter, ns everywhere else.
    special_times = {
        "times/pre-1970": (PRE_1970_NS, PRE_1970_NS + 1),
        "times/y2100": (Y2100_NS, Y2100_NS - 7),
        "times/just-before-epoch": (_JUST_BEFORE_EPOCH_NS, _JUST_BEFORE_EPOCH_NS),
        "times/epoch": (0, 0),
        "times/y2038-edge": (_Y2038_EDGE_NS, _Y2038_EDGE_NS),
        "times/after-y2038": (_AFTER_Y2038_NS, _AFTER_Y2038_NS),
    }
    for relpath in special_times:
        _write(root / relpath, relpath.encode())
    os.symlink("pre-1970", root / "times/symlink-y2100")
    special_times["times/symlink-y2100"] = (Y2100_NS, Y2100_NS + 3)

    all_paths = sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
    )
    for index, relpath in enumerate(["", *all_paths]):
        step = index * 1_000_000_007
        tree.times_ns[relpath] = special_times.get(
            relpath, (_BASE_TIME_NS + step + 11, _BASE_TIME_NS + step)
        )
    apply_times(root, tree.times_ns)
    return tree


def apply_times(root: Path, times_ns: dict[str, tuple[int, int]]) -> None:
    """Set atime/mtime of each path (never following symlinks). Changes no parent mtime."""
    for relpath, (atime_ns, mtime_ns) in times_ns.items():
        target = root / relpath if relpath else root
        os.utime(target, ns=(atime_ns, mtime_ns), follow_symlinks=False)


def fragment_file(path: Path, block_size: int, extents: bool) -> None:
    """A file whose extent tree needs index blocks: many written ranges split by holes.

    Punching every other 8 KiB chunk out of a 1 MiB file leaves 128 extents,
    far more than the 4 an inode holds. On extent images we also add
    unwritten (fallocated) ranges inside and past i_size.
    """
    chunk = max(8192, 2 * block_size)
    rng = random.Random(_SEED + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, rng.randbytes(1 << 20))
        os.fsync(fd)
        for offset in range(chunk // 2, 1 << 20, chunk):
            _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, chunk // 2)
        if extents:
            _fallocate(fd, 0, (1 << 20) + 3 * chunk, 4 * chunk)  # unwritten, extends i_size
            os.pwrite(fd, b"tail after unwritten", (1 << 20) + 9 * chunk)
            _fallocate(fd, _FALLOC_FL_KEEP_SIZE, (1 << 20) + 16 * chunk, 4 * chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def fill_directory(directory: Path, entries: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(entries):
        # Long names: fewer entries per leaf block, so more leaves and htree levels.
        # Non-ASCII bytes are where the signed and unsigned hash variants differ.
        name = f"entry-{i:06d}-with-a-longer-name" + ("-ñé" if i % 3 == 0 else "")
        fd = os.open(directory / name, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)


def build_image(variant: Variant, tree: SourceTree, image: Path, scratch: Path) -> Path:
    """mkfs -d the tree, then fragment/index/retime through a kernel rw mount; e2fsck-clean."""
    image.unlink(missing_ok=True)
    run(["mkfs.ext4", "-q", "-F", *variant.mkfs_args, "-L", variant.name[:16],
          "-d", str(tree.root), str(image), f"{variant.size_mb}M"])
    if variant.tune2fs_args:
        run(["tune2fs", *variant.tune2fs_args, str(image)])
    for request in variant.debugfs_writes:
        run(["debugfs", "-w", "-R", request, str(image)])
    mnt = scratch / f"{variant.name}-rw"
    # noinit_itable: no background inode-table zeroing racing with the unmount.
    with kernel_mount(image, mnt, readonly=False, options="noinit_itable"):
        fragment_file(mnt / FRAGMENTED_FILE, variant.block_size, variant.extents)
        if variant.htree_entries:
            fill_directory(mnt / HTREE_DIR, variant.htree_entries)
        if variant.big_dir_entries:
            fill_directory(mnt / BIG_DIR, variant.big_dir_entries)
        # Creating entries changed these directories' times: apply the manifest last.
        apply_times(mnt, tree.times_ns)
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True,
                          check=False)
    if fsck.returncode != 0:
        raise RuntimeError(f"e2fsck -fn {image} is not clean:\n{fsck.stdout}{fsck.stderr}")
    return image


def debugfs(image: Path, request: str) -> str:
    """Output of one debugfs request against the image (opened read-only)."""
    return run(["debugfs", "-R", request, str(image)])


def dumpe2fs_header(image: Path) -> dict[str, str]:
    """The superblock fields `dumpe2fs -h` prints, by their label."""
    fields: dict[str, str] = {}
    for line in run(["dumpe2fs", "-h", str(image)]).splitlines():
        label, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(label.strip(), value.strip())
    return fields


def xattr_block_of(image: Path, path: str) -> int:
    """The external xattr block of a file (`File ACL:` in debugfs stat), 0 if none."""
    match = re.search(r"File ACL:\s*(\d+)", debugfs(image, f'stat "/{path}"'))
    if match is None:
        raise RuntimeError(f"debugfs stat /{path} printed no File ACL line")
    return int(match.group(1))


def extent_tree_depth(image: Path, path: str) -> int:
    """Depth of a file's extent tree as debugfs `ex` reports it (0 = all in the inode)."""
    depth = 0
    for line in debugfs(image, f'ex "/{path}"').splitlines():
        match = re.match(r"\s*\d+/\s*(\d+)\s", line)
        if match:
            depth = max(depth, int(match.group(1)))
    return depth


def htree_levels(image: Path, path: str) -> int | None:
    """Indirect levels of a hash-indexed directory (0 = one level), None if not indexed."""
    output = debugfs(image, f'htree "/{path}"')
    match = re.search(r"Indirect levels:\s*(\d+)", output)
    return int(match.group(1)) if match else None


class ImageCache:
    """Builds the source tree once and each variant's image at most once per session."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._tree: SourceTree | None = None
        self._images: dict[str, Path] = {}

    @property
    def tree(self) -> SourceTree:
        if self._tree is None:
            self._tree = build_source_tree(self.workdir / "tree")
        return self._tree

    def image(self, variant: Variant | str) -> Path:
        if isinstance(variant, str):
            variant = VARIANTS_BY_NAME[variant]
        if variant.name not in self._images:
            path = self.workdir / f"{variant.name}.img"
            scratch = self.workdir / "scratch"
            scratch.mkdir(exist_ok=True)
            self._images[variant.name] = build_image(variant, self.tree, path, scratch)
        return self._images[variant.name]
