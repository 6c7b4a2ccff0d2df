"""Aggregated results: per test or per benchmark metric, grouped by what the caller names, per time
window, as pure functions of a DuckDB cursor (the `aggregate` query; `dtf results --group-by`).

    aggregate {"group_by"?: [key, ...], "kind"?: "tests"|"metrics", "metric"?, "run_id"?, "project"?,
               "since"?, "until"?, "window_s"?, "offset"?, "limit"?}
              -> {"aggregate": [row, ...], "kind": ..., "next_offset"}

Group keys: hardware (a worker's hardware kinds, sorted, joined by "+": `cpu+cuda`), worker, type
(task type), test (node id), benchmark (task name, else its command, else its id, as the detector
names it), metric, commit, branch, run, labels (the whole label set, an object) and label.NAME (one
label). Tests aggregate their durations and outcomes; metrics their values. A test's labels are its
task's; a metric's are its result's (a benchmark's config plus the task's labels).

A row is one group in one window: count, mean, median, p95, stddev, min and max of the values;
for tests also passed/failed/skipped/errors and the pass rate (passed over those that ran, skips left
out); `change` is the relative change of the mean against the group's previous window that has data
(`pass_rate_change` the difference of the pass rates). Windows: `window_s` long from `since` (or the
Unix epoch); with `since` and no `window_s`, one window from `since` to `until` (default now), compared
with the window of the same length before it; with neither, one window over everything. A metric row
also names its series, `BENCHMARK:METRIC{k=v,...}@HARDWARE`, from the other keys of its group.
Asked by a submitter (`submitter`, set by the query service), only its own tasks' observations count;
`project` narrows to the tasks submitted under that project, within the caller's scope.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import duckdb
import msgspec

KEYS = ("hardware", "worker", "type", "test", "benchmark", "metric", "commit", "branch", "run", "labels")
GroupKey = Annotated[str, msgspec.Meta(pattern=r"^(" + "|".join(KEYS) + r'|label\.[^"\\\n]{1,100})\Z')]
Time = Annotated[datetime, msgspec.Meta(tz=True)]


class AggregateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A `queries.Page` with what to aggregate (not a subclass: `queries` imports this module)."""

    group_by: list[GroupKey] = []
    kind: Literal["tests", "metrics"] | None = None
    """Default: metrics when a metric is named or the groups include benchmark or metric, else tests."""
    metric: str | None = None
    run_id: str | None = None
    project: str | None = None
    since: Time | None = None
    until: Time | None = None
    window_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    submitter: str | None = None
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None


_SOURCES = {
    "tests": (
        "SELECT r.time, r.outcome, r.duration_s AS value, r.run_id, r.worker_id, r.hardware,"
        " r.nodeid AS test, NULL::VARCHAR AS metric, t.type, t.name, t.commit, t.branch, t.labels, t.state,"
        " r.task_id, t.submitter, t.project"
        " FROM test_results r LEFT JOIN tasks t ON t.task_id = r.task_id"
    ),
    "metrics": (
        "SELECT m.time, NULL::VARCHAR AS outcome, m.value, m.run_id, m.worker_id, m.hardware,"
        " NULL::VARCHAR AS test, m.name AS metric, t.type, t.name, t.commit, t.branch, m.labels, t.state,"
        " m.task_id, t.submitter, t.project"
        " FROM metrics m LEFT JOIN tasks t ON t.task_id = m.task_id"
    ),
}

_EXPRESSIONS = {
    "hardware": "array_to_string(list_sort(hardware), '+')",
    "worker": "worker_id",
    "type": "type",
    "test": "test",
    "benchmark": ("coalesce(nullif(name, ''),"
                  " nullif(json_extract_string(state, '$.spec.config.command'), ''), task_id)"),
    "metric": "metric",
    "commit": "coalesce(commit, '')",
    "branch": "coalesce(branch, '')",
    "run": "run_id",
    "labels": "list_sort(map_entries(json_transform(labels, '\"MAP(VARCHAR, VARCHAR)\"')))",
}
"""Group key -> its SQL over one observation (a row of a `_SOURCES` query)."""

_TEST_COUNTS = ("passed", "failed", "skipped", "errors")
_STATS = ("mean", "median", "p95", "stddev", "min", "max")


def kind_of(request: AggregateRequest) -> str:
    if request.kind is not None:
        return request.kind
    return "metrics" if request.metric or {"benchmark", "metric"} & set(request.group_by) else "tests"


def series_name(
    benchmark: str | None, metric: str | None, labels: dict[str, Any], hardware: str | None,
) -> str:
    """`BENCHMARK:METRIC{k=v,...}@HARDWARE` (keys sorted; `*` for a part the group does not fix), the
    names the detector gives its series (`dtf.projections.detection.SeriesKey`)."""
    inner = ",".join(f"{k}={'' if v is None else v}" for k, v in sorted(labels.items()))
    return (f"{benchmark or '*'}:{metric or '*'}" + (f"{{{inner}}}" if inner else "")
            + (f"@{hardware}" if hardware else ""))


def _windows(request: AggregateRequest, now: datetime) -> tuple[int | None, int | None]:
    """(origin, width) of the windows in microseconds since the epoch; (None, None) for one window
    over everything."""
    if request.window_s is not None:
        origin = request.since or datetime(1970, 1, 1, tzinfo=UTC)
        return _us(origin), round(request.window_s * 1e6)
    if request.since is not None:
        width = _us(request.until or now) - _us(request.since)
        return _us(request.since), max(width, 1)
    return None, None


def _us(when: datetime) -> int:
    return round(when.timestamp() * 1e6)


def _sql(request: AggregateRequest, kind: str, keys: list[str], now: datetime) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {}
    where = []
    if request.run_id is not None:
        where.append("run_id = $run_id")
        params["run_id"] = request.run_id
    for column in ("submitter", "project"):
        if getattr(request, column) is not None:
            where.append(f"{column} = ${column}")
            params[column] = getattr(request, column)
    if request.metric is not None and kind == "metrics":
        where.append("metric = $metric")
        params["metric"] = request.metric
    origin, width = _windows(request, now)
    if request.since is not None:
        # The window before the first one is read too: it is what the first one's change compares with.
        where.append("epoch_us(time) >= $lo")
        params["lo"] = _us(request.since) - (width or 0)
    if request.until is not None:
        where.append("epoch_us(time) < $hi")
        params["hi"] = _us(request.until)
    if width is not None:
        bucket = "CAST(floor((epoch_us(time) - $origin) / $width) AS BIGINT)"
        params |= {"origin": origin, "width": width}
    else:
        bucket = "0"
    columns = []
    for i, key in enumerate(keys):
        if key.startswith("label."):
            params[f"label{i}"] = f'$."{key.removeprefix("label.")}"'
            columns.append(f"json_extract_string(labels, $label{i}) AS k{i}")
        else:
            columns.append(f"{_EXPRESSIONS[key]} AS k{i}")
    names = [f"k{i}" for i in range(len(keys))]
    partition = f"PARTITION BY {', '.join(names)} " if names else ""
    order = ", ".join([*(f"{n} NULLS FIRST" for n in names), "bucket"])
    sql = f"""
        WITH obs AS ({_SOURCES[kind]}),
        grouped AS (
            SELECT {''.join(c + ', ' for c in columns)}{bucket} AS bucket, count(*) AS n,
                count(*) FILTER (WHERE outcome = 'passed') AS passed,
                count(*) FILTER (WHERE outcome = 'failed') AS failed,
                count(*) FILTER (WHERE outcome = 'skipped') AS skipped,
                count(*) FILTER (WHERE outcome = 'error') AS errors,
                avg(value) AS mean, median(value) AS median, quantile_cont(value, 0.95) AS p95,
                stddev_samp(value) AS stddev, min(value) AS min, max(value) AS max
            FROM obs {('WHERE ' + ' AND '.join(where)) if where else ''}
            GROUP BY ALL
            HAVING count(*) > 0  -- no rows and no keys would still make one empty group
        ),
        rated AS (SELECT *, passed / nullif(n - skipped, 0) AS pass_rate FROM grouped)
        SELECT {''.join(n + ', ' for n in names)}bucket, n, {', '.join(_TEST_COUNTS)}, pass_rate,
            {', '.join(_STATS)}, (mean - lag(mean) OVER w) / nullif(abs(lag(mean) OVER w), 0) AS change,
            pass_rate - lag(pass_rate) OVER w AS pass_rate_change
        FROM rated
        WINDOW w AS ({partition}ORDER BY bucket)
        QUALIFY bucket >= 0
        ORDER BY {order}
    """
    return sql, params


def aggregate(cur: duckdb.DuckDBPyConnection, request: AggregateRequest, now: datetime | None = None) -> dict:
    from dtf.projections.queries import _page  # here, not at the top: queries imports this module

    kind = kind_of(request)
    keys = list(dict.fromkeys(request.group_by))
    now = now or datetime.now(UTC)
    sql, params = _sql(request, kind, keys, now)
    origin, width = _windows(request, now)
    columns = [*(f"k{i}" for i in range(len(keys))), "bucket", "n", *_TEST_COUNTS, "pass_rate", *_STATS,
               "change", "pass_rate_change"]
    page, next_offset = _page(
        cur, sql, params, request,
        lambda r: _item(dict(zip(columns, r)), keys, kind, (origin, width), request.metric))
    return {"aggregate": page, "kind": kind, "next_offset": next_offset}


def _item(
    row: dict, keys: list[str], kind: str, windows: tuple[int | None, int | None], metric: str | None,
) -> dict:
    origin, width = windows
    item: dict[str, Any] = {key: row[f"k{i}"] for i, key in enumerate(keys)}
    if "labels" in item:
        item["labels"] = {pair["key"]: pair["value"] for pair in item["labels"] or []}
    if width is not None and origin is not None:
        start = origin + row["bucket"] * width
        item["window_start"] = _iso(start)
        item["window_end"] = _iso(start + width)
    item["count"] = row["n"]
    if kind == "tests":
        item |= {name: row[name] for name in (*_TEST_COUNTS, "pass_rate")}
    item |= {name: row[name] for name in _STATS}
    item["change"] = row["change"]
    if kind == "tests":
        item["pass_rate_change"] = row["pass_rate_change"]
    else:
        fixed = ("benchmark", "metric", "labels", "hardware")
        named = {k.removeprefix("label."): item[k] for k in keys if k not in fixed}
        item["series"] = series_name(item.get("benchmark"), item.get("metric") or metric,
                                     {**item.get("labels", {}), **named}, item.get("hardware"))
    return item


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat()


Query = tuple[type[msgspec.Struct], Callable[[duckdb.DuckDBPyConnection, Any], dict]]
QUERY: Query = (AggregateRequest, aggregate)
