"""Which tests of a settled run failed, and why: what `submit --wait` and `dtf wait` list at the end.

The run's results are read from the event log (as the follow that waited for them, so no projector
is needed), each task's from its current attempt, with a test list kept in the artifacts store
fetched from there. Only a run that did not pass is read again; a green run costs nothing.

    collect(js, run_id, tasks) -> [{task_id, nodeid, outcome, file, line, message, short}, ...]
    lines(failures)            -> the text listing: node id, file:line, the short traceback's head
"""

from __future__ import annotations

import logging

import click
from nats.js import JetStreamContext

from dtf import events as ev
from dtf import subjects
from dtf.projections.artifacts import decode_tests
from dtf.state import TaskState
from dtf.streams import feed, objects, topology

log = logging.getLogger("dtf.cli.failures")

MAX_LISTED = 20
"""Failed tests listed in full; the rest are counted ("... and N more")."""
MAX_LINES = 15
MAX_CHARS = 2000
"""Of each listed test's short traceback (its head: pytest's short style puts the test's own frame
first and the exception last, so the head of a long one shows where, `dtf report` shows all)."""


def _current(tasks: dict[str, TaskState], event: ev.ResultReported) -> bool:
    task = tasks.get(event.task_id)
    return task is not None and task.attempt == event.attempt and task.worker_id == event.worker_id


async def _stored_tests(js: JetStreamContext, event: ev.ResultReported) -> list[ev.TestOutcome]:
    """The result's test list, from its worker's bucket (the only place its ref may point)."""
    ref = event.tests_ref
    try:
        return decode_tests(await objects.get(js, topology.artifacts_bucket(event.worker_id), ref))
    except Exception as exc:  # noqa: BLE001 - the counts and the verdict stand without the list
        log.warning("cannot read the test list %s: %s", ref, exc)
        return []


async def collect(js: JetStreamContext, run_id: str, tasks: list[TaskState], scope: str | None = None) -> list[dict]:
    """The failed and errored tests of the run's current attempts, in the tasks' submission order
    (for a submitter, `scope`, from its own feed)."""
    if all(t.status == "passed" for t in tasks):
        return []
    by_id = {t.task_id: t for t in tasks}
    results: dict[str, ev.ResultReported] = {}
    async for msg in feed.read(js, subjects.task(run_id, "*", "result", "*"), scope):
        try:
            event = ev.decode(msg.data)
        except ev.DecodeError:
            continue
        if isinstance(event, ev.ResultReported) and _current(by_id, event):
            results[event.task_id] = event
    order = {t.task_id: (t.submitted_at is None, t.submitted_at, t.task_id) for t in tasks}
    found = []
    for task_id in sorted(results, key=order.__getitem__):
        event = results[task_id]
        tests = event.tests or (await _stored_tests(js, event) if event.tests_ref else [])
        found += [
            {"task_id": task_id, "nodeid": t.nodeid, "outcome": t.outcome, "file": t.file, "line": t.line,
             "message": t.message, "short": t.short}
            for t in sorted(tests, key=lambda t: t.nodeid) if t.outcome in ("failed", "error")
        ]
    return found


def place(failure: dict) -> str:
    """`file:line` (or just the file, or "" when unknown)."""
    if not failure["file"]:
        return ""
    return failure["file"] + (f":{failure['line']}" if failure["line"] is not None else "")


def _head(text: str) -> list[str]:
    text = text.rstrip()
    shown = text[:MAX_CHARS].splitlines()[:MAX_LINES]
    rest = len(text.splitlines()) - len(shown)
    if rest > 0 or len(text) > MAX_CHARS:
        shown.append(f"... ({max(rest, 1)} more lines: dtf report --format md)")
    return shown


def lines(failures: list[dict]) -> list[str]:
    """The listing `submit --wait` prints after the run's table."""
    if not failures:
        return []
    out = [f"{len(failures)} failed test{'s' if len(failures) != 1 else ''}:"]
    for failure in failures[:MAX_LISTED]:
        where = place(failure)
        out.append(f"{failure['outcome'].upper()} {failure['nodeid']}" + (f" ({where})" if where else ""))
        out += [f"    {line}" for line in _head(failure["short"] or failure["message"] or "")]
    if len(failures) > MAX_LISTED:
        out.append(f"... and {len(failures) - MAX_LISTED} more")
    return out


def show(failures: list[dict]) -> None:
    for line in lines(failures):
        click.echo(line)

