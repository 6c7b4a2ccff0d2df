"""Showing a run as it goes: a rich progress bar on a terminal, one plain line per finished task
otherwise (CI logs), always on stderr so stdout stays clean for --json. Notices (a task found
unschedulable, a missed deadline) are printed once each, even when the progress display is off."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dtf.state import TaskState


def notices(tasks: list[TaskState], seen: set[tuple[str, str, int]]) -> list[str]:
    """Lines not printed yet about tasks that wait for a worker that does not exist, or missed their
    deadline; tasks with the same reason share one line. Updates `seen`."""
    stuck: dict[str, list[str]] = {}
    lines = []
    for task in sorted(tasks, key=lambda t: t.task_id):
        if task.status == "unschedulable" and ("unschedulable", task.task_id, task.unschedulable) not in seen:
            seen.add(("unschedulable", task.task_id, task.unschedulable))
            stuck.setdefault(task.reason, []).append(task.task_id)
        if task.deadline_missed is not None and ("deadline", task.task_id, 0) not in seen:
            seen.add(("deadline", task.task_id, 0))
            lines.append(f"dtf: {task.task_id} missed its deadline"
                         + (f" {task.spec.deadline:%Y-%m-%dT%H:%M:%SZ}" if task.spec and task.spec.deadline else "")
                         + f" ({task.status}; it goes on)")
    for reason, ids in stuck.items():
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        lines.insert(0, f"dtf: unschedulable, still waiting: {shown}: {reason}")
    return lines


class RunProgress:
    def __init__(self, run_id: str, enabled: bool = True) -> None:
        self.run_id = run_id
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.tty = enabled and sys.stderr.isatty()
        self.reported: set[str] = set()
        self.noticed: set[tuple[str, str, int]] = set()
        self.bar: Progress | None = None
        self.bar_task = None

    def __enter__(self) -> RunProgress:
        if self.tty:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("[green]{task.fields[passed]} passed [red]{task.fields[failed]} failed"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
            )
            self.bar.start()
            self.bar_task = self.bar.add_task(self.run_id, total=None, passed=0, failed=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, tasks: list[TaskState]) -> None:
        for line in notices(tasks, self.noticed):
            if self.bar is not None:
                self.bar.console.print(line, markup=False, highlight=False)
            else:
                print(line, file=sys.stderr, flush=True)
        if not self.enabled:
            return
        done = [t for t in tasks if t.terminal]
        passed = sum(t.counts.passed for t in tasks)
        failed = sum(t.counts.failed + t.counts.errors for t in tasks)
        if self.bar is not None:
            self.bar.update(self.bar_task, total=len(tasks), completed=len(done), passed=passed, failed=failed)
            return
        for task in done:
            if task.task_id not in self.reported:
                self.reported.add(task.task_id)
                c = task.counts
                print(
                    f"[{len(self.reported)}/{len(tasks)}] {task.task_id} {task.status}"
                    f" ({c.passed} passed, {c.failed} failed, {c.skipped} skipped, {c.errors} errors)"
                    f"{' on ' + task.worker_id if task.worker_id else ''}"
                    f"{': ' + task.reason if task.reason and task.status != 'passed' else ''}",
                    file=sys.stderr, flush=True,
                )
