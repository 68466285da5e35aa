#!/usr/bin/env bash
# Build the offline base image localhost/ext4box-base:bookworm.
#
# Our machines reach Debian's package registry but no container registry, so
# instead of pulling debian:bookworm-slim we debootstrap a minimal bookworm
# root filesystem that already holds what the server needs at run time
# (python3, libfuse3-3), pack it as a tarball in a per-machine cache, and
# `podman import` it. The tarball is reused until the package list changes,
# so CI pays the ~40 s debootstrap once per machine.
#
# Environment:
#   EXT4BOX_CACHE_DIR   where the rootfs tarball is cached
#                       (default /var/cache/ext4box as root,
#                        else ${XDG_CACHE_HOME:-~/.cache}/ext4box)
#   EXT4BOX_BASE_IMAGE  image name to create (default localhost/ext4box-base:bookworm)
#   EXT4BOX_MIRROR      Debian mirror (default: the first URI in apt's own sources)
#   EXT4BOX_REBUILD=1   ignore the cached tarball
#   CONTAINERS_CONF     passed through to podman (scripts/podman-env.sh sets it)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=podman-env.sh
source "$here/podman-env.sh"

suite=bookworm
base_image=${EXT4BOX_BASE_IMAGE:-localhost/ext4box-base:$suite}
# Only what the server needs at run time; everything else comes from wheels.
include_pkgs=python3,libfuse3-3,passwd

if [ "$(id -u)" -eq 0 ]; then
    cache_dir=${EXT4BOX_CACHE_DIR:-/var/cache/ext4box}
else
    cache_dir=${EXT4BOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ext4box}
fi

default_mirror() {
    # Use the mirror apt already uses, so a proxy or snapshot setup is honoured.
    local uri
    uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
        grep -v security | head -n1 | awk '{print $2}')
    echo "${uri:-http://deb.debian.org/debian}"
}
mirror=${EXT4BOX_MIRROR:-$(default_mirror)}

# The cache key covers everything that changes the rootfs contents.
key=$(printf '%s\n' "$suite" "$include_pkgs" "$mirror" "minbase" "v1" | sha256sum | cut -c1-12)
tarball="$cache_dir/rootfs-$suite-$key.tar"

if [ "${EXT4BOX_REBUILD:-0}" = 1 ] || [ ! -s "$tarball" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ext4box: building the base rootfs needs root (debootstrap); run this once as root" >&2
        echo "ext4box: or set EXT4BOX_CACHE_DIR to a directory holding $(basename "$tarball")" >&2
        exit 1
    fi
    bash "$here/install-deps.sh" debootstrap
    mkdir -p "$cache_dir"
    work=$(mktemp -d "$cache_dir/.rootfs.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "ext4box: debootstrap --variant=minbase $suite from $mirror (about 40 s)"
    start=$(date +%s)
    debootstrap --variant=minbase --include="$include_pkgs" "$suite" "$work/root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || {
        tail -n 20 "$work/debootstrap.log" >&2
        echo "ext4box: debootstrap failed (log above)" >&2
        exit 1
    }
    # Trim what a server never reads: package caches, docs, man pages, locales.
    rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"* \
        "$work/root/usr/share/doc/"* "$work/root/usr/share/man/"* "$work/root/usr/share/info/"* \
        "$work/root/usr/share/locale/"* "$work/root/var/log/"*
    tar --numeric-owner --xattrs -C "$work/root" -cf "$work/rootfs.tar" .
    mv "$work/rootfs.tar" "$tarball"
    echo "ext4box: cached $tarball ($(( $(date +%s) - start )) s)"
else
    echo "ext4box: using cached $tarball"
fi

bash "$here/install-deps.sh" podman runc uidmap
# Re-import only when the cached tarball is newer than the image (or it is missing).
if podman image exists "$base_image" &&
    [ "$(podman image inspect --format '{{index .Labels "org.ext4box.rootfs-key"}}' "$base_image" 2>/dev/null)" = "$key" ]; then
    echo "ext4box: $base_image is up to date"
    exit 0
fi
podman import --quiet \
    --change "LABEL org.ext4box.rootfs-key=$key" \
    --change 'CMD ["/usr/bin/python3"]' \
    "$tarball" "$base_image" >/dev/null
echo "ext4box: imported $base_image"
