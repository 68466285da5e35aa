"""Property: whatever surrounds it, a bad key is reported at the line we wrote it on.

The generator lays out rules with keys in random order, interleaved with
comments, multi-line strings and multi-line arrays that contain header and
key look-alikes, and records the line of each key as it writes it: that
record, not the scanner, is the oracle.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ext4box.policy import PolicyLoadError, load_policy

DECOYS = [
    ["# [[rule]]", '# mode = "x"'],
    ['description = """', "[[rule]]", 'mode = "decoy"', '"""'],
    ["description = '''", 'name = "decoy" ]]', "'''"],
    ['description = "[[rule]] mode = \\"x\\""'],
    ["images = [", '    "/srv/[[rule]]/*.img",  # mode = "x"', '    "/srv/b.img",', "]"],
    [""],
]
BAD_VALUES = {
    "mode": 'mode = "sideways"',
    "flags": 'flags = ["exec"]',
    "sha256": 'sha256 = ["1234"]',
    "max_size": "max_size = true",
    "mountpoints": 'mountpoints = ["relative/*"]',
    "extra": 'extra = "unknown key"',
}


@st.composite
def policy_text(draw: st.DrawFn) -> tuple[str, int, str]:
    count = draw(st.integers(min_value=1, max_value=4))
    bad_rule = draw(st.integers(min_value=0, max_value=count - 1))
    bad_key = draw(st.sampled_from(sorted(BAD_VALUES)))
    lines: list[str] = ["# generated policy"]
    bad_line = 0
    for index in range(count):
        lines.append(draw(st.sampled_from(["[[rule]]", "[[ rule ]]", '[["rule"]]'])))
        entries: list[tuple[str, list[str]]] = [
            ("name", [f'name = "r{index}"']),
            ("users", ['users = ["alice", 1000]']),
        ]
        if index == bad_rule:
            entries.append((bad_key, [BAD_VALUES[bad_key]]))
        decoy = draw(st.sampled_from(DECOYS))
        has_images = decoy[0].startswith("images")
        if not has_images:
            entries.append(("images", ['images = ["/srv/*.img"]']))
        entries.append(("decoy", decoy))
        if draw(st.booleans()):
            entries.append(("comment", ["   # trailing comment [[rule]]"]))
        for key, block in draw(st.permutations(entries)):
            if index == bad_rule and key == bad_key:
                bad_line = len(lines) + 1
            lines.extend(block)
    return "\n".join(lines) + "\n", bad_line, bad_key


@settings(max_examples=150, deadline=None)
@given(policy_text())
def test_bad_key_line_is_exact(case: tuple[str, int, str]) -> None:
    text, bad_line, bad_key = case
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "10-gen.toml"
        path.write_text(text)
        try:
            load_policy(directory)
        except PolicyLoadError as error:
            problems = error.errors
        else:
            raise AssertionError("a bad key loaded without error:\n" + text)
    assert [(p.line, p.key) for p in problems] == [(bad_line, bad_key)], text
