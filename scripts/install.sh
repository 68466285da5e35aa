#!/usr/bin/env bash
# `make install` / `make uninstall` (root): ext4box for every user of this host.
#
#   /opt/ext4box/                  a virtualenv on the system Python with ext4box in it
#   /usr/local/bin/ext4box         -> /opt/ext4box/bin/ext4box (on every user's PATH)
#   /usr/share/ext4box/            seccomp/ext4box.json, containers.conf,
#                                  storage-rootless.conf, podman-env.sh,
#                                  policy-examples/, ext4box-VERSION.oci.tar (for users'
#                                  `podman load`), installed.list
#   /etc/ext4box/policy.d/         created empty: no rule is enabled by installing
#   /usr/local/lib/systemd/system/ ext4box-server.socket, ext4box-server@.service,
#                                  ext4box-broker.socket, ext4box-broker.service (not enabled)
#   /usr/local/share/man/man1/ext4box.1, /usr/share/bash-completion/completions/ext4box
#   /usr/share/doc/ext4box/README.md
#   root's podman storage          localhost/ext4box:VERSION (built if missing)
#
# Uninstall removes exactly that; it keeps /etc/ext4box/policy.d if an admin put
# rules there, and keeps the server image if it was there before the install.
#
# Environment:
#   EXT4BOX_PYTHON_SYSTEM  the system Python for the virtualenv (default /usr/bin/python3)
#   EXT4BOX_IMAGE_BUILD=0  do not build the server image when root has none (warn instead)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

OPT=/opt/ext4box
BIN=/usr/local/bin/ext4box
SHARE=/usr/share/ext4box
POLICY_DIR=/etc/ext4box/policy.d
UNITS=/usr/local/lib/systemd/system
MAN=/usr/local/share/man/man1/ext4box.1
COMPLETION=/usr/share/bash-completion/completions/ext4box
DOC=/usr/share/doc/ext4box
MANIFEST=$SHARE/installed.list
CREATED_DIRS=$SHARE/created-dirs  # directories that did not exist before: removed if empty

say() { echo "ext4box install: $*" >&2; }
die() { echo "ext4box install: error: $*" >&2; exit 1; }

version() {
    sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -n1
}

install_venv() {
    local python=${EXT4BOX_PYTHON_SYSTEM:-/usr/bin/python3} src
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$python is older than 3.11"
    say "virtualenv $OPT on $python"
    rm -rf "$OPT"
    "$python" -m venv "$OPT"
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src=$(mktemp -d "${TMPDIR:-/tmp}/ext4box-install.XXXXXX")
    cp "$repo/pyproject.toml" "$repo/README.md" "$src/"
    tar -C "$repo" --exclude='__pycache__' --exclude='*.egg-info' -cf - app | tar -C "$src" -xf -
    "$OPT/bin/python" -m pip install --quiet --disable-pip-version-check "$src"
    rm -rf "$src"
    chmod -R a+rX "$OPT"
    ln -sfn "$OPT/bin/ext4box" "$BIN"
}

# Create each directory of $@ (parents first) that is missing, noting it for uninstall.
make_dirs() {
    local dir missing
    for dir in "$@"; do
        missing=()
        while [ ! -d "$dir" ]; do
            missing=("$dir" "${missing[@]}")
            dir=$(dirname "$dir")
        done
        for dir in "${missing[@]}"; do
            install -d -m 0755 "$dir"
            echo "$dir" >>"$CREATED_DIRS"
        done
    done
}

install_files() {
    say "configuration, profile and examples under $SHARE and $POLICY_DIR"
    make_dirs "$SHARE/seccomp" "$SHARE/policy-examples" "$DOC" "$UNITS" "$(dirname "$MAN")" \
        "$(dirname "$COMPLETION")"
    install -m 0644 "$repo/seccomp/ext4box.json" "$SHARE/seccomp/ext4box.json"
    install -m 0644 "$repo/compose/containers.conf" "$repo/compose/storage-rootless.conf" "$SHARE/"
    install -m 0644 "$repo/scripts/podman-env.sh" "$SHARE/podman-env.sh"
    install -m 0644 "$repo"/policy/*.toml "$repo/policy/README.md" "$SHARE/policy-examples/"
    install -m 0644 "$repo/README.md" "$DOC/README.md"
    # Examples are not enabled: the directory exists, empty, so every mount is
    # denied until the admin copies or writes a rule.
    make_dirs "$POLICY_DIR"
    # The units name the installed command (the repository's name /usr/bin).
    sed "s|/usr/bin/ext4box|$BIN|" "$repo/compose/systemd/ext4box-server@.service" \
        >"$UNITS/ext4box-server@.service"
    sed "s|/usr/bin/ext4box|$BIN|" "$repo/compose/systemd/ext4box-broker.service" \
        >"$UNITS/ext4box-broker.service"
    install -m 0644 "$repo/compose/systemd/ext4box-server.socket" \
        "$repo/compose/systemd/ext4box-broker.socket" "$UNITS/"
    chmod 0644 "$UNITS/ext4box-server@.service" "$UNITS/ext4box-broker.service"
    "$OPT/bin/python" -m ext4box.clidoc man >"$MAN"
    "$OPT/bin/python" -m ext4box.clidoc bash >"$COMPLETION"
    chmod 0644 "$MAN" "$COMPLETION"
}

install_image() {
    local image="localhost/ext4box:$(version)" archive
    archive="$SHARE/ext4box-$(version).oci.tar"
    # shellcheck source=podman-env.sh
    source "$SHARE/podman-env.sh"
    if ! command -v podman >/dev/null; then
        say "podman is not installed: skipping the server image (ext4box doctor will say so)"
        return
    fi
    if podman image exists "$image"; then
        say "server image $image already in root's storage"
    elif [ "${EXT4BOX_IMAGE_BUILD:-1}" = 1 ]; then
        say "building the server image $image (scripts/build-image.sh)"
        EXT4BOX_PYTHON=$OPT/bin/python "$repo/scripts/build-image.sh" >/dev/null
        echo "$image" >"$SHARE/image-installed"
    else
        say "root has no server image $image (EXT4BOX_IMAGE_BUILD=0): build it with scripts/build-image.sh"
        return
    fi
    # Users load it into their own rootless storage (README: "Every user").
    rm -f "$archive"
    podman save --quiet --format oci-archive -o "$archive" "$image"
    chmod 0644 "$archive"
}

write_manifest() {
    {
        echo "$OPT"
        echo "$BIN"
        find "$SHARE" "$DOC" -type f
        echo "$UNITS/ext4box-server@.service"
        echo "$UNITS/ext4box-server.socket"
        echo "$UNITS/ext4box-broker.service"
        echo "$UNITS/ext4box-broker.socket"
        echo "$MAN"
        echo "$COMPLETION"
    } | sort -u >"$MANIFEST.new"
    mv "$MANIFEST.new" "$MANIFEST"
}

do_install() {
    [ "$(id -u)" -eq 0 ] || die "run as root (it installs under /opt, /usr and /etc)"
    local created=""
    [ -f "$CREATED_DIRS" ] && created=$(cat "$CREATED_DIRS")  # a reinstall keeps the list
    [ -d "$SHARE" ] || created+=$'\n'"$SHARE"
    install -d -m 0755 "$SHARE"
    printf '%s\n' "$created" | sed '/^$/d' >"$CREATED_DIRS"
    install_venv
    install_files
    install_image
    write_manifest
    say "installed ext4box $(version): $BIN; check a user's setup with \`ext4box doctor\`"
}

do_uninstall() {
    [ "$(id -u)" -eq 0 ] || die "run as root"
    if [ -f "$SHARE/image-installed" ] && command -v podman >/dev/null; then
        # shellcheck source=podman-env.sh
        source "$SHARE/podman-env.sh"
        podman rmi --ignore "$(cat "$SHARE/image-installed")" >/dev/null || true
    fi
    if [ -L "$BIN" ] && [ "$(readlink "$BIN")" = "$OPT/bin/ext4box" ]; then rm -f "$BIN"; fi
    local created="" dir
    [ -f "$CREATED_DIRS" ] && created=$(tac "$CREATED_DIRS")  # children before parents
    rm -rf "$OPT" "$DOC"
    rm -f "$UNITS/ext4box-server@.service" "$UNITS/ext4box-server.socket" \
        "$UNITS/ext4box-broker.service" "$UNITS/ext4box-broker.socket" "$MAN" "$COMPLETION"
    rm -rf "${SHARE:?}"/*
    for dir in $created; do
        [ -d "$dir" ] || continue
        rmdir "$dir" 2>/dev/null || say "kept $dir: it holds files of yours"
    done
    rmdir "$SHARE" 2>/dev/null || true
    say "uninstalled"
}

case "${1:-}" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) die "usage: $0 install|uninstall" ;;
esac
