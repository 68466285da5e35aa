"""The man page and the bash completion, generated from the argparse definitions.

One source of truth: cli.build_parser(). `make install` runs
`python -m ext4box.clidoc man` and `python -m ext4box.clidoc bash` and
installs what they print, so a new option reaches `man ext4box` and TAB
without anyone editing a second file.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Iterator

from ext4box import __version__
from ext4box.cli import build_parser

HIDDEN = {"service"}  # the in-container entrypoint, not for users


def commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """(path, parser, one-line summary) of every visible command, depth first."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        summaries = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            if name in HIDDEN:
                continue
            path = (*prefix, name)
            yield path, sub, summaries.get(name, "")
            yield from commands(sub, path)


def _arguments(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if action.help != argparse.SUPPRESS:
            yield action


# -- man page -----------------------------------------------------------------------


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote on a line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in ".'" else line for line in text.split("\n"))


def _argument_label(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"\\fI{_roff(str(action.metavar or action.dest).upper())}\\fR"
    names = ", ".join(f"\\fB{_roff(option)}\\fR" for option in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (
        "{" + ",".join(action.choices) + "}" if action.choices else action.dest.upper()
    )
    return f"{names} \\fI{_roff(str(metavar))}\\fR"


def _usage(parser: argparse.ArgumentParser) -> str:
    usage = parser.format_usage().strip()
    return usage.removeprefix("usage: ")


def manpage(parser: argparse.ArgumentParser | None = None) -> str:
    parser = parser or build_parser()
    today = datetime.date.today().isoformat()
    out = [
        f'.TH EXT4BOX 1 "{today}" "ext4box {__version__}" "User Commands"',
        ".SH NAME",
        "ext4box \\- " + _roff(parser.description or ""),
        ".SH SYNOPSIS",
        ".nf",
        _roff(_usage(parser)),
        ".fi",
        ".SH DESCRIPTION",
        _roff(
            "ext4box parses ext4 images in a memory-safe implementation instead of the kernel"
            " and serves them through FUSE: in this process (serve), or in a rootless,"
            " sandboxed container that receives the image and /dev/fuse as file descriptors"
            " (mount), when the TOML policy in /etc/ext4box/policy.d allows it."
        ),
        ".SH OPTIONS",
    ]
    for action in _arguments(parser):
        out += [".TP", _argument_label(action), _roff(action.help or "")]
    out.append(".SH COMMANDS")
    for path, sub, summary in commands(parser):
        out += [".SS " + _roff(" ".join(path)), _roff(summary[:1].upper() + summary[1:] + ".")]
        out += [".PP", ".nf", _roff(_usage(sub)), ".fi"]
        for action in _arguments(sub):
            out += [".TP", _argument_label(action), _roff(action.help or "")]
        if sub.epilog:
            out += [".PP", "Examples:", ".PP", ".nf", ".RS"]
            out += [_roff(line.strip()) for line in sub.epilog.splitlines()[1:] if line.strip()]
            out += [".RE", ".fi"]
    out += [
        ".SH FILES",
        ".TP",
        "\\fI/etc/ext4box/policy.d/*.toml\\fR",
        "Mount policy, read in name order; the first matching rule decides.",
        ".TP",
        "\\fI/usr/share/ext4box/\\fR",
        "The seccomp profile, podman configuration, policy examples and the server image"
        " archive that `make install` puts there.",
        ".TP",
        "\\fI/run/ext4box/mounts\\fR, \\fI$XDG_RUNTIME_DIR/ext4box/mounts\\fR",
        "One record per active mount (root's, a user's).",
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBEXT4BOX_LOG_LEVEL\\fR, \\fBEXT4BOX_LOG_FORMAT\\fR",
        "As \\fB\\-\\-log\\-level\\fR and \\fB\\-\\-log\\-format\\fR.",
        ".TP",
        "\\fBEXT4BOX_SECCOMP_PROFILE\\fR",
        "The server's seccomp allowlist, looked for first; without one no container starts.",
        ".TP",
        "\\fBEXT4BOX_SERVER_IMAGE\\fR",
        f"The server image (default localhost/ext4box:{__version__}).",
        ".SH EXIT STATUS",
        "0 on success, 1 on an error (one line starting with \\(lqext4box: error:\\(rq),"
        " 2 on a usage error.",
        ".SH SEE ALSO",
        "\\fBfusermount3\\fR(1), \\fBpodman\\fR(1), \\fBe2fsck\\fR(8)",
    ]
    return "\n".join(out) + "\n"


# -- bash completion ------------------------------------------------------------------


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [opt for action in parser._actions for opt in action.option_strings]


def _choices(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """option -> its fixed values (--mode ro rw, --log-level ...)."""
    return {
        opt: [str(choice) for choice in action.choices]
        for action in parser._actions
        if action.choices and action.option_strings
        for opt in action.option_strings
    }


def _subcommand_names(parser: argparse.ArgumentParser) -> list[str]:
    return [path[-1] for path, _sub, _ in commands(parser) if len(path) == 1]


def bash_completion(parser: argparse.ArgumentParser | None = None) -> str:
    """A bash completion function: subcommands, their options, option values, files."""
    parser = parser or build_parser()
    cases = []
    for path, sub, _summary in commands(parser):
        words = " ".join([*_subcommand_names(sub), *_options(sub)])
        cases.append(f'        "{" ".join(path)}") words="{words}" ;;')
    value_cases = []
    everyone = [parser, *(sub for _path, sub, _ in commands(parser))]
    choices = {opt: values for p in everyone for opt, values in _choices(p).items()}
    for opt, values in sorted(choices.items()):
        words = " ".join(values)
        value_cases.append(
            f'        {opt}) COMPREPLY=($(compgen -W "{words}" -- "$cur")); return ;;'
        )
    directory_options = sorted(
        {
            opt
            for p in everyone
            for a in p._actions
            if a.metavar == "DIR"
            for opt in a.option_strings
        }
    )
    valued = sorted(
        {opt for p in everyone for a in p._actions if a.nargs != 0 for opt in a.option_strings}
        - {"-h", "--help"}
    )
    top = " ".join([*_subcommand_names(parser), *_options(parser)])
    nested = "|".join(sorted({path[0] for path, _sub, _ in commands(parser) if len(path) > 1}))
    nested = nested or "--never"
    return f"""# bash completion for ext4box, generated from its argparse definitions
# (python -m ext4box.clidoc bash); installed by `make install`.
_ext4box() {{
    local cur prev words path="" i
    cur=${{COMP_WORDS[COMP_CWORD]}}
    prev=${{COMP_WORDS[COMP_CWORD-1]}}
    case "$prev" in
{chr(10).join(value_cases)}
        {"|".join(directory_options) or "--never"}) COMPREPLY=($(compgen -d -- "$cur")); return ;;
    esac
    # The command path so far: the first word that is not an option, and its
    # subcommand when it has some ({nested}).
    local valued=" {" ".join(valued)} "
    for ((i = 1; i < COMP_CWORD; i++)); do
        [[ "$valued" == *" ${{COMP_WORDS[i-1]}} "* ]] && continue  # an option's value
        case "${{COMP_WORDS[i]}}" in
            -*) ;;
            *) if [ -z "$path" ]; then path=${{COMP_WORDS[i]}}
               else
                   case "$path" in {nested}) path="$path ${{COMP_WORDS[i]}}" ;; esac
                   break
               fi ;;
        esac
    done
    case "$path" in
        "") words="{top}" ;;
{chr(10).join(cases)}
        *) words="" ;;
    esac
    # Files only where a command takes arguments, not where it wants a subcommand.
    if [[ "$cur" == -* || -z "$path" || "$path" == @({nested}) ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$words" -- "$cur") $(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F _ext4box ext4box
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["man"], ["bash"]):
        print("usage: python -m ext4box.clidoc {man|bash}", file=sys.stderr)
        return 2
    sys.stdout.write(manpage() if argv == ["man"] else bash_completion())
    return 0


if __name__ == "__main__":
    sys.exit(main())
