"""How long each test took recently: the history `dtf submit --split` packs shards by.

    durations  {"files": [...], "project"?, "last"?, "offset"?, "limit"?}
               -> {"durations": [{"nodeid", "duration_s", "runs"}], "next_offset"}

For each node id in one of `files`, the median duration of its last `last` (default 5) passed
results, newest first by event time. A median of recent passes follows a test that got slower
without being thrown by one slow outlier, and a failure's duration (it may have stopped early) says
nothing about a pass. `files` are paths relative to the submitted root; pytest reports node ids
relative to its rootdir, which may be a folder below that root, so a recorded file matches a
requested one when it is equal or a `/`-suffix of it (joined on the file name first, so the query
does not compare every row with every file). `project` narrows to that project's tasks; asked on a
submitter's scoped subject, only that submitter's runs count.
"""

from __future__ import annotations

from typing import Annotated

import duckdb
import msgspec

DEFAULT_LAST = 5
MAX_REPLY_BYTES = 900_000
"""As `queries.MAX_REPLY_BYTES` (not imported: `queries` imports this module)."""


class DurationsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A `queries.Page` with the files to look up (not a subclass: `queries` imports this module to
    register the query)."""

    files: list[str]
    project: str | None = None
    submitter: str | None = None
    """Set by the query service for a submitter's scoped subject: only its own runs."""
    last: Annotated[int, msgspec.Meta(ge=1, le=100)] = DEFAULT_LAST
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None


def durations(cur: duckdb.DuckDBPyConnection, request: DurationsRequest) -> dict:
    params: dict = {"files": request.files, "last": request.last}
    filters = ""
    for column in ("project", "submitter"):
        if getattr(request, column) is not None:
            filters += f" AND r.task_id IN (SELECT task_id FROM tasks WHERE {column} = ${column})"
            params[column] = getattr(request, column)
    sql = f"""
        WITH wanted AS (
            SELECT DISTINCT f AS file, regexp_extract(f, '[^/]*$') AS base FROM unnest($files::VARCHAR[]) t(f)
        ),
        passed AS (
            SELECT r.nodeid, r.duration_s, r.time, r.run_id, split_part(r.nodeid, '::', 1) AS file
            FROM test_results r
            WHERE r.outcome = 'passed'{filters}
        ),
        matched AS (
            SELECT DISTINCT p.nodeid, p.duration_s, p.time, p.run_id
            FROM passed p JOIN wanted w ON regexp_extract(p.file, '[^/]*$') = w.base
            WHERE w.file = p.file OR ends_with(w.file, '/' || p.file)
        ),
        recent AS (
            SELECT nodeid, duration_s,
                   row_number() OVER (PARTITION BY nodeid ORDER BY time DESC, run_id DESC, duration_s) AS n
            FROM matched
        )
        SELECT nodeid, median(duration_s), count(*) FROM recent WHERE n <= $last
        GROUP BY nodeid ORDER BY nodeid
    """

    # One execution, paged here: `queries._page` would run this window query again for every chunk.
    rows = cur.execute(sql, params).fetchall()
    found: list[dict] = []
    size = 0
    position = request.offset
    while position < len(rows) and (request.limit is None or len(found) < request.limit):
        nodeid, duration_s, runs = rows[position]
        entry = {"nodeid": nodeid, "duration_s": duration_s, "runs": runs}
        size += len(nodeid) + 64  # generous for the JSON around it
        if size > MAX_REPLY_BYTES and found:
            break
        found.append(entry)
        position += 1
    return {"durations": found, "next_offset": position if position < len(rows) else None}
