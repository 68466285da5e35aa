#!/usr/bin/env bash
# Run the test suite in a mount namespace of its own (as root).
#
# This machine's / is a private mount: a namespace that anyone creates
# (unshare, a container) copies every mount that exists at that moment, and a
# FUSE server only sees its unmount once the last copy is gone. In a private
# namespace of our own, the suite's FUSE mounts never appear in the host's
# namespace, so nobody else can copy them and keep our servers alive.
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
if [ "$(id -u)" -eq 0 ] && [ -z "${EXT4BOX_TEST_NAMESPACE:-}" ]; then
    export EXT4BOX_TEST_NAMESPACE=private
    exec unshare --mount --propagation private -- "$py" -m pytest "$@"
fi
exec "$py" -m pytest "$@"
