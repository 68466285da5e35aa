"""The write side: allocators, metadata writer, tree/directory/xattr/inline
writers, namespace and attribute operations, orphans, quotas and the
read-write facade `WritableFilesystem`.

It may import `ext4.journal` (the jbd2 writer, fast-commit tags), `ext4.read`
and `ext4.format`; nothing below it imports it.
"""
