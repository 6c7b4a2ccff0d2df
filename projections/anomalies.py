"""The detector's findings in the read model: the `detections` rows and the `anomalies` query.

    anomalies {"series"?, "run_id"?, "kind"?: "regression"|"anomaly", "project"?, "offset"?, "limit"?}
              -> {"anomalies": [{"kind", "series", "owner", "run_id", "task_id", "before", "after",
                                 "size", "confidence", "time", ...}], "next_offset"}

`before`/`after` are a regression's levels either side of the change, and an anomaly's expected value
and the outlier itself, so both kinds read alike. `run_id`/`task_id` are the result that completed
the detection; a regression's `change_run_id` is the run where the shift began; `owner` is the
submitter whose series it is ("" for a detection from before series were per owner). Newest first, at
most `limit` (and 1000) a page; `next_offset` says where the next page starts (null at the end).
`project` narrows to the detections completed by results of tasks submitted under that project.

Asked by a submitter (`submitter`, set by the query service), only the detections its own tasks'
results completed (whose task is whose, the fold says: `tasks.submitter`), and a `change_run_id`
only when that run is the submitter's too. The detector keeps each submitter's series apart, so a
detection whose `owner` is the submitter names only its own results and shows its `result_ids`; a
detection from before series were per owner (owner "") came from a series every submitter's results
went into, and its `result_ids` (event ids that name tasks) are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import duckdb
import msgspec

from dtf import events as ev
from dtf.projections.rows import to_json

MAX_ROWS = 1000
"""Rows per reply: a detection row is well under 1 KB, so a page stays under NATS's payload limit."""


def detection_row(stream: str, seq: int, event: ev.Detection) -> dict:
    regression = isinstance(event, ev.RegressionDetected)
    return {
        "stream": stream, "seq": seq, "event_id": event.id,
        "kind": "regression" if regression else "anomaly",
        "series": event.series, "benchmark": event.benchmark, "metric": event.metric,
        "labels": to_json(event.labels), "hardware": list(event.hardware),
        "run_id": event.run_id, "task_id": event.task_id,
        "before": event.before if regression else event.expected,  # type: ignore[union-attr]
        "after": event.after if regression else event.value,  # type: ignore[union-attr]
        "size": event.size, "better": event.better,
        "direction": "worse" if regression else event.direction,  # type: ignore[union-attr]
        "confidence": event.confidence, "detector": event.detector, "result_ids": list(event.result_ids),
        "change_run_id": event.change_run_id if regression else None,  # type: ignore[union-attr]
        "time": event.time, "owner": event.owner,
    }


class AnomaliesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    series: str | None = None
    run_id: str | None = None
    kind: Literal["regression", "anomaly"] | None = None
    project: str | None = None
    submitter: str | None = None
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None


COLUMNS = (
    "kind", "series", "run_id", "task_id", "before", "after", "size", "confidence", "time", "direction",
    "better", "benchmark", "metric", "labels", "hardware", "change_run_id", "detector", "result_ids",
    "event_id", "owner",
)


def anomalies(cur: duckdb.DuckDBPyConnection, request: AnomaliesRequest) -> dict:
    given = {"series": request.series, "run_id": request.run_id, "kind": request.kind}
    params: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    clauses = [f"{name} = ${name}" for name in params]
    columns = list(COLUMNS)
    columns[COLUMNS.index("owner")] = "coalesce(owner, '')"
    if request.project is not None:
        params["project"] = request.project
        clauses.append("task_id IN (SELECT task_id FROM tasks WHERE project = $project)")
    if request.submitter is not None:
        params["submitter"] = request.submitter
        mine = "(SELECT {0} FROM tasks WHERE submitter = $submitter)"
        # Whose a detection is, the fold says (its task's submitter); `owner` only says whether its
        # series was the submitter's own, so that the results it names are too.
        clauses.append(f"task_id IN {mine.format('task_id')}")
        columns[COLUMNS.index("change_run_id")] = (
            f"CASE WHEN change_run_id IN {mine.format('run_id')} THEN change_run_id END")
        columns[COLUMNS.index("result_ids")] = (
            "CASE WHEN owner = $submitter THEN result_ids ELSE []::VARCHAR[] END")
    where = " AND ".join(clauses)
    limit = min(request.limit or MAX_ROWS, MAX_ROWS)
    found = cur.execute(
        f"SELECT {', '.join(columns)} FROM detections {'WHERE ' + where if where else ''}"
        " ORDER BY time DESC, seq DESC LIMIT $limit OFFSET $offset",
        {**params, "limit": limit + 1, "offset": request.offset},
    ).fetchall()
    rows = []
    for values in found[:limit]:
        row = dict(zip(COLUMNS, values))
        row["time"] = row["time"].isoformat()
        row["labels"] = msgspec.json.decode(row["labels"]) if row["labels"] else {}
        row["id"] = row.pop("event_id")
        rows.append(row)
    more = len(found) > limit
    return {"anomalies": rows, "next_offset": request.offset + limit if more else None}


QUERY: tuple[type[msgspec.Struct], Callable[[duckdb.DuckDBPyConnection, Any], dict]] = (
    AnomaliesRequest, anomalies,
)
