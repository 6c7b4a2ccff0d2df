"""Checking that documented command lines (compose services, CI examples) are real dtf commands:
parsed by the real CLI without running them."""

from __future__ import annotations

import re
import shlex

import click

from dtf.cli import main


def resolve_dtf_command(argv: list[str]) -> click.Context:
    """Parse `dtf <command> [options]` with the real CLI, without running it. Raises click's
    UsageError family (NoSuchOption, BadParameter, ...) exactly as `dtf` itself would."""
    if not argv or argv[0] != "dtf":
        raise click.UsageError(f"not a dtf command: {argv!r}")
    if len(argv) < 2 or argv[1].startswith("-"):
        raise click.UsageError(f"expected `dtf <command> ...`, got {argv!r}")
    root = click.Context(main, info_name="dtf")
    command = main.get_command(root, argv[1])
    if command is None:
        raise click.UsageError(f"no such dtf command: {argv[1]!r}")
    # resilient_parsing=False: unknown options, missing values and bad types all raise.
    return command.make_context(argv[1], list(argv[2:]), parent=root)


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def dtf_invocations(script: str) -> list[list[str]]:
    """The `dtf ...` commands of a shell script, as argv lists: backslash-continued lines joined,
    leading VAR=value assignments dropped, `$VAR` / `${VAR}` left as words (they are values)."""
    joined = re.sub(r"\\\n\s*", " ", script)
    found = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True, posix=True)
        while words and ASSIGNMENT.match(words[0]):
            words.pop(0)
        if words and words[0] == "dtf":
            found.append(words)
    return found
