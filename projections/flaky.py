"""Flaky tests: a test that both passed and failed on the same commit and the same hardware (the `flaky`
query; `dtf flaky`). The code did not change between those runs, so the outcome depends on something
else: timing, order, shared state.

    flaky {"since"?, "branch"?, "project"?, "offset"?, "limit"?} -> {"flaky": [row, ...], "next_offset"}

A row is one (test, commit, hardware): its runs (passed, failed or errored; skips say nothing), how
many passed and failed (errors count as failures), its flips (outcome changes from one run to the
next, in time order) and flip rate (flips over runs - 1: 1.0 alternates every time), first and last
seen. Most flip-prone first. Results whose task has no known commit are left out: without one, a
pass then a failure may just be a change in the code. Asked by a submitter (`submitter`, set by the
query service), only its own tasks' results count: another's runs neither show nor make a test flaky.
`project` narrows to the tasks submitted under that project (`submit --project`; default the
submitter), within the caller's scope.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import duckdb
import msgspec

from dtf.projections.aggregate import Query


class FlakyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A `queries.Page` with filters (not a subclass: `queries` imports this module)."""

    since: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    branch: str | None = None
    project: str | None = None
    submitter: str | None = None
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None


_SQL = """
    WITH runs AS (
        SELECT r.nodeid AS test, t.commit, array_to_string(list_sort(r.hardware), '+') AS hardware,
            r.outcome = 'passed' AS ok, r.time, r.run_id, r.task_id, r.attempt
        FROM test_results r JOIN tasks t ON t.task_id = r.task_id
        WHERE coalesce(t.commit, '') <> '' AND r.outcome IN ('passed', 'failed', 'error')
            AND ($since IS NULL OR r.time >= $since) AND ($branch IS NULL OR t.branch = $branch)
            AND ($submitter IS NULL OR t.submitter = $submitter) AND ($project IS NULL OR t.project = $project)
    ),
    ordered AS (
        SELECT *, lag(ok) OVER (PARTITION BY test, commit, hardware
                                ORDER BY time, run_id, task_id, attempt) AS was_ok
        FROM runs
    )
    SELECT test, commit, hardware, count(*) AS runs, count(*) FILTER (WHERE ok) AS passed,
        count(*) FILTER (WHERE NOT ok) AS failed, count(*) FILTER (WHERE ok <> was_ok) AS flips,
        min(time) AS first_seen, max(time) AS last_seen
    FROM ordered
    GROUP BY test, commit, hardware
    HAVING bool_or(ok) AND bool_or(NOT ok)
    ORDER BY flips / (runs - 1) DESC, runs DESC, test, commit, hardware
"""


def flaky(cur: duckdb.DuckDBPyConnection, request: FlakyRequest) -> dict:
    from dtf.projections.queries import _page  # here, not at the top: queries imports this module

    params = {"since": request.since, "branch": request.branch, "submitter": request.submitter,
              "project": request.project}
    found, next_offset = _page(cur, _SQL, params, request, _item)
    return {"flaky": found, "next_offset": next_offset}


def _item(row: tuple[Any, ...]) -> dict:
    item = dict(zip(("test", "commit", "hardware", "runs", "passed", "failed", "flips"), row))
    return {**item, "flip_rate": item["flips"] / (item["runs"] - 1),
            "first_seen": row[7].isoformat(), "last_seen": row[8].isoformat()}


QUERY: Query = (FlakyRequest, flaky)
