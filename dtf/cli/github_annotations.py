"""GitHub Actions annotations for failed tests: `::error file=F,line=N,title=NODEID::MESSAGE`.

Printed by `submit --wait` and `dtf wait` when GITHUB_ACTIONS=true (or `--annotations github`), so
each failure shows on the pull request's diff at its line. Escaped as the runner unescapes workflow
commands: in the message `%`, CR and LF; in a property also `:` and `,` (which would end it).
"""

from __future__ import annotations

import os

import click

MAX_ANNOTATIONS = 50
"""GitHub shows at most 10 error annotations per step and 50 per job; more are noise."""
MAX_MESSAGE = 4000


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def error_line(failure: dict) -> str:
    """One `::error` command for a failure from `dtf.cli.failures.collect`."""
    properties = []
    if failure["file"]:
        properties.append(f"file={escape_property(failure['file'])}")
        if failure["line"] is not None:
            properties.append(f"line={failure['line']}")
    properties.append(f"title={escape_property(failure['nodeid'])}")
    message = (failure["message"] or failure["short"] or failure["outcome"])[:MAX_MESSAGE]
    return f"::error {','.join(properties)}::{escape_data(message)}"


def wanted(choice: str) -> bool:
    """`--annotations auto|github|none`: auto means in GitHub Actions."""
    return choice == "github" or (choice == "auto" and os.environ.get("GITHUB_ACTIONS") == "true")


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> object:
    ctx.meta["dtf.annotations"] = value
    return value


annotations_option = click.option(
    "--annotations", type=click.Choice(["auto", "github", "none"]), default="auto", show_default=True,
    expose_value=False, callback=_remember,
    help="Annotate each failed test for GitHub Actions (auto: when GITHUB_ACTIONS=true).")
"""Kept in the context's meta (as `ci_options` does), so the commands' signatures stay as they are."""


def emit(failures: list[dict], to_stderr: bool) -> None:
    """Print the annotations if this command wants them (on stderr when stdout carries JSON: the
    runner reads workflow commands from both)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or not wanted(ctx.meta.get("dtf.annotations", "auto")):
        return
    for failure in failures[:MAX_ANNOTATIONS]:
        click.echo(error_line(failure), err=to_stderr)
