"""Errors raised while loading policy files.

Every problem in a policy file is one line a user can act on:
``FILE:LINE: rule "NAME" key "KEY": what is wrong``. Loading collects every
problem it finds, so one run of ``ext4box policy check`` shows them all.
"""

from __future__ import annotations

from ext4box.policy.text import printable


class PolicyError(Exception):
    """One problem in one policy file (or with the policy directory itself)."""

    def __init__(
        self,
        path: str,
        message: str,
        *,
        line: int | None = None,
        key: str | None = None,
        rule: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.key = key
        self.rule = rule
        self.message = message
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        subject = []
        if self.rule is not None:
            subject.append(f"rule {self.rule}")
        if self.key is not None:
            subject.append(f'key "{self.key}"')
        prefix = f"{where}: " + (" ".join(subject) + ": " if subject else "")
        # A message never spans lines: the user sees exactly one line per problem,
        # and no control character of a (hostile) policy file reaches a terminal.
        return printable(prefix + " ".join(self.message.split()))


class PolicyLoadError(Exception):
    """Loading failed; `errors` holds every problem found, in file and line order."""

    def __init__(self, errors: list[PolicyError]) -> None:
        if not errors:
            raise ValueError("PolicyLoadError needs at least one error")
        self.errors = tuple(errors)
        text = errors[0].one_line()
        if len(errors) > 1:
            text += f" (and {len(errors) - 1} more problem(s))"
        super().__init__(text)

    def lines(self) -> list[str]:
        return [error.one_line() for error in self.errors]
