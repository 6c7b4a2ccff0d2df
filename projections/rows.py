"""Pure functions from fold states and events to table rows (dicts keyed by schema column names).

An attempt row needs no lookup: the task state just before an attempt event still describes that
attempt (its worker, assigned_at, started_at), so `attempt_row(before, after, event)` is complete.
"""

from __future__ import annotations

import msgspec

from dtf import events as ev
from dtf.state import ACTIVE, TaskState, WorkerState

_json = msgspec.json.Encoder()


def to_json(value: object) -> str:
    return _json.encode(value).decode()


def task_row(task: TaskState) -> dict:
    spec = task.spec
    return {
        "task_id": task.task_id, "run_id": task.run_id, "submitter": task.submitter,
        "project": task.project,
        "type": spec.type if spec else None, "name": spec.name if spec else None,
        "priority": spec.priority if spec else None, "status": task.status,
        "attempts": task.attempt, "failures": task.failures, "worker_id": task.worker_id or None,
        "submitted_at": task.submitted_at, "assigned_at": task.assigned_at,
        "started_at": task.started_at, "finished_at": task.finished_at, "duration_s": task.duration_s,
        "passed": task.counts.passed, "failed": task.counts.failed, "skipped": task.counts.skipped,
        "errors": task.counts.errors, "reason": task.reason,
        "labels": to_json(spec.labels if spec else {}),
        "requirements": to_json(spec.requirements) if spec else None,
        "state": to_json(task),
        "commit": spec.commit if spec else "", "branch": spec.branch if spec else "",
    }


def worker_row(worker: WorkerState) -> dict:
    return {
        "worker_id": worker.worker_id, "host": worker.host, "pid": worker.pid, "status": worker.status,
        "concurrency": worker.concurrency, "capabilities": to_json(worker.capabilities),
        "hardware": list(worker.capabilities.hardware), "registered_at": worker.registered_at,
        "last_heartbeat": worker.last_heartbeat, "reason": worker.reason, "state": to_json(worker),
    }


def _attempt(task: TaskState, status: str, **changes: object) -> dict:
    row = {
        "task_id": task.task_id, "attempt": task.attempt, "run_id": task.run_id,
        "worker_id": task.worker_id, "status": status, "assigned_at": task.assigned_at,
        "started_at": task.started_at, "finished_at": None, "outcome": None, "exit_code": None,
        "duration_s": None, "reason": "", "log_ref": None,
    }
    row.update(changes)
    return row


def attempt_row(before: TaskState | None, after: TaskState, event: ev.TaskEvent) -> dict | None:
    """The full row of the attempt an accepted event touched (None when it touched none)."""
    match event:
        case ev.TaskAssigned():
            return _attempt(after, "assigned")
        case ev.TaskStarted() if before is not None:
            return _attempt(before, "running", started_at=after.started_at)
        case ev.ResultReported() if before is not None:
            return _attempt(
                before, event.outcome, finished_at=event.time, outcome=event.outcome,
                exit_code=event.exit_code, duration_s=event.duration_s, log_ref=event.log_ref,
                reason=_result_reason(event),
            )
        case ev.TaskFailed() if before is not None:
            return _attempt(
                before, "error", finished_at=event.time, reason=f"{event.category}: {event.reason}",
            )
        case ev.TaskReleased() if before is not None:
            return _attempt(before, "released", finished_at=event.time, reason=event.reason)
        case ev.TaskCancelled() if before is not None and before.status in ACTIVE:
            return _attempt(before, "cancelled", finished_at=event.time, reason=event.reason)
    return None


def _result_reason(event: ev.ResultReported) -> str:
    """What the worker said about the attempt ("task: <the collection error>"); results from before
    it said anything fall back to the end of their output."""
    if event.reason:
        return f"{event.category}: {event.reason}" if event.category else event.reason
    return "" if event.outcome == "passed" else event.output_tail[-200:]


def test_rows(event: ev.ResultReported, tests: list[ev.TestOutcome], hardware: list[str]) -> list[dict]:
    return [
        {
            "run_id": event.run_id, "task_id": event.task_id, "attempt": event.attempt,
            "worker_id": event.worker_id, "nodeid": test.nodeid, "outcome": test.outcome,
            "duration_s": test.duration_s, "message": test.message, "time": event.time,
            "hardware": hardware, "longrepr": test.longrepr, "short": test.short, "file": test.file,
            "line": test.line, "classname": test.classname, "stdout": test.stdout, "stderr": test.stderr,
        }
        for test in tests
    ]


def metric_rows(event: ev.ResultReported, hardware: list[str]) -> list[dict]:
    labels = to_json(event.labels)
    return [
        {
            "run_id": event.run_id, "task_id": event.task_id, "attempt": event.attempt,
            "worker_id": event.worker_id, "name": name, "value": value, "labels": labels,
            "time": event.time, "hardware": hardware,
        }
        for name, value in event.metrics.items()
    ]


def event_row(stream: str, seq: int, subject: str, event: ev.Event, applied: bool) -> dict:
    return {
        "stream": stream, "seq": seq, "event_id": event.id, "subject": subject,
        "type": type(event).__name__, "time": event.time, "applied": applied,
    }


def invalid_row(stream: str, seq: int, subject: str, reason: str, raw: bytes) -> dict:
    return {"stream": stream, "seq": seq, "subject": subject, "reason": reason, "raw": raw}

