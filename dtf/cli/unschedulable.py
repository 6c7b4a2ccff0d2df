"""When a command waiting on a run stops waiting because nothing left in it can run: every open task
is unschedulable (no registered worker could ever run it, `dtf.schedule.unschedulable_reason`) or
waits on one that is, and has been for `--unschedulable-timeout` seconds. The decision is pure
(`step`); `Watch` is the shell that feeds it the run's states and the clock while the wait goes on.
Giving up leaves the run queued: a capable worker that registers later still takes it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import click

from dtf.state import TaskState

T = TypeVar("T")

UNSCHEDULABLE_TIMEOUT_S = 300.0
EXIT_UNSCHEDULABLE = 5
"""Its own code, apart from 1 (something failed): nothing ran, the fleet lacks what the run needs."""

UNSCHEDULABLE_TIMEOUT = click.option(
    "--unschedulable-timeout", type=click.FloatRange(min=0), default=UNSCHEDULABLE_TIMEOUT_S, show_default=True,
    metavar="S",
    help="Stop waiting once every task left in the run has been unschedulable (no registered worker can run it, "
         f"or it waits on one that cannot) for S seconds: print each with its reason and exit {EXIT_UNSCHEDULABLE}. "
         "The run stays queued (`dtf cancel --run RUN_ID` cancels it). 0 waits forever.")


def stuck(tasks: list[TaskState]) -> list[TaskState]:
    """The unschedulable tasks of a run none of whose open tasks can go on: each open task is
    unschedulable or pending behind a dependency (in the run, however indirectly) that is. Empty
    when any open task runs, is assigned, or waits only for a free worker or a retry."""
    open_tasks = {t.task_id: t for t in tasks if not t.terminal}
    if not open_tasks or any(t.status not in ("pending", "unschedulable") for t in open_tasks.values()):
        return []
    dependents: dict[str, list[str]] = {}
    for task in open_tasks.values():
        if task.status == "pending" and task.spec is not None:
            for dependency in task.spec.dependencies:
                dependents.setdefault(dependency, []).append(task.task_id)
    blocked = [t.task_id for t in open_tasks.values() if t.status == "unschedulable"]
    reached = set(blocked)
    while blocked:  # what waits on a blocked task is blocked too
        for waiter in dependents.get(blocked.pop(), []):
            if waiter not in reached:
                reached.add(waiter)
                blocked.append(waiter)
    if len(reached) < len(open_tasks):
        return []
    return sorted((t for t in open_tasks.values() if t.status == "unschedulable"), key=lambda t: t.task_id)


def step(since: float | None, tasks: list[TaskState], now: float, limit: float) -> tuple[float | None, bool]:
    """(since when the run has been stuck, None if it is not now; whether to give up). The clock
    starts at the first stuck look and starts again after any look where some task could go on (a
    capable worker came and took one). A `limit` of 0 never gives up."""
    if not stuck(tasks):
        return None, False
    since = now if since is None else since
    return since, limit > 0 and now - since >= limit


class Unschedulable(Exception):
    """Nothing left in the run could run for the whole timeout; `tasks` are the states then."""

    def __init__(self, tasks: list[TaskState]) -> None:
        super().__init__(f"{len(stuck(tasks))} tasks unschedulable")
        self.tasks = tasks


class Watch:
    """Feeds `step` the run's states as the wait sees them (`saw`) and the clock in between, and
    ends the wait (`until_stuck`) with Unschedulable when it says to give up."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.since: float | None = None
        self.tasks: list[TaskState] = []
        self.loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()

    def saw(self, tasks: list[TaskState]) -> None:
        self.tasks = tasks
        self.since, _ = step(self.since, tasks, self.loop.time(), self.limit)
        self.changed.set()

    async def until_stuck(self, work: Awaitable[T]) -> T:
        """`work`'s result, unless the run has been stuck for the limit first (`work` is then cancelled)."""
        job = asyncio.ensure_future(work)
        try:
            while True:
                self.changed.clear()
                waits = {job, asyncio.ensure_future(self.changed.wait())}
                due = None if self.since is None or self.limit == 0 else self.since + self.limit - self.loop.time()
                done, _ = await asyncio.wait(waits, timeout=max(due, 0) if due is not None else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                for waiter in waits - {job}:
                    waiter.cancel()
                if job in done:
                    return job.result()
                self.since, give_up = step(self.since, self.tasks, self.loop.time(), self.limit)
                if give_up:
                    raise Unschedulable(self.tasks)
        finally:
            if not job.done():
                job.cancel()
                await asyncio.gather(job, return_exceptions=True)
