# Sourced by ext4box scripts (and mirrored by the tests): the environment that
# makes podman work on our machines without editing anything under /etc.
# shellcheck shell=bash
_ext4box_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -f "$_ext4box_here/../compose/containers.conf" ]; then
    _ext4box_conf=$(cd "$_ext4box_here/../compose" && pwd)  # a checkout: scripts/../compose
else
    _ext4box_conf=$_ext4box_here  # installed: /usr/share/ext4box (make install)
fi
export CONTAINERS_CONF="${CONTAINERS_CONF:-$_ext4box_conf/containers.conf}"
if [ "$(id -u)" -ne 0 ] && [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    # No systemd/loginctl here: make the per-user runtime dir podman expects.
    XDG_RUNTIME_DIR="${TMPDIR:-/tmp}/ext4box-run-$(id -u)"
    mkdir -p -m 0700 "$XDG_RUNTIME_DIR"
    export XDG_RUNTIME_DIR
fi
if [ "$(id -u)" -ne 0 ]; then
    # Native overlay instead of the vfs fallback (see the file's comment).
    export CONTAINERS_STORAGE_CONF="${CONTAINERS_STORAGE_CONF:-$_ext4box_conf/storage-rootless.conf}"
fi
unset _ext4box_here _ext4box_conf
