"""What does `ext4box IMAGE DIR -o OPTS`, mount(8)'s FUSE helper form, mean?

`mount -t fuse.ext4box IMAGE DIR -o OPTS` (and an fstab line of that type)
runs mount.fuse3, which runs `ext4box IMAGE DIR -o OPTS` through /bin/sh with
the standard PATH, after dropping the options only mount(8) cares about
(noauto, nofail, _netdev, x-*, ...; `user` arrives as noexec,nosuid,nodev).
(as root it adds "dev,suid", mount(8)'s defaults, and "rw" when no ro/rw was
given). That form is `ext4box serve IMAGE DIR -o OPTS`, which returns once the mount is
live, as a mount helper must. With `-o appliance` it is `ext4box mount`: the
sandboxed server, where the policy, not the mount line, decides the options.
"""

from __future__ import annotations

from ext4box.fuse.mount import FSTAB_ONLY_OPTIONS, FSTAB_ONLY_PREFIXES, split_options

APPLIANCE_OPTION = "appliance"
# mount(8) run by root spells out its defaults: mount.fuse3 receives "dev,suid"
# unless the line says nodev/nosuid. ext4box mounts are nosuid,nodev whatever
# is asked, so in this form they are defaults to drop, not requests to refuse.
_MOUNT8_DEFAULTS = frozenset({"dev", "suid"})
# What `-o appliance` takes from the mount line besides ro/rw: options every
# appliance mount has anyway, and those meant for mount(8) alone.
_APPLIANCE_IMPLIED = frozenset({"nosuid", "nodev", "default_permissions"})


class HelperFormError(Exception):
    """The mount line asks for something the chosen route cannot do."""


def is_helper_form(argv: list[str], commands: set[str]) -> bool:
    """`ext4box IMAGE ...`: the first word is neither an option nor a command."""
    return bool(argv) and not argv[0].startswith("-") and argv[0] not in commands


def translate(argv: list[str]) -> list[str]:
    """Our own command line for the helper form (argv without the program name)."""
    positional, option_values, rest = _split(argv)
    options = [opt for opt in split_options(option_values) if opt not in _MOUNT8_DEFAULTS]
    if APPLIANCE_OPTION not in options:
        flags = ["-o", ",".join(options)] if options else []
        return ["serve", *positional, *flags, *rest]
    mode = "ro"
    for opt in options:
        if opt in ("ro", "rw"):
            mode = opt
        elif not _taken_as_is(opt):
            raise HelperFormError(
                f"option {opt!r} cannot be used with -o {APPLIANCE_OPTION}: the policy"
                " decides the appliance's mount options (only ro or rw may be asked for)"
            )
    return ["mount", *positional, f"--{mode}", *rest]


def _taken_as_is(opt: str) -> bool:
    """True for the options an appliance mount line may carry besides ro/rw."""
    return (
        opt == APPLIANCE_OPTION
        or opt in _APPLIANCE_IMPLIED
        or opt in FSTAB_ONLY_OPTIONS
        or opt.startswith(FSTAB_ONLY_PREFIXES)
    )


def _split(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(IMAGE DIR, the values of every -o, any other arguments as given)."""
    positional: list[str] = []
    option_values: list[str] = []
    rest: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "-o":
            option_values.append(next(words, ""))
        elif word.startswith("-o") and len(word) > 2:
            option_values.append(word[2:])
        elif word.startswith("-"):
            rest.append(word)
        else:
            positional.append(word)
    return positional, option_values, rest
