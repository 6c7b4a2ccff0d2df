"""A submitter's own stored task logs, through the query service: `dtf.query.log.<submitter>`.

    log  {"task_id", "offset"?} -> {"data": base64 of up to CHUNK bytes, "next_offset"}

A submitter may not read the workers' artifacts buckets, so the projector, which may, answers for
the tasks the read model says are that submitter's: the log of the task's last attempt that stored
one, from the bucket of the worker that attempt was assigned to. A log bigger than a reply comes in
pages of CHUNK bytes. Another submitter's task is refused ({"error", "refused": true}, the CLI's exit 3).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated

import duckdb
import msgspec
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError

from dtf import wire
from dtf.projections.queries import foreign_task
from dtf.streams import objects
from dtf.streams.topology import artifacts_bucket

CHUNK = 512 * 1024
"""Log bytes per reply: base64 makes it ~700 KB, under NATS's 1 MB."""

_encoder = msgspec.json.Encoder()


class LogRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    task_id: str
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


def log_ref(con: duckdb.DuckDBPyConnection, task_id: str, submitter: str) -> tuple[str, str] | None:
    """(worker, ref) of the stored log of the task's last attempt that has one, if the task is
    `submitter`'s."""
    cur = con.cursor()
    try:
        row = cur.execute(
            "SELECT a.worker_id, a.log_ref FROM attempts a JOIN tasks t ON t.task_id = a.task_id"
            " WHERE a.task_id = $task AND t.submitter = $submitter AND a.log_ref IS NOT NULL"
            " ORDER BY a.attempt DESC LIMIT 1", {"task": task_id, "submitter": submitter},
        ).fetchone()
    finally:
        cur.close()
    return (row[0], row[1]) if row else None


def page(data: bytes, offset: int) -> dict:
    chunk = data[offset:offset + CHUNK]
    end = offset + len(chunk)
    return {"data": base64.b64encode(chunk).decode(), "next_offset": end if end < len(data) else None}


async def answer(js: JetStreamContext, con: duckdb.DuckDBPyConnection, data: bytes, submitter: str) -> bytes:
    """The JSON reply to one log request of `submitter`'s. Never raises: a failure is {"error": ...}."""
    try:
        request = wire.decode(data.strip() or b"{}", as_type=LogRequest)
    except wire.WireError as exc:
        return _encoder.encode({"error": f"bad log request: {exc}"})
    found = await asyncio.to_thread(log_ref, con, request.task_id, submitter)
    if found is None:
        if await asyncio.to_thread(foreign_task, con, request.task_id, submitter):
            return _encoder.encode({"error": f"task {request.task_id} is another submitter's: {submitter} may "
                                             "read only its own tasks' logs", "refused": True})
        return _encoder.encode({"error": f"no stored log of task {request.task_id} among {submitter}'s tasks"})
    worker, ref = found
    bucket = artifacts_bucket(worker)
    try:
        stored = await objects.get(js, bucket, ref)
    except NotFoundError:
        return _encoder.encode({"error": f"log {ref} is gone from {bucket}"})
    except JetStreamError as exc:
        return _encoder.encode({"error": f"log {ref}: {exc}"})
    return _encoder.encode(page(stored, request.offset))
