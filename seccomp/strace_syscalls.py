#!/usr/bin/env python3
"""Summarise an `strace -ff -qq -o PREFIX` trace (one file per process/thread).

    strace --decode-pids=pidns -ff -qq -o PREFIX ...
    strace_syscalls.py PREFIX [--after-filter N]

Prints JSON {"all": {name: count}, "after": {...}, "denied_after": {...}}:
"after" counts the syscalls each task made once N seccomp filters applied to
it (installed by itself or inherited through clone/fork from its parent);
"denied_after" those that failed with EPERM there. In a container run, filter
1 is the OCI profile runc installs before exec'ing the entrypoint; in a run
of the service on the host, filter 1 is the service's own stage 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from collections import Counter

_CALL = re.compile(r"^(\w+)\(")
_ERRNO = re.compile(r"\)\s+=\s+-1\s+(\w+)")
_FILTER = re.compile(r"^(seccomp\(SECCOMP_SET_MODE_FILTER|prctl\(PR_SET_SECCOMP).*\)\s+=\s+0$")
# With --decode-pids=pidns a pid from another pid namespace (the container's)
# is followed by its number in strace's: "= 2 /* 13924 in strace's PID NS */".
_FORK = re.compile(r"^(?:clone3?|fork|vfork)\(.*\)\s+=\s+(\d+)(?:\s+/\* (\d+) in strace)?")


def summarise(prefix: str, after_filter: int) -> dict[str, dict[str, int]]:
    tasks: dict[str, list[str]] = {}
    for path in glob.glob(prefix + ".*"):
        with open(path, errors="replace") as f:
            tasks[path.rsplit(".", 1)[1]] = f.read().splitlines()
    # A task inherits the filters its parent held when it cloned it.
    inherited: dict[str, int] = {}
    everything: Counter[str] = Counter()
    after: Counter[str] = Counter()
    denied: Counter[str] = Counter()
    pending = sorted(tasks, key=int)
    done: set[str] = set()
    # Parents before children: process any task whose parent is known.
    children_of: dict[str, list[tuple[int, str]]] = {}
    for pid, lines in tasks.items():
        for index, line in enumerate(lines):
            fork = _FORK.match(line)
            if fork:
                child = fork.group(2) or fork.group(1)
                children_of.setdefault(pid, []).append((index, child))
    child_pids = {child for kids in children_of.values() for _, child in kids}
    queue = [pid for pid in pending if pid not in child_pids]
    while queue:
        pid = queue.pop()
        if pid in done:
            continue
        done.add(pid)
        filters = inherited.get(pid, 0)
        forks = dict(children_of.get(pid, []))
        for index, line in enumerate(tasks.get(pid, [])):
            match = _CALL.match(line)
            if not match:
                continue
            name = match.group(1)
            everything[name] += 1
            if filters >= after_filter:
                after[name] += 1
                err = _ERRNO.search(line)
                if err and err.group(1) == "EPERM":
                    denied[name] += 1
            if _FILTER.match(line):
                filters += 1
            if index in forks:
                inherited[forks[index]] = filters
                queue.append(forks[index])
    return {
        "all": dict(sorted(everything.items())),
        "after": dict(sorted(after.items())),
        "denied_after": dict(sorted(denied.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prefix")
    parser.add_argument("--after-filter", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(summarise(args.prefix, args.after_filter), indent=1))


if __name__ == "__main__":
    main()
