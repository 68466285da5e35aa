#!/usr/bin/env bash
# Build localhost/ext4box:VERSION offline (no registry, no network in RUN steps).
#
#   1. scripts/build-base.sh makes localhost/ext4box-base:bookworm (cached).
#   2. Wheels for ext4box and every dependency are built on the host into a
#      temporary build context (PyPI is reachable from the host, not from
#      inside a --network=none build).
#   3. podman build --pull=never --network=none with that context.
#
# Environment:
#   EXT4BOX_PYTHON      host Python 3.11 used for `pip wheel` (default: .venv/bin/python)
#   EXT4BOX_BASE_IMAGE  base image (default localhost/ext4box-base:bookworm)
#   EXT4BOX_IMAGE       image repository (default localhost/ext4box)
#   EXT4BOX_IMAGE_TAG   image tag (default: the version in pyproject.toml). The
#                       tests tag by content (tests/support/server_image.py), so
#                       checkouts building side by side never share a name.
#   EXT4BOX_SKIP_BASE=1 use an existing base image as is
# Prints the image reference on the last line of stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=podman-env.sh
source "$here/podman-env.sh"

py=${EXT4BOX_PYTHON:-$repo/.venv/bin/python}
base_image=${EXT4BOX_BASE_IMAGE:-localhost/ext4box-base:bookworm}
image_repo=${EXT4BOX_IMAGE:-localhost/ext4box}

if [ "$(id -u)" -eq 0 ]; then
    bash "$here/install-deps.sh" podman runc uidmap catatonit
fi
command -v podman >/dev/null || { echo "ext4box: podman is not installed" >&2; exit 1; }

if [ "${EXT4BOX_SKIP_BASE:-0}" != 1 ]; then
    EXT4BOX_BASE_IMAGE=$base_image bash "$here/build-base.sh" >&2
fi

# Binary wheels (pyfuse3, crc32c, cffi) must match the image's CPython 3.11.
"$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "ext4box: $py is not CPython 3.11 (the image runs Debian bookworm's python3.11)" >&2
    exit 1
}
version=$("$py" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo/pyproject.toml")
source_url=$(git -C "$repo" remote get-url origin 2>/dev/null || echo "file://$repo")

context=$(mktemp -d "${TMPDIR:-/tmp}/ext4box-image.XXXXXX")
trap 'rm -rf "$context"' EXIT
start=$(date +%s)
echo "ext4box: building wheels" >&2
# Build from a copy: setuptools writes build/ and *.egg-info next to the
# sources, which a rootless builder may not (and root should not) do in the repo.
mkdir -p "$context/src"
cp "$repo/pyproject.toml" "$repo/README.md" "$context/src/"
tar -C "$repo" --exclude='__pycache__' --exclude='*.egg-info' -cf - app | tar -C "$context/src" -xf -
"$py" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$context/wheels" "$context/src" >&2
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$context/wheels" pip >&2

image="$image_repo:${EXT4BOX_IMAGE_TAG:-$version}"
echo "ext4box: podman build $image from $base_image" >&2
podman build --quiet \
    --pull=never --network=none \
    --build-arg "BASE=$base_image" \
    --build-arg "VERSION=$version" \
    --build-arg "SOURCE=$source_url" \
    --tag "$image" \
    -f "$repo/Containerfile" "$context" >&2
echo "ext4box: built $image in $(( $(date +%s) - start )) s," \
    "$(podman image inspect --format '{{.Size}}' "$image") bytes" >&2
echo "$image"
