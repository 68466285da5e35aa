"""The orphan list's upkeep costs the same whatever the list's length (issue 18 item 2).

Unlinked-but-open inodes wait on the on-disk orphan list until their last
handle closes, in any order. Releasing one must touch a bounded number of
inodes (itself and its predecessor), not walk the list from the superblock:
the tests count the inode reads and stores of each release on a long list,
releasing from the tail (the worst case of a walk), the head, the middle and
at random, and check after every release that the chain on the image is the
expected one. A list left by a crash must be processed by the next mount,
ours and the kernel's, ending e2fsck-clean.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_writable_ops import VARIANTS

from ext4box.ext4.format.inode import ROOT_INO
from ext4box.ext4.write.writable import WritableFilesystem
from support.facade import Ours, assert_clean, make_image, need_kernel, pattern
from support.kernel import kernel_mount

pytestmark = pytest.mark.kernel

ORPHANS = 300
# Inode reads and stores a release may do whatever the list's length: the inode
# itself (read, stored freed), its predecessor (read, stored), and a few more
# that freeing its blocks and number may cause.
MAX_INODE_IO_PER_RELEASE = 8


class InodeIO:
    """Counts the inode table reads and writes a WritableFilesystem does."""

    def __init__(self, fs: WritableFilesystem) -> None:
        self.count = 0
        self._table = table = fs.table
        self._originals = {name: getattr(table, name) for name in ("read", "write")}
        for name, method in self._originals.items():
            setattr(table, name, self._counted(method))

    def _counted(self, method: Callable[..., object]) -> Callable[..., object]:
        def counted(*args: object, **kwargs: object) -> object:
            self.count += 1
            return method(*args, **kwargs)

        return counted

    @contextmanager
    def measured(self) -> Iterator[list[int]]:
        box = [0]
        before = self.count
        yield box
        box[0] = self.count - before

    def stop(self) -> None:
        for name, method in self._originals.items():
            setattr(self._table, name, method)


def on_disk_chain(fs: WritableFilesystem) -> list[int]:
    """The orphan list as stored: s_last_orphan, then each inode's i_dtime."""
    chain: list[int] = []
    current = int(fs.writer.superblock().fields["last_orphan"])
    while current and len(chain) <= ORPHANS:
        chain.append(current)
        current = fs.table.read(current).dtime
    return chain


def orphaned(image: Path, count: int) -> tuple[Ours, list[int]]:
    """`count` files written, then unlinked while open; the list from head to tail."""
    ours = Ours(image)
    inos = []
    for i in range(count):
        name = f"f{i}"
        ours.create(name)
        ours.write(name, 0, pattern(i, 1 + (i % 3) * 3000))
        inos.append(ours.resolve(name))
    for i in range(count):
        ours.fs.unlink(ROOT_INO, f"f{i}".encode(), still_open=True)
    chain = list(reversed(inos))  # each unlink puts its inode at the head
    assert on_disk_chain(ours.fs) == chain
    return ours, chain


def release_order(chain: list[int], order: str) -> list[int]:
    if order == "tail-first":
        return list(reversed(chain))
    if order == "head-first":
        return list(chain)
    if order == "middle-out":
        middle = len(chain) // 2
        return [chain[i] for i in sorted(range(len(chain)), key=lambda i: (abs(i - middle), i))]
    shuffled = list(chain)
    random.Random(18).shuffle(shuffled)
    return shuffled


@pytest.mark.parametrize("order", ["tail-first", "head-first", "middle-out", "random"])
@pytest.mark.parametrize("variant", ["ext4-1k-csum", "ext2-1k"])
def test_release_in_any_order_touches_a_bounded_number_of_inodes(
        tmp_path: Path, variant: str, order: str) -> None:
    need_kernel()
    image = make_image(tmp_path / "o.img", VARIANTS[variant])
    ours, chain = orphaned(image, ORPHANS)
    order_of_release = release_order(chain, order)
    assert sorted(order_of_release) == sorted(chain)
    counter = InodeIO(ours.fs)
    costs = []
    remaining = list(chain)
    for step, ino in enumerate(order_of_release):
        with counter.measured() as cost:
            ours.fs.release_orphan(ino)
        costs.append(cost[0])
        remaining.remove(ino)
        if step % 37 == 0 or len(remaining) < 3:
            counter.stop()
            assert on_disk_chain(ours.fs) == remaining, f"after releasing {ino}"
            counter = InodeIO(ours.fs)
    counter.stop()
    assert max(costs) <= MAX_INODE_IO_PER_RELEASE, (
        f"a release did {max(costs)} inode reads/stores (list of {ORPHANS})")
    assert on_disk_chain(ours.fs) == []
    ours.close()
    assert_clean(image)


@pytest.mark.parametrize("variant", ["ext4-1k-csum", "ext2-1k"])
def test_crash_left_list_is_processed_at_mount(tmp_path: Path, variant: str) -> None:
    """Some orphans released from the middle and the ends, the rest left listed by a
    crash: the kernel's mount and ours each free exactly those, e2fsck-clean after."""
    need_kernel()
    image = make_image(tmp_path / "c.img", VARIANTS[variant])
    ours, chain = orphaned(image, 120)
    released = [chain[0], chain[60], chain[61], chain[-1], *chain[10:20]]
    for ino in released:
        ours.fs.release_orphan(ino)
    left = [ino for ino in chain if ino not in released]
    assert on_disk_chain(ours.fs) == left
    free_inodes_crashed = ours.fs.statfs().files_free
    ours.fs.commit(durable=True)
    ours.dev.close()  # the process dies here: no release of the rest, no close

    kernel_image = tmp_path / "kernel.img"
    shutil.copyfile(image, kernel_image)
    with kernel_mount(kernel_image, tmp_path / "kmnt", readonly=False):
        pass
    assert_clean(kernel_image)

    ours = Ours(image)  # the mount processes the list
    assert int(ours.fs.writer.superblock().fields["last_orphan"]) == 0
    assert ours.fs.statfs().files_free == free_inodes_crashed + len(left)
    # The mirror of the list starts empty and works: one more orphan, released.
    ours.create("late")
    late = ours.resolve("late")
    ours.fs.unlink(ROOT_INO, b"late", still_open=True)
    assert on_disk_chain(ours.fs) == [late]
    ours.fs.release_orphan(late)
    assert on_disk_chain(ours.fs) == []
    ours.close()
    assert_clean(image)
