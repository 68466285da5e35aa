#!/usr/bin/env bash
# Re-measure the syscalls of the ext4box server (run as root; ~10 s).
#
#   seccomp/measure.sh [IMAGE]      (IMAGE default localhost/ext4box:<version>)
#
# 1. container: `podman run` with the appliance's flags and a permissive
#    marker profile (default allow) under `strace -ff`: the syscalls made after
#    runc installs that filter are what the OCI profile must allow (runc's
#    last steps, catatonit, Python start-up, the hand-off, stage 2, serving a
#    read workload, unmount, exit).
# 2. host: the service itself under strace: the syscalls made after its own
#    stage-2 filter (what ext4box.service.lockdown must allow).
# Prints both sets and how they differ from seccomp/ext4box.json and
# lockdown.READ_ONLY_SYSCALLS; measurement JSON is left in $OUT (default a temp dir).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
py=${EXT4BOX_PYTHON:-$repo/.venv/bin/python}
# shellcheck source=../scripts/podman-env.sh
source "$repo/scripts/podman-env.sh"
version=$("$py" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo/pyproject.toml")
image=${1:-localhost/ext4box:$version}
out=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/ext4box-measure.XXXXXX")}
mkdir -p "$out/container" "$out/host"

cat >"$out/marker.json" <<'JSON'
{"defaultAction": "SCMP_ACT_ALLOW",
 "syscalls": [{"names": ["acct"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
JSON

trace() {  # trace NAME -- measure_workload args
    local name=$1; shift
    EXT4BOX_SERVICE_WRAPPER="strace --decode-pids=pidns -ff -qq -o $out/$name/t" \
        "$py" "$here/measure_workload.py" "$@" >"$out/$name.log" 2>&1 || {
        cat "$out/$name.log" >&2; echo "measure: $name run failed" >&2; exit 1; }
    "$py" "$here/strace_syscalls.py" "$out/$name/t" --after-filter 1 >"$out/$name.json"
}
trace container container "$out/work-c" "$image" "$out/marker.json"
trace host host "$out/work-h"

PYTHONPATH="$repo/app" "$py" - "$out" "$here/ext4box.json" <<'PY'
import json, sys
from ext4box.service import lockdown
out, profile_path = sys.argv[1], sys.argv[2]
container = json.load(open(f"{out}/container.json"))
host = json.load(open(f"{out}/host.json"))
profile = {n for e in json.load(open(profile_path))["syscalls"] for n in e["names"]}
stage2 = {r.syscall for r in lockdown.rules(writable=False)}
used = set(container["after"])
served = set(host["after"])
print(f"container (after the OCI filter): {len(used)} syscalls")
print("  " + " ".join(sorted(used)))
print(f"  used but not in ext4box.json: {sorted(used - profile) or 'none'}")
print(f"  in ext4box.json, not seen this run: {sorted(profile - used)}")
print(f"  denied (EPERM) after the filter: {container['denied_after']}")
print(f"host service (after stage 2): {len(served)} syscalls")
print("  " + " ".join(sorted(served)))
print(f"  used but not allowed by stage 2: {sorted(served - stage2)} (denied: {host['denied_after']})")
print(f"measurement: {out}")
PY
