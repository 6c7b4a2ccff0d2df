"""What a command that waits on a run does when interrupted (SIGINT/SIGTERM): the decision whether
to cancel the run's unfinished tasks, and the shell that races the wait against the signal."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from typing import Literal, TypeVar

import click

from dtf.cli.common import Stopped, unless_set

T = TypeVar("T")

EXIT_INTERRUPTED = 130
"""What shells report for a process ended by SIGINT (128 + 2); CI treats it as "cancelled"."""

CANCEL_ON_INTERRUPT = click.option(
    "--cancel-on-interrupt", is_flag=True,
    help="On SIGINT/SIGTERM while waiting, cancel the run's unfinished tasks (default: ask on a terminal, "
         "else leave the run going). Exits 130 either way.")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived before what we were waiting for."""


def on_interrupt(cancel_on_interrupt: bool, interactive: bool) -> Literal["cancel", "ask", "leave"]:
    """The flag cancels; without it a person at a terminal is asked; a script (no TTY on stdin) is
    not, and its run goes on: a CI job that was itself cancelled should say so with the flag."""
    if cancel_on_interrupt:
        return "cancel"
    return "ask" if interactive else "leave"


async def until_interrupted(work: Awaitable[T]) -> T:
    """`work`'s result, or Interrupted if SIGINT/SIGTERM comes first (`work` is then cancelled).
    The handlers are ours only while waiting, so a second Ctrl-C at a prompt afterwards still ends
    the process the usual way."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    sigs = (signal.SIGINT, signal.SIGTERM)
    for sig in sigs:
        loop.add_signal_handler(sig, signalled.set)
    try:
        return await unless_set(work, signalled)
    except Stopped:
        raise Interrupted from None
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
