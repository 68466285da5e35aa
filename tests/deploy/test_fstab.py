"""mount(8), /etc/fstab and systemd .mount/.automount units, from the README (issue 16).

mount(8) runs mount.fuse3 for type fuse.ext4box, which runs `ext4box IMAGE
DIR -o OPTIONS` from the standard PATH. There is no systemd here and /etc/fstab
is the host's, so: the README's fstab line goes into a temporary fstab used
with `mount --fstab`/`mount -a -T`, its units are checked by `systemd-analyze
verify`, and the mount(8) command systemd runs for a .mount unit is run as
such. Each scenario runs in a private mount namespace (docs.snippets) in
which this checkout's ext4box is bound over /usr/local/sbin, the first
directory of mount(8)'s PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.test_systemd import analyze
from docs.snippets import REPO, Outcome, run_snippet, snippet
from support.mount_options import accepted_options
from support.serve import why_no_fuse

SECTION = "mount(8), fstab and systemd"
_no_fuse = why_no_fuse()
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) and private mount namespaces need root"),
    pytest.mark.skipif(_no_fuse is not None, reason=f"FUSE unavailable: {_no_fuse}"),
    pytest.mark.skipif(shutil.which("mount.fuse3") is None,
                       reason="mount.fuse3 is not installed (package fuse3)"),
]

# Inside the namespace: this checkout's ext4box where mount.fuse3's shell finds it.
_SHIM = (
    "bash", "-c",
    'shim=$(mktemp -d /tmp/shim.XXXXXX) && ln -s "$0" "$shim/ext4box"'
    ' && mount --bind "$shim" /usr/local/sbin && exec "$@"',
    str(Path(sys.executable).parent / "ext4box"),
)  # fmt: skip
# Wait for the server of a mount to exit: its pid, found in our own namespace.
# (Anchored: the shell running the scenario has the same words in its script.)
_SERVER_PID = "pgrep --ns $$ --nslist mnt -f '^[^ ]+ [^ ]*/ext4box /srv/disk.img /mnt/disk'"
_WAIT_GONE = 'timeout 60 tail --pid="$pid" -f /dev/null; ! kill -0 "$pid" 2>/dev/null'


def readme_block(lang: str) -> list[str]:
    """The README's ```LANG blocks in SECTION, concatenated in order."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {SECTION}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"^```{lang}\n(.*?)^```", section, flags=re.MULTILINE | re.DOTALL)
    assert blocks, f"README: no {lang} block under {SECTION!r}"
    return blocks


def _run(code: str) -> Outcome:
    if not Path(_SHIM[-1]).exists():
        reason = f"no {_SHIM[-1]} (make deps)"
        print(reason)
        pytest.skip(reason)
    return run_snippet(code, prefix=_SHIM, timeout=300)


def _assert_ok(outcome: Outcome) -> None:
    assert outcome.failed == [] and outcome.returncode == 0, outcome.stdout + outcome.stderr


def test_readme_mount_command_as_written():
    code = snippet(SECTION, "mkfs.ext4")
    outcome = _run(code + f"pid=$({_SERVER_PID}) || true; echo \"left: $pid\"\n")
    _assert_ok(outcome)
    assert "Hello" in outcome.stdout or "hello" in outcome.stdout, outcome.stdout
    # The unmount in the README stopped the server: none is left in the namespace.
    assert "left: \n" in outcome.stdout, outcome.stdout


def test_readme_fstab_line_mounts_rw_and_umount_stops_the_server():
    [fstab] = readme_block("fstab")
    fields = fstab.split()
    assert fields[:3] == ["/srv/disk.img", "/mnt/disk", "fuse.ext4box"], fstab
    code = f"""set -e
mkfs.ext4 -q -d examples/tree /srv/disk.img 16M; mkdir -p /mnt/disk
cat > /tmp/fstab <<'FSTAB'
{fstab.rstrip()}
FSTAB
mount -a -T /tmp/fstab
grep ' /mnt/disk ' /proc/self/mountinfo
pid=$({_SERVER_PID})
echo 'written through fstab' > /mnt/disk/new.txt
umount /mnt/disk
{_WAIT_GONE}
mount --fstab /tmp/fstab /mnt/disk
cat /mnt/disk/new.txt
pid=$({_SERVER_PID})
umount /mnt/disk
{_WAIT_GONE}
e2fsck -fn /srv/disk.img
"""
    outcome = _run(code)
    _assert_ok(outcome)
    mountinfo = next(line for line in outcome.stdout.splitlines() if " /mnt/disk " in line)
    per_mount, after = mountinfo.split()[5], mountinfo.partition(" - ")[2]
    assert after.startswith("fuse.ext4box /srv/disk.img rw"), mountinfo
    assert "noatime" in per_mount.split(","), mountinfo
    assert "written through fstab" in outcome.stdout


def test_readme_units_verify_and_their_mount_command_works(tmp_path: Path):
    tool = analyze()
    units = readme_block("ini")
    mount_unit = next(unit for unit in units if "[Mount]" in unit)
    automount_unit = next(unit for unit in units if "[Automount]" in unit)
    (tmp_path / "mnt-disk.mount").write_text(mount_unit)
    (tmp_path / "mnt-disk.automount").write_text(automount_unit)
    proc = subprocess.run(
        [tool, "verify", str(tmp_path / "mnt-disk.mount"), str(tmp_path / "mnt-disk.automount")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0 and not said.strip(), said
    # verify reads the directives: a misspelled one is reported.
    (tmp_path / "mnt-disk.mount").write_text(mount_unit.replace("Options=", "Optoins="))
    noisy = subprocess.run([tool, "verify", str(tmp_path / "mnt-disk.mount")],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "Optoins" in noisy.stderr
    # What systemd runs for the .mount unit: mount What Where -t Type -o Options.
    directive = dict(
        line.split("=", 1) for line in mount_unit.splitlines() if "=" in line and line[0] != "#"
    )
    code = f"""set -e
mkfs.ext4 -q -d examples/tree /srv/disk.img 16M; mkdir -p /mnt/disk
mount {directive['What']} {directive['Where']} -t {directive['Type']} -o {directive['Options']}
pid=$({_SERVER_PID})
ls /mnt/disk
echo unit > /mnt/disk/unit.txt
umount /mnt/disk
{_WAIT_GONE}
e2fsck -fn /srv/disk.img
"""
    outcome = _run(code)
    _assert_ok(outcome)
    assert "hello.txt" in outcome.stdout


def test_every_accepted_option_mounts_through_mount8():
    """`mount -t fuse.ext4box -o OPT` (mount(8), then mount.fuse3, then ext4box)
    mounts for every option `ext4box serve` accepts (issue 18 item 4: an
    option accepted by ext4box and refused further down fails the mount)."""
    lines = ["mkfs.ext4 -q -d examples/tree /srv/disk.img 16M; mkdir -p /mnt/disk"]
    for option in accepted_options():
        lines.append(f"""if mount -t fuse.ext4box -o {option} /srv/disk.img /mnt/disk; then
  pid=$({_SERVER_PID}); test -e /mnt/disk/hello.txt && echo "mounted: {option}"
  umount /mnt/disk; {_WAIT_GONE}
fi""")  # fmt: skip
    lines.append("e2fsck -fn /srv/disk.img")
    outcome = _run("\n".join(lines) + "\n")
    assert outcome.returncode == 0, outcome.stdout + outcome.stderr
    mounted = {line.removeprefix("mounted: ") for line in outcome.stdout.splitlines()
               if line.startswith("mounted: ")}  # fmt: skip
    assert sorted(set(accepted_options()) - mounted) == [], outcome.stderr


def test_appliance_option_takes_only_ro_or_rw(tmp_path: Path):
    """`-o appliance` routes to `ext4box mount`, whose options the policy decides."""
    proc = subprocess.run(
        [sys.executable, "-m", "ext4box", str(tmp_path / "a.img"), str(tmp_path),
         "-o", "ro,appliance,noatime"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "ext4box: error: option 'noatime' cannot be used with -o appliance: the policy decides"
        " the appliance's mount options (only ro or rw may be asked for)"
    ]


def test_appliance_option_routes_to_the_appliance(tmp_path: Path):
    """The same missing image: `serve` says it cannot open it, while the
    appliance route answers first with its policy (a decision or an error)."""
    missing, mnt = str(tmp_path / "missing.img"), str(tmp_path)

    def error_line(*options: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "ext4box", missing, mnt, "-o", *options],
                              capture_output=True, text=True, timeout=120, cwd="/")  # fmt: skip
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        return lines[0]

    assert error_line("ro").startswith(f"ext4box: error: cannot open image {missing}")
    routed = error_line("ro,appliance")
    assert routed.startswith("ext4box: error: ") and "cannot open image" not in routed, routed
    assert "polic" in routed or "denied" in routed, routed
