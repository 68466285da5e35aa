"""The read side: the read-only `Filesystem` facade, directory readers and caches.

Built on `ext4.format` and `ext4box.blockdev`; it may import nothing of
`ext4.journal` or `ext4.write` (opening a filesystem, which may replay a
journal or build the read-write facade, is `ext4.opening`).
"""
