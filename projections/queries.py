"""The read model's questions, as pure functions of a DuckDB cursor; `answer` is the wire form.

    tasks    {"run_id"?, "offset"?, "limit"?} -> {"tasks": [...], "next_offset"}
    workers  {"offset"?, "limit"?}            -> {"workers": [...], "next_offset"}
    results  {"run_id"?, "task_id"?, "offset"?, "limit"?} -> {"results": [...], "next_offset"}
             each with a failed test's longrepr, short, file, line, classname, stdout, stderr
    status   {}                               -> {"checkpoints": {stream: seq}, "events": n, ...}
    durations {"files": [...], "project"?, "last"?} -> {"durations": [{nodeid, duration_s, runs}], ...}
    aggregate, flaky, runs: see projections/aggregate.py, flaky.py and report.py
    anomalies {"series"?, "run_id"?, "kind"?} -> {"anomalies": [...]}: see projections/anomalies.py

A submitter asks on `dtf.query.<name>.<submitter>` (`SCOPED`): the service sets the request's
`submitter`, so every query answers from that submitter's runs only, and a `run_id` of another's
run is refused. A refusal is {"error": "...", "refused": true}, which the CLI ends with exit 3.

Replies stay under NATS's 1 MB payload limit: a list is cut before ~900 KB and `next_offset` says
where the next page starts (null at the end); `limit` caps a page further. Pages follow a stable
order, so paging through a table that is not changing sees every row once. A bad request gets
{"error": "..."}. The same functions serve a CLI that opens a database file no process holds.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

import duckdb
import msgspec

from dtf import wire
from dtf.projections import aggregate, anomalies, durations, flaky, report, schema

MAX_REPLY_BYTES = 900_000
PAGE_ROWS = 1000
"""Rows read per round trip while filling a page."""

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class Page(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    offset: NonNegative = 0
    limit: Positive | None = None


class TasksRequest(Page, kw_only=True, forbid_unknown_fields=True):
    run_id: str | None = None
    submitter: str | None = None


class WorkersRequest(Page, kw_only=True, forbid_unknown_fields=True):
    submitter: str | None = None
    """Asked by a submitter: the fleet without what it does not need (host, pid, reason)."""


class ResultsRequest(Page, kw_only=True, forbid_unknown_fields=True):
    run_id: str | None = None
    task_id: str | None = None
    project: str | None = None
    """Only the tasks submitted under this project (`submit --project`), within the caller's scope."""
    submitter: str | None = None


class StatusRequest(msgspec.Struct, forbid_unknown_fields=True):
    pass


_encoder = msgspec.json.Encoder()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _page(
    cur: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any], request: Page,
    item: Callable[[tuple], dict],
) -> tuple[list[dict], int | None]:
    """Rows of `sql` (which must end in ORDER BY) from request.offset, as many as fit in a reply."""
    items: list[dict] = []
    size = 0
    position = request.offset
    wanted = request.limit
    while wanted is None or len(items) < wanted:
        chunk = PAGE_ROWS if wanted is None else min(PAGE_ROWS, wanted - len(items))
        found = cur.execute(
            f"{sql} LIMIT $_limit OFFSET $_offset", {**params, "_limit": chunk, "_offset": position}
        ).fetchall()
        for row in found:
            entry = item(row)
            size += len(_encoder.encode(entry)) + 1
            if size > MAX_REPLY_BYTES and items:
                return items, position
            items.append(entry)
            position += 1
        if len(found) < chunk:
            return items, None
    more = cur.execute(
        f"{sql} LIMIT 1 OFFSET $_offset", {**params, "_offset": position}
    ).fetchall()
    return items, position if more else None


def _where(filters: dict[str, str | None]) -> tuple[str, dict[str, Any]]:
    given = {name: value for name, value in filters.items() if value is not None}
    clause = " AND ".join(f"{name} = ${name}" for name in given)
    return (f"WHERE {clause}" if clause else ""), given


def tasks(cur: duckdb.DuckDBPyConnection, request: TasksRequest) -> dict:
    where, params = _where({"run_id": request.run_id, "submitter": request.submitter})
    sql = (
        "SELECT task_id, run_id, type, name, status, worker_id, attempts, duration_s, passed, failed,"
        " skipped, errors, reason, priority, submitted_at, finished_at"
        f" FROM tasks {where} ORDER BY submitted_at NULLS LAST, task_id"
    )

    def item(r: tuple) -> dict:
        return {
            "task_id": r[0], "run_id": r[1], "type": r[2], "name": r[3], "state": r[4],
            "worker_id": r[5], "attempts": r[6], "duration_s": r[7],
            "tests": {"passed": r[8], "failed": r[9], "skipped": r[10], "errors": r[11]},
            "reason": r[12], "priority": r[13], "submitted_at": _iso(r[14]), "finished_at": _iso(r[15]),
        }

    found, next_offset = _page(cur, sql, params, request, item)
    return {"tasks": found, "next_offset": next_offset}


def workers(cur: duckdb.DuckDBPyConnection, request: WorkersRequest) -> dict:
    sql = (
        "SELECT w.worker_id, w.host, w.pid, w.status, w.capabilities, w.last_heartbeat, w.concurrency,"
        " (SELECT count(*) FROM tasks t WHERE t.worker_id = w.worker_id"
        "  AND t.status IN ('assigned', 'running')) AS running, w.reason, w.state"
        " FROM workers w ORDER BY w.worker_id"
    )

    # A worker's reason may name another tenant's task (quarantine, loss); host and pid are the
    # fleet's business. A submitter keeps what says whether a capable worker is there and how busy.
    tenant = request.submitter is not None

    def item(r: tuple) -> dict:
        state = msgspec.json.decode(r[9]) if r[9] else {}
        return {
            "worker_id": r[0], "host": None if tenant else r[1], "pid": None if tenant else r[2], "state": r[3],
            "capabilities": msgspec.json.decode(r[4]) if r[4] else {}, "last_heartbeat": _iso(r[5]),
            "concurrency": r[6], "running": r[7], "reason": None if tenant else (r[8] or None),
            "draining": bool(state.get("draining")), "quarantined_until": state.get("quarantined_until"),
        }

    found, next_offset = _page(cur, sql, {}, request, item)
    return {"workers": found, "next_offset": next_offset}


FAILURE_COLUMNS = ("longrepr", "short", "file", "line", "classname", "stdout", "stderr")
"""A failed test's details (empty for the others): reports and JUnit files are built from them."""


def results(cur: duckdb.DuckDBPyConnection, request: ResultsRequest) -> dict:
    where, params = _where({"run_id": request.run_id, "task_id": request.task_id})
    if request.submitter is not None:
        mine = "run_id IN (SELECT run_id FROM tasks WHERE submitter = $submitter)"
        where, params = (f"{where} AND {mine}" if where else f"WHERE {mine}"), {**params, "submitter": request.submitter}
    if request.project is not None:
        theirs = "task_id IN (SELECT task_id FROM tasks WHERE project = $project)"
        where, params = (f"{where} AND {theirs}" if where else f"WHERE {theirs}"), {**params, "project": request.project}
    names = ("run_id", "task_id", "attempt", "worker_id", "nodeid", "outcome", "duration_s", "message",
             *FAILURE_COLUMNS)
    sql = (
        f"SELECT {', '.join(names)}"
        f" FROM test_results {where} ORDER BY run_id, task_id, attempt, nodeid, outcome, message"
    )
    found, next_offset = _page(cur, sql, params, request, lambda r: dict(zip(names, r)))
    return {"results": found, "next_offset": next_offset}


def status(cur: duckdb.DuckDBPyConnection, request: StatusRequest) -> dict:
    checkpoints = dict(cur.execute("SELECT stream, seq FROM checkpoints ORDER BY stream").fetchall())
    counts = {
        table.name: cur.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]  # type: ignore[index]
        for table in (schema.EVENTS, schema.INVALID_EVENTS, schema.TASKS, schema.WORKERS)
    }
    return {"checkpoints": checkpoints, **counts}


QUERIES: dict[str, tuple[type[msgspec.Struct], Callable[[duckdb.DuckDBPyConnection, Any], dict]]] = {
    "tasks": (TasksRequest, tasks),
    "workers": (WorkersRequest, workers),
    "results": (ResultsRequest, results),
    "status": (StatusRequest, status),
    "durations": (durations.DurationsRequest, durations.durations),
    "aggregate": aggregate.QUERY,
    "flaky": flaky.QUERY,
    "runs": report.QUERY,
    "anomalies": anomalies.QUERY,
}
"""Query name (the last token of its subject, see `dtf.subjects.query`) -> (request type, function)."""


class QueryError(ValueError):
    """A request that cannot be answered; the message is the reply's "error"."""


class Refused(QueryError):
    """A request a submitter may not make: the reply also says "refused": true (the CLI's exit 3)."""


def parse(name: str, data: bytes) -> msgspec.Struct:
    if name not in QUERIES:
        raise QueryError(f"unknown query {name!r} (known: {', '.join(QUERIES)})")
    request_type = QUERIES[name][0]
    try:
        return wire.decode(data.strip() or b"{}", as_type=request_type)
    except wire.WireError as exc:
        raise QueryError(f"bad {name} request: {exc}") from None


SCOPED = ("tasks", "workers", "results", "durations", "aggregate", "flaky", "runs", "anomalies")
"""The queries a submitter may ask on `dtf.query.<name>.<submitter>`, answered for its own runs only
(`workers`: the fleet, which holds no tenant's data, without host, pid and reason). `status` counts
everyone's events, so it is refused."""


def foreign_run(cur: duckdb.DuckDBPyConnection, run_id: str, submitter: str) -> bool:
    """Whether the read model holds the run and none of it is `submitter`'s. Admission keeps a
    stranger's tasks out of a run, so a run's tasks are its owner's. A run the read model does not
    hold (yet) is not refused: it is empty, as a run still being projected is."""
    (mine, others) = cur.execute(
        "SELECT count(*) FILTER (WHERE submitter = $p), count(*) FILTER (WHERE submitter IS DISTINCT FROM $p)"
        " FROM tasks WHERE run_id = $r", {"r": run_id, "p": submitter},
    ).fetchone()  # type: ignore[misc]
    return mine == 0 and others > 0


def foreign_task(con: duckdb.DuckDBPyConnection, task_id: str, submitter: str) -> bool:
    """Whether the read model holds the task as another submitter's."""
    cur = con.cursor()
    try:
        row = cur.execute("SELECT submitter FROM tasks WHERE task_id = $task", {"task": task_id}).fetchone()
    finally:
        cur.close()
    return row is not None and row[0] != submitter


def answer(con: duckdb.DuckDBPyConnection, name: str, data: bytes, party: str | None = None) -> bytes:
    """The JSON reply to one request. Never raises: a failure is an {"error": ...} reply. Runs on its
    own cursor, so it sees the last committed batch while the projector writes the next. A request on
    a submitter's scoped subject (`party`) sees only that submitter's runs."""
    try:
        request = parse(name, data)
        if party is not None:
            if name not in SCOPED:
                raise Refused(f"a submitter may not ask the {name} query (it may ask {', '.join(SCOPED)})")
            request = msgspec.structs.replace(request, submitter=party)
        cur = con.cursor()
        try:
            run_id = getattr(request, "run_id", None)
            if party is not None and run_id is not None and foreign_run(cur, run_id, party):
                raise Refused(f"run {run_id} is another submitter's: {party} may read only its own runs")
            task_id = getattr(request, "task_id", None)
            if party is not None and task_id is not None and foreign_task(cur, task_id, party):
                raise Refused(f"task {task_id} is another submitter's: {party} may read only its own tasks")
            reply = QUERIES[name][1](cur, request)
        finally:
            cur.close()
    except Refused as exc:
        reply = {"error": str(exc), "refused": True}
    except QueryError as exc:
        reply = {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a query must never take the service down
        reply = {"error": f"{name} failed: {type(exc).__name__}: {exc}"}
    return _encoder.encode(reply)
