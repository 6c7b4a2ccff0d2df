"""Admission rules for submissions: pure functions of a TaskSubmitted, its stored bytes and what the
fold knows so far, so the coordinator, the projector, `dtf wait` and every replay refuse the same
messages for the same reasons (each refused submission gets a TaskRejected on the record).

    size       the message, and its spec as re-encoded (what every TaskAssigned carries), fit
               `limits.MAX_SUBMISSION_BYTES`, far below what NATS accepts in one message
    ownership  a run belongs to the submitter of its first admitted task; others cannot add to it
               (a task in someone else's run would change that run's verdict)
    task ids   a task id is submitted once; the same event stored again (a republish after the
               dedup window) is harmless, any other submission of the id is refused

A rejection counts as its submitter's task too (it claims a new run, and it fails the run it is in),
so the rejection of anyone else's message in an owned run is kept on the record but is no task of
that run: garbage published into your run cannot flip its verdict either.

The CLI runs the same checks before it publishes (`dtf submit` exits 2 on them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import msgspec

from dtf import events as ev
from dtf import subjects
from dtf.limits import MAX_SUBMISSION_BYTES

if TYPE_CHECKING:
    from dtf.state import TaskState

_encoder = msgspec.json.Encoder()


def oversize(event: ev.TaskSubmitted, data: bytes | None = None) -> str | None:
    """Why the submission is too big (None when it fits). `data` is the message as stored (None:
    as this process would encode it)."""
    size = len(data) if data is not None else len(ev.encode(event))
    if size > MAX_SUBMISSION_BYTES:
        return f"submission is {size} bytes; the limit is {MAX_SUBMISSION_BYTES}"
    spec = len(_encoder.encode(event.spec))
    if spec > MAX_SUBMISSION_BYTES:
        return f"spec is {spec} bytes; the limit is {MAX_SUBMISSION_BYTES}"
    return None


def foreign_run(run_id: str, submitter: str, owners: Mapping[str, str]) -> str | None:
    """Why `submitter` may not add to the run (None when the run is new or its own)."""
    owner = owners.get(run_id)
    if owner is not None and owner != submitter:
        return f"run {run_id} belongs to submitter {owner}"
    return None


def rejected_submitter(event: ev.TaskRejected) -> str:
    """Who sent the message a TaskRejected refuses: the party of a submission's subject ("" for
    anything else, e.g. a message on a malformed task subject)."""
    source = subjects.parse(event.source_subject)
    return source.party if source.kind == "submitted" else ""


def taken_task_id(event: ev.TaskSubmitted, known: TaskState | None) -> str | None:
    """Why the task id cannot be submitted again (None when it is new, or this very event again:
    same id, time, submitter and spec; a task from a snapshot written before submissions kept their
    id is matched by the rest)."""
    if known is None:
        return None
    if known.run_id != event.run_id:
        return f"task id {event.task_id} is already used by run {known.run_id}"
    same = (known.submitted_at, known.submitter, known.spec) == (event.time, event.submitter, event.spec)
    if same and known.submission in ("", event.id):
        return None
    return f"task id {event.task_id} is already submitted in run {known.run_id}; submit new work under a new task id"
