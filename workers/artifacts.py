"""What an attempt leaves in the artifacts object store, and the ResultReported that points at it.

    logs/<task_id>/<attempt>            the attempt's full output log          (ResultReported.log_ref)
    results/<task_id>/<attempt>.json    its test list, when too big to inline  (ResultReported.tests_ref)

Refs are object names in the worker's own bucket (`dtf-artifacts-<worker>`, dtf.streams.buckets), and
readers look for them in the bucket of the worker whose subject the result came on, so a ref names
nothing outside its writer's bucket. A result whose encoded event would pass `MAX_INLINE_EVENT`
bytes moves its `tests` to the store and keeps `counts`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from dtf import events as ev
from dtf.streams import buckets
from dtf.workers.runner import RunResult

log = logging.getLogger("dtf.worker.artifacts")

MAX_INLINE_EVENT = 512 * 1024
"""Half the stream's 1 MiB message limit: room for headers and for the event growing a field."""


def log_name(task_id: str, attempt: int) -> str:
    return f"logs/{task_id}/{attempt}"


def tests_name(task_id: str, attempt: int) -> str:
    return f"results/{task_id}/{attempt}.json"


def result_id(task_id: str, attempt: int) -> str:
    return f"result-{task_id}-{attempt}"


def failed_id(task_id: str, attempt: int) -> str:
    return f"failed-{task_id}-{attempt}"


async def upload_log(nc: Client, js: JetStreamContext, assignment: ev.TaskAssigned, path: Path) -> str:
    """Store the attempt's log file in its worker's bucket (streamed from disk in a thread by the
    object store client)."""
    store = await buckets.own(nc, js, "artifacts", assignment.worker_id)
    name = log_name(assignment.task_id, assignment.attempt)
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        await store.put(name, handle)
    finally:
        handle.close()
    return name


async def result_event(
    nc: Client, js: JetStreamContext, assignment: ev.TaskAssigned, result: RunResult, log_ref: str | None,
) -> ev.ResultReported:
    """The ResultReported for an attempt, with its tests moved to the store when they are too big."""
    event = ev.ResultReported(
        id=result_id(assignment.task_id, assignment.attempt), run_id=assignment.run_id,
        task_id=assignment.task_id, attempt=assignment.attempt, worker_id=assignment.worker_id,
        outcome=result.outcome, exit_code=result.exit_code, duration_s=result.duration_s,
        counts=result.counts, tests=result.tests, metrics=result.metrics, labels=result.labels,
        output_tail=result.output_tail, log_ref=log_ref, category=result.category, reason=result.reason,
    )
    if len(ev.encode(event)) <= MAX_INLINE_EVENT:
        return event
    name = tests_name(assignment.task_id, assignment.attempt)
    try:
        store = await buckets.own(nc, js, "artifacts", assignment.worker_id)
        data = await asyncio.to_thread(msgspec.json.encode, result.tests)
        await store.put(name, data)
    except Exception as exc:  # noqa: BLE001 - the outcome and counts matter without the test list
        log.warning("storing the test list of %s attempt %d failed (%s); reporting counts only",
                    assignment.task_id, assignment.attempt, exc)
        return msgspec.structs.replace(event, tests=[])
    return msgspec.structs.replace(event, tests=[], tests_ref=name)
