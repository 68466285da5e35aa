"""Shared test machinery: image builders, kernel and FUSE mounts, the diff walk."""
