#!/usr/bin/env bash
# The 30-second tour: build an ext4 image from examples/tree, serve it with
# ext4box, look around, unmount. Everything lives in a temp dir that is removed
# (after unmounting) however the script ends.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
ext4box="$repo/.venv/bin/ext4box"
[ -x "$ext4box" ] || { echo "demo: $ext4box missing; run 'make demo'" >&2; exit 1; }

work="$(mktemp -d -t ext4box-demo.XXXXXX)"
image="$work/example.img"
mnt="$work/mnt"
server_pid=""

cleanup() {
    if mountpoint -q "$mnt" 2>/dev/null; then
        umount "$mnt" 2>/dev/null || fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" || true
    fi
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        # Give the server a moment to notice the unmount before stopping it.
        sleep 1
        kill "$server_pid" 2>/dev/null || true
    fi
    [ -n "$server_pid" ] && wait "$server_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "==> mkfs.ext4 -d examples/tree -> $image"
truncate -s 8M "$image"
mkfs.ext4 -q -F -t ext4 -b 4096 -L ext4box-demo -d "$repo/examples/tree" "$image"
mkdir "$mnt"

echo "==> ext4box serve $image $mnt -o ro"
"$ext4box" serve -f "$image" "$mnt" -o ro 2>"$work/serve.log" &
server_pid=$!

before="$(stat -c %d "$work")"
for _ in $(seq 1 100); do
    if [ "$(stat -c %d "$mnt" 2>/dev/null || echo "$before")" != "$before" ]; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "demo: ext4box serve exited early:" >&2
        cat "$work/serve.log" >&2
        exit 1
    fi
    sleep 0.1
done
if [ "$(stat -c %d "$mnt")" = "$before" ]; then
    echo "demo: the mount did not appear within 10 s" >&2
    cat "$work/serve.log" >&2
    exit 1
fi

echo "==> ls -lR $mnt"
ls -lR "$mnt"
echo "==> cat $mnt/greeting (a symlink to hello.txt)"
cat "$mnt/greeting"
echo "==> cat $mnt/docs/about.txt"
cat "$mnt/docs/about.txt"

echo "==> unmount"
umount "$mnt" 2>/dev/null || fusermount3 -u "$mnt"
status=0
wait "$server_pid" || status=$?
server_pid=""
if [ "$status" -ne 0 ]; then
    echo "demo: ext4box serve exited with $status" >&2
    cat "$work/serve.log" >&2
    exit "$status"
fi
echo "==> done: ext4box served the image and exited cleanly"
