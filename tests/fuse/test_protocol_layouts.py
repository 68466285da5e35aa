"""Every structure ext4box.fuse.protocol declares matches the installed linux/fuse.h.

A C program compiled against /usr/include/linux/fuse.h prints sizeof and the
offsetof of every declared field; the Python layouts must agree, field for field.
Opcodes and flags are checked the same way, by value.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ext4box.fuse import protocol

HEADER = Path("/usr/include/linux/fuse.h")


def _skip_reason() -> str | None:
    if not HEADER.exists():
        return f"no {HEADER} (package linux-libc-dev)"
    if shutil.which("gcc") is None:
        return "no gcc"
    return None


def _c_values(tmp_path: Path, expressions: list[str]) -> list[int]:
    # A 32-bit constant such as (1 << 31) is a negative int in C: keep its 32 bits.
    lines = [f'    printf("%llu\\n", (unsigned long long)({expr}) & '
             f'(sizeof({expr}) == 4 ? 0xffffffffULL : ~0ULL));' for expr in expressions]
    source = "\n".join([
        "#include <stdio.h>", "#include <stddef.h>", "#include <linux/fuse.h>",
        "int main(void) {", *lines, "    return 0;", "}",
    ])  # fmt: skip
    (tmp_path / "layouts.c").write_text(source)
    subprocess.run(["gcc", "-std=gnu11", "-o", str(tmp_path / "layouts"),
                    str(tmp_path / "layouts.c")], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "layouts")], check=True, capture_output=True, text=True)
    return [int(line) for line in out.stdout.split()]


def test_layouts_match_the_kernel_header(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    expressions, ours = [], []
    for layout in protocol.LAYOUTS:
        expressions.append(f"sizeof(struct {layout.name})")
        ours.append((f"sizeof {layout.name}", layout.size))
        for field, offset in layout.offsets().items():
            expressions.append(f"offsetof(struct {layout.name}, {field})")
            ours.append((f"{layout.name}.{field}", offset))
    theirs = _c_values(tmp_path, expressions)
    mismatches = [(what, mine, real) for (what, mine), real in zip(ours, theirs, strict=True)
                  if mine != real]
    assert not mismatches
    assert len(protocol.LAYOUTS) >= 40


def test_constants_match_the_kernel_header(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    ours = [(f"FUSE_{op.name}", int(op)) for op in protocol.Opcode
            if op not in protocol.NEWER_THAN_HEADER]
    ours += [(f"FUSE_NOTIFY_{code.name}", int(code)) for code in protocol.NotifyCode]
    ours += [(f"FUSE_{flag.name}", int(flag)) for flag in protocol.InitFlag]
    ours += [(f"FUSE_{name}", getattr(protocol, name)) for name in dir(protocol)
             if name.startswith(("OPEN_", "WRITE_", "SETXATTR_ACL", "GETATTR_", "FSYNC_",
                                 "IOCTL_"))
             and isinstance(getattr(protocol, name), int)]
    ours += [(name, getattr(protocol, name)) for name in dir(protocol)
             if name.startswith(("FATTR_", "FOPEN_"))]
    ours += [("FUSE_KERNEL_VERSION", protocol.KERNEL_VERSION),
             ("FUSE_KERNEL_MINOR_VERSION", protocol.KERNEL_MINOR_VERSION),
             ("FUSE_ROOT_ID", protocol.ROOT_ID),
             ("FUSE_MIN_READ_BUFFER", protocol.MIN_READ_BUFFER),
             ("FUSE_COMPAT_SETXATTR_IN_SIZE", protocol.SETXATTR_IN_COMPAT_SIZE)]
    theirs = _c_values(tmp_path, [name for name, _ in ours])
    mismatches = [(name, mine, real) for (name, mine), real in zip(ours, theirs, strict=True)
                  if mine != real]
    assert not mismatches
